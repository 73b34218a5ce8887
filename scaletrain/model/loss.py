"""Next-token cross-entropy from hidden states, with an optional chunked linear+CE (`train.loss_chunk`).

The plain path materialises logits [tokens, vocab] in the compute dtype, an fp32 copy for the
softmax, and the same again in backward: at vocab 128k and 16k tokens that is > 20 GB. The chunked
path walks `chunk` tokens at a time: logits of the chunk (compute dtype, so bf16 uses the bf16/AMX
matmul), log-softmax in fp32, loss, and, when gradients are needed, the gradients w.r.t. the hidden
states and the head weight right away (like Liger's fused linear-CE), so backward is a multiply and
nothing of size [tokens, vocab] ever exists. Peak extra memory is O(chunk x vocab).
Where torch's matmul serves the dtype (bf16; fp32 unless oneDNN does fp32, kernels/cpu_matmul.py) the
chunk's logits live in one reused buffer, walked in cache-sized passes, and the head's weight gradient
is one GEMM per chunk (issue 6: head + loss at 2048 tokens x vocab 8192 bf16 68.2 -> 65.0 ms, README).
Numerically it is the plain path (same fp32 log-softmax) up to summation order; tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from scaletrain.kernels import cross_entropy as ce_kernel
from scaletrain.kernels.cpu_matmul import matmul_nt, preferred

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain path: mean CE over tokens whose target is not IGNORE_INDEX, softmax in fp32."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


# Rows per pass inside a chunk on the in-place path: [512, 8192] bf16 logits are 8 MB, still in cache when
# the cross-entropy kernel and the input-gradient GEMM read them right after the logits GEMM wrote them.
PASS_ROWS = 512


@torch.library.custom_op("scaletrain::linear_cross_entropy_grads", mutates_args=())
def _in_place_chunks(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, counted: torch.Tensor,
                     row_weight: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss sum, grad_h and grad_w (fp32 when accumulated over chunks) of the fused path, where torch's
    matmul can write into a buffer: one [chunk, V] buffer holds a chunk's logits, then (the CE kernel,
    in place) their gradient; the chunk's weight gradient is then one GEMM over all its rows, so with
    one chunk it is rounded once and nothing is accumulated. A custom op: inductor sees one node and
    leaves the in-place writes into the buffer alone."""
    n = h.shape[0]
    buffer = h.new_empty(min(chunk, n), weight.shape[0])
    grad_h = torch.empty_like(h)
    loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
    # Several chunks: an fp32 accumulator (bf16 would round once per chunk), added to by a mixed-dtype add_ (in
    # the training step's profile a .float() of the first chunk's [V, d] took 1.6 ms, each add 0.33 ms)
    grad_w = None if n <= chunk else torch.zeros(weight.shape, dtype=torch.float32, device=h.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        g = buffer[: e - s]
        for a in range(s, e, PASS_ROWS):
            b = min(a + PASS_ROWS, e)
            g_rows = g[a - s : b - s]
            torch.matmul(h[a:b], weight.t(), out=g_rows)
            row_loss = ce_kernel.softmax_cross_entropy_(g_rows, targets[a:b], row_weight[a:b])
            loss_sum += torch.where(counted[a:b], row_loss, torch.zeros_like(row_loss)).sum()
            torch.matmul(g_rows, weight, out=grad_h[a:b])
        chunk_grad_w = torch.matmul(g.t(), h[s:e])
        if grad_w is None:
            grad_w = chunk_grad_w  # one chunk: rounded once, nothing to accumulate
        else:
            grad_w.add_(chunk_grad_w)
    return loss_sum, grad_h, grad_w


@_in_place_chunks.register_fake
def _(h, weight, targets, counted, row_weight, chunk):
    grad_w_dtype = weight.dtype if h.shape[0] <= chunk else torch.float32
    return h.new_empty(()).float(), torch.empty_like(h), weight.new_empty(weight.shape, dtype=grad_w_dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int, with_grad: bool):
        n = h.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum()
        # a gather index for ignored rows (their loss/grad are zeroed); any other negative target stays and is
        # refused by the gather or the kernel, as F.cross_entropy refuses it (clamping trained -1 towards id 0)
        safe_targets = torch.where(valid, targets, 0)
        row_weight = valid / count.clamp(min=1)  # d(mean CE)/d(row's CE); zero for ignored rows (all: zero grads)
        fused = with_grad and ce_kernel.applies(h)
        if fused and not preferred(h):  # torch's matmul: it can write into our buffer
            loss_sum, grad_h, grad_w = _in_place_chunks(h, weight, safe_targets, valid, row_weight, chunk)
            ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
            return loss_sum / count
        loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
        # fp16: (softmax - onehot) / count is formed before DeepSpeed's loss scale reaches it (backward) and is
        # mostly below fp16's smallest number (1/16384/32000 = 0): its gradients are computed and kept in fp32
        work = torch.float32 if h.dtype == torch.float16 else h.dtype
        w_work = weight.to(work)
        ctx.dtypes = (h.dtype, weight.dtype)
        grad_h = torch.empty(h.shape, dtype=work, device=h.device) if with_grad else None
        # fp32 accumulator: bf16 would round the weight gradient once per chunk instead of once
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
        for s in range(0, n, chunk):
            h_c, t_c, ok = h[s : s + chunk], safe_targets[s : s + chunk], valid[s : s + chunk]
            if fused:  # the same maths one row at a time in cache (kernels/cross_entropy.cpp)
                g = matmul_nt(h_c, weight)  # logits, then their gradient (in place)
                row_loss = ce_kernel.softmax_cross_entropy_(g, t_c, row_weight[s : s + chunk])
                loss_sum += torch.where(ok, row_loss, torch.zeros_like(row_loss)).sum()
            else:
                logp = torch.log_softmax(matmul_nt(h_c, weight), dim=-1, dtype=torch.float32)  # [c, V] fp32
                picked = logp.gather(1, t_c[:, None]).squeeze(1)
                loss_sum -= torch.where(ok, picked, torch.zeros_like(picked)).sum()
                if not with_grad:
                    continue
                # d(mean CE)/d logits = (softmax - onehot(target)) / count, zero for ignored rows;
                # scaled in fp32 before the cast, as the plain path's log-softmax backward does
                g = logp.exp_()
                g.scatter_add_(1, t_c[:, None], torch.full_like(picked[:, None], -1.0))
                g.mul_(row_weight[s : s + chunk, None])
                g = g.to(work)
            grad_h[s : s + chunk] = matmul_nt(g, w_work.t())
            grad_w.add_(matmul_nt(g.t(), h_c.t().to(work)))  # a mixed-dtype add converts on the fly: no fp32 copy
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype if work == h.dtype else work) if with_grad else None)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = getattr(ctx, "dtypes", (grad_h.dtype, grad_w.dtype))
        # grad_out: a 0-dim fp32 tensor, 1 or 1/grad_accum under DeepSpeed (times a row weight in fine-tuning;
        # fp16: the loss scale). Multiplied as it is, it scales in fp32 and rounds once: cast to bf16 first,
        # 1/3 became 0.33398 and every gradient 0.2 % too large.
        return (grad_h * grad_out).to(h_dtype), (grad_w * grad_out).to(w_dtype), None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Mean CE of softmax(h @ weight.T) against targets, never holding more than `chunk` rows of logits.
    h: [..., d]; weight: [V, d]; targets: [...] with IGNORE_INDEX where no loss is counted."""
    h2, t2 = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return ChunkedLinearCrossEntropy.apply(h2, weight, t2, chunk, with_grad)
