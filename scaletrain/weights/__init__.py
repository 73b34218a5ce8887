"""Model weights wherever they live, read tensor by tensor (HF key names), and the scaletrain checkpoint dir.

Reading (what import-hf, export-hf, init.from, eval, generate and growth use):

    from scaletrain.weights import open_weights, iter_tensors, read_model_config
    src = open_weights(path)        # run dir (newest verified checkpoint) | DeepSpeed tag dir (global_stepN)
                                    # | scaletrain checkpoint dir | Hugging Face Llama dir
    src.model                       # ModelConfig (shapes, rope_theta, tie_word_embeddings, ...)
    src.specs()                     # [(name, shape, dtype)] in yield order; reads no tensor data
    for name, t in src.tensors():   # one tensor at a time; tied models yield no lm_head.weight
        ...                         # DeepSpeed: fp32 masters (any ZeRO stage, fp32 or bf16 training)
    src.tokenizer, src.config, src.lineage   # sentencepiece file or HF tokenizer dir; full Config; lineage.json

    iter_tensors(path) and read_model_config(path) are shortcuts for the two common cases.

Peak memory of a full pass is about the largest tensor plus RELEASE_BYTES (64 MB) of mapped pages (see
zero.py): the Adam moments in DeepSpeed's optimizer shards are never read.

A scaletrain checkpoint dir (written by import-hf and growth, read by init.from, export-hf, eval, generate):

    model.safetensors          HF key names (model-0000i-of-0000n.safetensors + model.safetensors.index.json when large)
    config.yaml                a full scaletrain Config; its model section describes the weights
    tokenizer/                 tokenizer.model (ours, sentencepiece) or a Hugging Face tokenizer's files as-is
    lineage.json               see scaletrain.lineage
    optimizer/                 grown Adam moments (`grow --optimizer grow`): exp_avg/, exp_avg_sq/, state.json
    manifest.json              sha256 of the weights and optimizer files (scaletrain.manifest), checked on open
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from scaletrain.config import ModelConfig
from scaletrain.errors import UserError
from scaletrain.weights.sources import HEAD, WeightSource, expected_shapes, open_weights, shape_problems, summarise

__all__ = ["WeightSource", "open_weights", "iter_tensors", "read_model_config", "load_into", "expected_shapes"]


def iter_tensors(source: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    return open_weights(source).tensors()


def read_model_config(source: str | Path) -> ModelConfig:
    return open_weights(source).model


def load_into(model: torch.nn.Module, src: WeightSource, label: str) -> None:
    """Copy `src`'s weights into `model` (an nn.Module with HF key names), tensor by tensor.
    Shape mismatches are one UserError naming the keys; nothing is copied then."""
    tied = getattr(getattr(model, "shape", None), "tie_word_embeddings", False)
    own = {n: t for n, t in model.state_dict().items() if not (tied and n == HEAD)}
    problems = shape_problems(src.specs(), {n: tuple(t.shape) for n, t in own.items()})
    if problems:
        raise UserError(f"{label} {src.path} does not match the model: {summarise(problems)}")
    with torch.no_grad():
        for name, t in src.tensors():
            own[name].copy_(t)
