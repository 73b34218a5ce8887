"""One field of /proc/cpuinfo (first processor): the CPU's model, vendor and flags, for the bench's
machine report and the kernels' choice of library."""

from __future__ import annotations

import functools
from typing import Optional


@functools.cache
def cpuinfo_field(key: str) -> Optional[str]:
    """The value of `key` (e.g. "model name", "vendor_id", "flags"), or None where there is no such file/field."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, sep, value = line.partition(":")
                if sep and name.strip() == key:
                    return value.strip()
    except OSError:
        pass
    return None
