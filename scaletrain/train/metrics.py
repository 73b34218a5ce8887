"""Console lines, TensorBoard scalars (stable tags) and the FLOP/MFU arithmetic shared with `bench`."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

import torch

from scaletrain.kernels import cpu_matmul
from scaletrain.kernels.build import cpu_fp16_training, cpu_has_avx512


def flops_per_token(shape, seq_len: int) -> float:
    """Training FLOPs per token of a `LlamaShape` at `seq_len`: 6·N (fwd+bwd matmuls over the weights, N counts
    the output head but not the input embedding lookup) + 12·L·d·T (attention scores and weighted sum, fwd+bwd,
    causal masking not discounted — the PaLM convention)."""
    return 6.0 * shape.num_params(include_embedding=False) + 12.0 * shape.num_layers * shape.hidden_size * seq_len


# Dense (no sparsity) peaks from NVIDIA's data sheets, FLOP/s: the usual MFU denominator on GPUs. bf16/fp16 on
# tensor cores; fp32 is plain FP32 (PyTorch leaves TF32 matmuls off, and so do we). The first key contained in
# the device name wins: the PCIe and NVL cards before the SXM ones.
NOMINAL_GPU_PEAKS = {"H100 PCIe": {"bf16": 756e12, "fp16": 756e12, "fp32": 51e12},
                     "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
                     "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
                     "H200 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},
                     "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},  # SXM
                     "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}}


def nominal_peak_flops(device: torch.device, precision: str) -> Optional[float]:
    """The data-sheet peak of a known NVIDIA GPU (None on CPU or an unlisted card)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((p[precision] for key, p in NOMINAL_GPU_PEAKS.items() if key in name), None)


def measure_peak_flops(dtype: torch.dtype, device: torch.device, size: int = 0, seconds: float = 0.5) -> float:
    """Achievable dense matmul FLOP/s for this process in `dtype` (what MFU is measured against).
    2048-square products saturate a CPU; a GPU needs 8192 to come near its peak. On CPU the faster of
    PyTorch's `mm` and oneDNN's matmul counts: for fp32 on AMD CPUs `mm` (MKL) reaches half of what the
    machine can do (kernels/cpu_matmul.py), and a peak below what training reaches would be no peak.
    Where the dtype runs in software (bf16 on a CPU without AVX-512: ~1.5 GFLOP/s a core, one 2048-square
    product ~11 s) a small probe first shrinks the product so the measurement still takes ~`seconds`."""
    size = size or (8192 if device.type == "cuda" else 2048)
    products = [torch.mm]
    if device.type == "cpu" and cpu_matmul.onednn_available():
        products.append(cpu_matmul.mm_nt)
    # a probe that sizes the product down only where the dtype runs in software: timed probes of small products
    # measure call overhead (and a busy neighbour), and shrank the product to where the peak came out 3-4x low
    hardware_matmul = {torch.bfloat16: cpu_has_avx512, torch.float16: cpu_fp16_training}.get(dtype, lambda: True)()
    rates = []
    gen = torch.Generator(device=device).manual_seed(0)  # not the global stream: a resumed run's restored RNG stays as saved
    for mm in products:
        try:
            n = size if device.type == "cuda" or hardware_matmul else _affordable_size(mm, dtype, device, size, seconds / len(products))
            a = torch.randn(n, n, device=device, generator=gen).to(dtype)
            b = torch.randn(n, n, device=device, generator=gen).to(dtype)
            rates.append(_rate(mm, a, b, seconds / len(products), device))
        except RuntimeError:  # oneDNN has no kernel for this dtype on this CPU (bf16 without AVX-512)
            continue
    if not rates:
        raise RuntimeError(f"no matmul runs in {dtype} on {device}")
    return max(rates)


def _affordable_size(mm, dtype: torch.dtype, device: torch.device, size: int, seconds: float) -> int:
    """`size`, or a smaller multiple of 128 so that one product takes at most a quarter of `seconds` (a dtype in
    software); the probe timed warm, at its best of three."""
    probe = torch.ones(256, 256, device=device).to(dtype)
    mm(probe, probe)
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        mm(probe, probe)
        best = min(best, time.perf_counter() - t0)
    rate = 2.0 * 256**3 / max(best, 1e-9)
    fits = int((rate * seconds / 4 / 2) ** (1 / 3)) // 128 * 128
    return max(128, min(size, fits))


def _rate(mm, a: torch.Tensor, b: torch.Tensor, seconds: float, device: torch.device) -> float:
    for _ in range(2 if device.type == "cuda" else 1):  # the first call pays for kernel generation (oneDNN: ~1 s)
        mm(a, b)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mm(a, b)
        n += 1
    sync()
    return 2.0 * a.shape[0] ** 3 * n / (time.perf_counter() - t0)


class ThroughputWindow:
    """Tokens per second of the training steps since the last log line: only the steps' own time counts
    (validation and checkpoint saves in between would otherwise show up as a throughput drop)."""

    def __init__(self):
        self.tokens, self.seconds = 0, 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self.tokens += tokens
        self.seconds += seconds

    def take(self) -> float:
        """The window's rate; starts the next window."""
        rate = self.tokens / max(self.seconds, 1e-9)
        self.tokens, self.seconds = 0, 0.0
        return rate


def _quiet_writer_thread() -> None:
    """TensorBoard's writer thread prints a traceback of its own when a write fails (a full disk); the failure
    comes back from the next flush, and Metrics says it in one line."""
    previous = threading.excepthook
    if getattr(previous, "scaletrain_quiet", False):
        return

    def hook(args) -> None:
        if isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread":
            return
        previous(args)

    hook.scaletrain_quiet = True
    threading.excepthook = hook


class Metrics:
    """Rank 0 writes; other ranks get a no-op instance."""

    def __init__(self, tb_dir: Optional[Path], purge_step: Optional[int] = None):
        self.writer = None
        if tb_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a crashed run wrote after its last checkpoint: one clean curve.
            self.writer = SummaryWriter(log_dir=str(tb_dir), purge_step=purge_step)
            _quiet_writer_thread()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is None:
            return
        try:
            for tag, value in values.items():
                if value is not None:
                    self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        except OSError as e:  # a full disk: training (and its checkpoints, when space returns) matter more
            self._lost(step, e)

    def _lost(self, step: int, e: OSError) -> None:
        print(f"warning: TensorBoard logging stopped at step {step}: {e.strerror or e}; training goes on (free space "
              "and restart from a checkpoint to log again)", flush=True)
        self.writer = None  # its writer thread has failed for good: every later call would raise again

    def close(self) -> None:
        if self.writer is not None:
            try:
                self.writer.close()
            except OSError as e:
                self._lost(-1, e)


def format_duration(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
