"""Sequence classification (`train.task: classify`): the decoder body plus a `score` head read at the last
non-pad token, i.e. Hugging Face's `LlamaForSequenceClassification` (same names: `model.*`, `score.weight`;
same pooling: the rightmost token that is not `pad_token_id`).

Examples are right-padded with the pad id (the tokenizer's EOS, which text never encodes to), so the
last non-pad token is the last token of the text and, under causal attention, has seen all of it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaletrain.model.llama import LlamaBody, LlamaForCausalLM, LlamaShape


def last_token_index(input_ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """[B] index of the rightmost non-pad token of each row (0 for an all-pad row), as HF computes it."""
    idx = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (idx * (input_ids != pad_id)).argmax(-1)


class LlamaForSequenceClassification(LlamaForCausalLM):
    """Shares the body, hidden_states and init of LlamaForCausalLM; no lm_head."""

    def __init__(self, shape: LlamaShape, pad_id: int = 2):
        nn.Module.__init__(self)
        self.shape, self.pad_id, self.loss_chunk, self.recompute_layers = shape, pad_id, 0, False
        self.model = LlamaBody(shape)
        self.score = nn.Linear(shape.hidden_size, shape.num_labels, bias=False)
        self.reset_parameters()

    def forward(self, input_ids: torch.Tensor, targets: Optional[torch.Tensor] = None, caches=None, start_pos: int = 0,
                doc_ids: Optional[torch.Tensor] = None):
        """Without targets: logits [B, num_labels]. With targets (label ids [B]): mean cross-entropy (fp32)."""
        h = self.hidden_states(input_ids)
        pooled = h[torch.arange(h.shape[0], device=h.device), last_token_index(input_ids, self.pad_id)]
        logits = self.score(pooled)
        if targets is None:
            return logits
        return F.cross_entropy(logits.float(), targets.reshape(-1))


def build_model(shape: LlamaShape, loss_chunk: int = 0, pad_id: int = 2) -> LlamaForCausalLM:
    """The model a shape describes: a classifier when num_labels > 0, else the causal LM."""
    if shape.num_labels:
        return LlamaForSequenceClassification(shape, pad_id)
    return LlamaForCausalLM(shape, loss_chunk=loss_chunk)
