"""`scaletrain bench --loss-memory`: peak memory of output head + cross-entropy (forward+backward)
with and without `train.loss_chunk`, at vocab 32k and 128k.

Each case runs in a fresh process so its high-water mark is its own: on CPU the peak RSS
(ru_maxrss) minus the peak before the loss (inputs, weights and imports already counted out), on
CUDA torch.cuda.max_memory_allocated over the same window. Shape: 4096 tokens x hidden 512, bf16.
"""

from __future__ import annotations

import multiprocessing as mp
import resource

TOKENS, HIDDEN = 4096, 512
VOCABS = (32_000, 128_256)


def _case(device: str, tokens: int, hidden: int, vocab: int, chunk: int, dtype_name: str, queue) -> None:
    import time

    import torch

    from scaletrain.model.loss import cross_entropy, linear_cross_entropy

    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    g = torch.Generator().manual_seed(0)
    # drawn in place in the final dtype: fp32 temporaries freed before the loss would leave headroom under the
    # high-water mark (ru_maxrss), into which the loss could grow unseen (~0.5 GB at vocab 128k)
    h = torch.empty(tokens, hidden, dtype=dtype).normal_(generator=g).to(device).requires_grad_()
    w = torch.empty(vocab, hidden, dtype=dtype).normal_(0.0, 0.02, generator=g).to(device).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=g).to(device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.max_memory_allocated()
    else:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    loss = linear_cross_entropy(h, w, targets, chunk) if chunk else cross_entropy(h @ w.t(), targets)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put({"vocab": vocab, "loss_chunk": chunk, "peak_extra_mb": round((peak - before) / 2**20, 1),
               "seconds": round(time.perf_counter() - t0, 3), "loss": round(float(loss.detach()), 5),
               "logits_bytes_mb": round(tokens * vocab * torch.finfo(dtype).bits / 8 / 2**20, 1)})


def loss_memory_bench(device: str, chunk: int, dtype_name: str = "bfloat16", tokens: int = TOKENS,
                      hidden: int = HIDDEN, vocabs: tuple[int, ...] = VOCABS) -> dict:
    ctx = mp.get_context("spawn")
    rows = []
    for vocab in vocabs:
        for c in (0, chunk):
            queue = ctx.Queue()
            proc = ctx.Process(target=_case, args=(device, tokens, hidden, vocab, c, dtype_name, queue))
            proc.start()
            try:
                rows.append(queue.get(timeout=1800))
            except Exception:  # noqa: BLE001 - queue.Empty: the case died (e.g. out of memory) before reporting
                proc.join(timeout=60)
                raise RuntimeError(f"the loss-memory case vocab {vocab}, loss_chunk {c} did not report "
                                   f"(exit code {proc.exitcode})") from None
            proc.join()
    return {"tokens": tokens, "hidden": hidden, "dtype": dtype_name, "device": device,
            "measure": "peak RSS growth (CPU) / max_memory_allocated growth (CUDA) during fwd+bwd", "results": rows}
