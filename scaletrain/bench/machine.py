"""What a benchmark ran on: enough to tell two machines (and two software stacks) apart."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import PackageNotFoundError, version

from scaletrain.cpuinfo import cpuinfo_field


def _cpu_model() -> str:
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    return set((cpuinfo_field("flags") or "").split())


def _version(package: str) -> str | None:
    # From the installed metadata, not by importing: `import deepspeed` probes for an accelerator and logs
    # what it found to stdout, which would corrupt the JSON the bench prints there.
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info() -> dict:
    import torch

    flags = _cpu_flags()
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "amx_bf16": "amx_bf16" in flags,
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "deepspeed": _version("deepspeed"),
        "transformers": _version("transformers"),
        "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)  # other jobs on the machine skew timings
    except OSError:
        pass
    return info
