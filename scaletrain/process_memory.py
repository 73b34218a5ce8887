"""This process's memory from /proc (Linux): current RSS, its high-water mark, and a reset of that mark so a
window of work (two training steps, an export's weight stream) gets a peak of its own."""

from __future__ import annotations

import resource
from typing import Optional


def status_mb(key: str) -> Optional[float]:
    """A /proc/self/status field in MB: "VmRSS" (now) or "VmHWM" (peak); None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def max_rss_mb() -> float:
    """The process's peak RSS since it started (getrusage; never reset)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_rss_mb() -> float:
    """The high-water mark since the last `reset_peak` (VmHWM), else since the start."""
    return status_mb("VmHWM") or max_rss_mb()


def reset_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS. False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
