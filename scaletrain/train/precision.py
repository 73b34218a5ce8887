"""`train.precision: auto`: bf16 where the hardware multiplies bf16 natively, fp32 where it would not.

A CPU without AVX-512 has no bf16 matmul kernels: PyTorch converts and multiplies in scalar code (measured on a
2-core AVX2 AMD EPYC, 2026-12-06: a bf16 `mm` at 1.5-1.7 GFLOP/s a core against fp32's ~34), so a bf16 run
there multiplies ~20x slower than in fp32 (the tiny config's 2-rank step: 150-180 against 1,600 tokens/s,
~10x), and oneDNN refuses bf16 matmuls outright. AVX-512 CPUs keep bf16 (oneDNN has bf16 kernels for them;
with AVX-512-BF16 or AMX they beat fp32: 450 against 232 GFLOP/s a core on the Zen 5 EPYC) and so does a CUDA
card that has it; the others get fp32 (CPU) or fp16 with DeepSpeed's loss scaling (CUDA).
"""

from __future__ import annotations

import torch

from scaletrain.config import Config, fp16_zero_problem
from scaletrain.cpuinfo import cpuinfo_field
from scaletrain.errors import UserError
from scaletrain.kernels.build import cpu_fp16_training, cpu_has_avx512


def cpu_bf16_matmuls() -> bool:
    """oneDNN has bf16 matmul kernels for every AVX-512 CPU (and none below it)."""
    return cpu_has_avx512()


def _with_precision(cfg: Config, precision: str) -> Config:
    tree = cfg.to_dict()
    tree["train"]["precision"] = precision
    return type(cfg).model_validate(tree)


def choose(device: torch.device) -> tuple[str, str]:
    """(precision, why) that `auto` means on `device`."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):  # (emulated bf16 on a V100/T4: fp16 is native)
            return "bf16", f"{torch.cuda.get_device_name(device)} has bf16"
        return "fp16", f"{torch.cuda.get_device_name(device)} has no bf16"
    cap = torch.backends.cpu.get_cpu_capability()
    if cpu_bf16_matmuls():  # name the bf16 instructions where the CPU has them (torch's capability says AVX512 only)
        flags = (cpuinfo_field("flags") or "").split()
        has = [name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")) if flag in flags]
        return "bf16", f"this CPU multiplies bf16 natively ({', '.join(has) or cap})"
    return "fp32", f"this CPU has no bf16 matmul kernels ({cap}, no AVX-512): bf16 would train ~10x slower"


def resolve(cfg: Config, device: torch.device) -> tuple[Config, str | None]:
    """`cfg` with a concrete train.precision, and a line for the log: what auto chose, or a warning when
    bf16 was asked for on a CPU that runs it in software (None when there is nothing to say)."""
    asked = cfg.train.precision
    if asked == "auto":
        chosen, why = choose(device)
        if chosen == "fp16" and cfg.zero.stage == 0:  # (check_fp16_zero) fp32 trains right there
            chosen, why = "fp32", f"{why}, and its fp16 needs zero.stage >= 1"
        return _with_precision(cfg, chosen), f"train.precision auto -> {chosen} ({why})"
    if asked == "fp16" and device.type == "cpu" and not cpu_fp16_training():  # DeepSpeed: a traceback from deep inside
        raise UserError("train.precision=fp16 on this CPU: DeepSpeed trains fp16 on CPU only where oneDNN has fp16 kernels "
                        "(AVX512-FP16 / AMX-FP16); use bf16, fp32 or auto")
    check_fp16_zero(asked, cfg.zero.stage)
    if asked == "bf16" and device.type == "cpu" and not cpu_bf16_matmuls():
        cap = torch.backends.cpu.get_cpu_capability()
        return cfg, (f"warning: train.precision bf16 on a CPU without bf16 matmul kernels ({cap}): training runs "
                     "~10x slower than in fp32 here; use train.precision=fp32 or auto")
    return cfg, None


def check_fp16_zero(precision: str, zero_stage: int, what: str = "train.precision=fp16") -> None:
    if problem := fp16_zero_problem(precision, zero_stage, what):
        raise UserError(problem)


def agree(cfg: Config, asked: str, note: str | None, world: int) -> tuple[Config, str | None]:
    """Collective, after the process group exists. `auto` is decided on each rank's own hardware: a job on mixed
    nodes (AVX-512 and AVX2 CPUs, A100 and V100 cards) built engines in different dtypes and hung in its first
    collective. Every rank takes the choice all of them run: fp32 before fp16 before bf16."""
    if asked != "auto" or world == 1:
        return cfg, note
    import torch.distributed as tdist

    choices: list = [None] * world
    tdist.all_gather_object(choices, cfg.train.precision)
    if len(set(choices)) == 1:
        return cfg, note
    common = next(p for p in ("fp32", "fp16", "bf16") if p in choices)
    check_fp16_zero(common, cfg.zero.stage, "train.precision auto -> fp16 (the ranks' hardware differs)")
    return _with_precision(cfg, common), (f"train.precision auto -> {common} (the ranks' hardware differs: "
                                          f"{', '.join(sorted(set(choices)))}; every rank takes what all of them run)")


def planned(cfg: Config, device_type: str) -> Config:
    """`cfg` with the precision a run would use on `device_type` (scaletrain plan): a CUDA card that is not
    here is assumed to have bf16."""
    if cfg.train.precision != "auto":
        return cfg
    if device_type == "cuda" and not torch.cuda.is_available():
        return _with_precision(cfg, "bf16")
    return resolve(cfg, torch.device(device_type))[0]
