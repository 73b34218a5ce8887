"""`scaletrain bench --attention-only`: forward+backward of each attention backend vs eager.

Shapes: B4 H8 D64 at T 1024 and 4096, causal, in each requested precision (eager at T >= 2048 runs
on CPU one batch row at a time, else its scores alone would need ~8 GB of RAM). Each backend is timed in
rounds that alternate with eager (median of the rounds), in one process using every core (or
`--threads`). A backend that cannot run here (flash without CUDA, flex backward on CPU) is reported
with its reason instead of a time. Also records max |out - eager| as a sanity check.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

from scaletrain.dtypes import DTYPES
from scaletrain.errors import UserError
from scaletrain.model.attention import BACKENDS, attention, check_backend

SEQS, BATCH, HEADS, HEAD_DIM = (1024, 4096), 4, 8, 64


def _fwd_bwd(backend: str, q, k, v, grad, rows: int = 0) -> torch.Tensor:
    """fwd+bwd over the batch, `rows` batch rows at a time when > 0 (same math and FLOPs; bounds the
    memory of eager's [B, H, T, T] scores, ~8 GB at T=4096 in one go)."""
    step = rows or q.shape[0]
    outs = []
    for i in range(0, q.shape[0], step):
        qs, ks, vs = (x[i : i + step].detach().requires_grad_() for x in (q, k, v))
        out = attention(qs, ks, vs, backend)
        out.backward(grad[i : i + step])
        outs.append(out.detach())
    return torch.cat(outs)


def _time(fn, device: torch.device) -> float:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def attention_bench(device: str, precisions: list[str], reps: int = 5, threads: int = 0, seqs=SEQS) -> dict:
    dev = torch.device(device)
    if dev.type == "cpu":
        from scaletrain.train.perf import tune_cpu_allocator

        tune_cpu_allocator()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(threads or cores)
    reps = max(3, min(reps, 10))
    results = []
    for precision in precisions:
        dtype = DTYPES[precision]
        for b, h, t, d in [(BATCH, HEADS, t, HEAD_DIM) for t in seqs]:
            g = torch.Generator(device=dev).manual_seed(0)
            q, k, v = (torch.randn(b, h, t, d, generator=g, device=dev, dtype=dtype).requires_grad_() for _ in range(3))
            grad = torch.randn(b, h, t, d, generator=g, device=dev, dtype=dtype)
            eager_rows = 1 if t >= 2048 and dev.type == "cpu" else 0  # a GPU holds eager's whole batch
            row = {"precision": precision, "B": b, "H": h, "T": t, "D": d, "threads": torch.get_num_threads(),
                   "eager_batch_rows_at_once": eager_rows or b}
            ref = _fwd_bwd("eager", q, k, v, grad, eager_rows)  # warm-up + the reference output
            n = reps if t <= 1024 else 3  # eager at T=4096 is seconds per call
            for backend in [x for x in BACKENDS if x != "eager"]:
                try:
                    check_backend(backend, dev, training=True, precision=precision)
                    out = _fwd_bwd(backend, q, k, v, grad)  # warm-up (compiles flex on CUDA)
                except UserError as e:
                    row[backend] = {"skipped": str(e)}
                    continue
                mine, eager = [], []
                for _ in range(n):  # alternate so background load hits both alike
                    mine.append(_time(lambda: _fwd_bwd(backend, q, k, v, grad), dev))
                    eager.append(_time(lambda: _fwd_bwd("eager", q, k, v, grad, eager_rows), dev))
                row[backend] = {"fwd_bwd_ms": round(statistics.median(mine) * 1e3, 2),
                                "eager_fwd_bwd_ms": round(statistics.median(eager) * 1e3, 2),
                                "speedup_vs_eager": round(statistics.median(eager) / statistics.median(mine), 2),
                                "max_abs_diff_vs_eager": float((out.float() - ref.float()).abs().max())}
            results.append(row)
            q = k = v = grad = ref = None  # free this shape's tensors before the next
    out = {"shapes": "B,H,T,D causal, MHA (K=H)", "results": results}
    if dev.type == "cpu":  # `sdpa` on CPU is scaletrain's kernel where it built, else PyTorch's: say which ran
        from scaletrain.kernels.cpu_matmul import kernels_status

        out["cpu_kernels"] = kernels_status()
    return out
