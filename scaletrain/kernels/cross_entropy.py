"""Row-wise softmax cross-entropy + gradient on AVX-512 CPUs (cross_entropy.cpp), for the chunked
linear+CE of model/loss.py: each row of logits is read once and its gradient written once, instead of
several passes of an fp32 copy of the chunk (measured in README, issue 6).

It applies on CPU to fp32 logits, and to bf16 ones where the CPU has AVX-512-BF16, when gradients are
wanted and the kernels built (build.py); the caller keeps PyTorch's ops otherwise. A torch custom op: torch.compile keeps it as one opaque node.
"""

from __future__ import annotations

import torch

from scaletrain.kernels import build


kernel_ready = build.ready


def applies(h: torch.Tensor) -> bool:
    return h.device.type == "cpu" and h.dtype in (torch.bfloat16, torch.float32) and kernel_ready(h.dtype == torch.bfloat16)


@torch.library.custom_op("scaletrain::softmax_cross_entropy_", mutates_args=("logits",))
def softmax_cross_entropy_(logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """logits [n, V] (contiguous), targets [n] int64 in [0, V), weight [n] fp32 -> loss [n] fp32 =
    logsumexp - logit of the target; `logits` is overwritten with the gradient (softmax - onehot) * weight,
    in its own dtype (in place: a fresh [n, V] buffer costs its page faults on every chunk)."""
    return build.extension().softmax_cross_entropy_(logits, targets.contiguous(), weight.contiguous())


@softmax_cross_entropy_.register_fake
def _(logits, targets, weight):
    return logits.new_empty(logits.shape[:1], dtype=torch.float32)
