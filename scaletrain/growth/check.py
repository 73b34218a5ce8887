"""Parent vs child on a few windows, one decoder block in memory at a time.

Loading parent and child whole would cost both models' memory, which is what streaming growth avoids;
instead the sample's hidden states (small) pass through one block at a time, each block's weights read by
name and dropped after use. fp32 and the eager attention reference, whatever the stored dtype.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from scaletrain.model.blocks import make_norm
from scaletrain.model.llama import DecoderLayer, LlamaShape, layer_inputs
from scaletrain.weights.files import EMBED, HEAD


@torch.no_grad()
def streamed_logits(read: Callable[[str], torch.Tensor], shape: LlamaShape, ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, V] (fp32) of the model whose tensors `read(name)` returns, for `ids` [B, T]."""
    s = dataclasses.replace(shape, attention="eager")
    x = F.embedding(ids, read(EMBED).float())
    cos, sin, mask = layer_inputs(s, ids.shape[1], 0, None, x.device, x.dtype)  # RoPE / ALiBi / window as in training
    with torch.device("meta"):
        layer = DecoderLayer(s)
    for i in range(s.num_layers):
        prefix = f"model.layers.{i}."
        state = {k: read(prefix + k).float() for k in layer.state_dict()}
        layer.load_state_dict(state, assign=True)
        x = layer(x, cos, sin, None, mask)
        del state
    with torch.device("meta"):
        norm = make_norm(s, s.hidden_size)
    norm.load_state_dict({k: read(f"model.norm.{k}").float() for k in norm.state_dict()}, assign=True)
    head = read(EMBED if s.tie_word_embeddings else HEAD).float()
    return norm(x) @ head.T


def sample_windows(tokens: Optional[np.ndarray], n: int, seq_len: int, vocab: int, seed: int = 0) -> tuple:
    """(x, y, description): `n` windows of `seq_len` tokens spread evenly over `tokens` (val data) and
    their next tokens, or random ids when there is no val data."""
    if tokens is not None and len(tokens) > seq_len + 1:
        starts = np.linspace(0, len(tokens) - seq_len - 1, n).astype(np.int64)
        w = torch.from_numpy(np.stack([np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts]))
        desc = f"{n} val windows x {seq_len} tokens"
    else:
        w = torch.randint(0, vocab, (n, seq_len + 1), generator=torch.Generator().manual_seed(seed))
        desc = f"{n} random-token windows x {seq_len} (no val data found)"
    return w[:, :-1], w[:, 1:], desc


@torch.no_grad()
def compare(parent_read, parent_shape: LlamaShape, child_read, child_shape: LlamaShape, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Loss of parent and child on inputs `x` / next tokens `y` [n, T] and the largest logit difference."""
    a = streamed_logits(parent_read, parent_shape, x)
    b = streamed_logits(child_read, child_shape, x)
    loss = lambda logits: F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)).item()  # noqa: E731
    return {"parent_loss": loss(a), "child_loss": loss(b), "max_abs_dlogits": (a - b).abs().max().item(),
            "tokens": int(y.numel())}
