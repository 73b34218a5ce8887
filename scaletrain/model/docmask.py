"""Document masking inside packed windows.

A training window is a slice of the packed token stream, so it usually spans several documents
separated by EOS. With `data.doc_mask: true` a token attends only to earlier tokens of its own
document and RoPE positions restart at 0 at each document start: the model sees every document
as if it had been fed alone (tested: packed [docA|docB] == separate runs).

Everything here is derived from `doc_ids` [B, T] (int64, nondecreasing along T), so the data
pipeline only has to supply tokens; `document_ids` finds the boundaries from EOS positions.
"""

from __future__ import annotations

import torch


def document_ids(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B, T] tokens -> [B, T] document index within each row. The EOS token belongs to the
    document it ends; the token after it starts the next one."""
    is_eos = (tokens == eos_id).long()
    return torch.cumsum(is_eos, dim=1) - is_eos


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] doc ids -> [B, T] position of each token within its document (RoPE restarts)."""
    b, t = doc_ids.shape
    idx = torch.arange(t, device=doc_ids.device).expand(b, t)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    # index of the latest document start at or before each token
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def dense_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """Boolean [B, 1, T, T] mask (True = may attend): causal AND same document. Used by sdpa/eager;
    O(T^2) bytes per row, which is small next to the attention scores those backends handle."""
    t = doc_ids.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    same_doc = doc_ids[:, :, None] == doc_ids[:, None, :]
    return (same_doc & causal)[:, None]


def varlen_offsets(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """cu_seqlens (int32, [segments+1]) and the longest segment for flash-attn's varlen kernel:
    every (row, document) pair of the flattened batch is one sequence."""
    b, t = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    begin = torch.nonzero(starts.reshape(-1)).flatten()
    cu = torch.cat([begin, torch.tensor([b * t], device=doc_ids.device)]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())
