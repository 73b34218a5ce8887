"""The two contestants, built at one shape and wrapped in one DeepSpeed config.

ours: exactly what `Trainer` builds (`build_model`, `build_optimizer`, `deepspeed_config`, the same
      lr schedule), with the hot-path options of the bench's config.
peer: `transformers.LlamaForCausalLM(attn_implementation="sdpa")` of the same shape, tied embeddings
      included, with torch's default AdamW (same hyper-parameters and decay groups) and the same
      ds_config / ZeRO stage / precision — what a user gets from HF + DeepSpeed out of the box.
Both see the same token batches; each does forward, backward and optimizer step per timed step.
"""

from __future__ import annotations

from typing import Callable

import torch

from scaletrain.config import Config
from scaletrain.ds_config import deepspeed_config
from scaletrain.model.attention import check_backend
from scaletrain.model.docmask import document_ids
from scaletrain.model.llama import LlamaShape
from scaletrain.train.schedule import LrSchedule
from scaletrain.train.build import build_model, build_optimizer


def _initialize(model: torch.nn.Module, optimizer, cfg: Config, world: int):
    import deepspeed

    t = cfg.train
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, world),
        lr_scheduler=lambda opt: LrSchedule.of(opt, t),
    )
    return engine


def build_ours(cfg: Config, device: torch.device, world: int):
    shape = LlamaShape.from_config(cfg.model)
    check_backend(shape.attention, device, training=True, doc_mask=cfg.data.doc_mask, shape=shape,
                  precision=cfg.train.precision)
    torch.manual_seed(cfg.train.seed)
    model = build_model(shape, cfg)
    return _initialize(model, build_optimizer(model, cfg), cfg, world)


def build_peer(cfg: Config, world: int):
    from scaletrain.hf.arch_map import transformers_model

    torch.manual_seed(cfg.train.seed)
    model = transformers_model(cfg.model, "sdpa", use_cache=False)  # LlamaForCausalLM at the bench's shapes
    return _initialize(model, build_optimizer(model, cfg, fused=False), cfg, world)


def step_fn(kind: str, engine, x: torch.Tensor, y: torch.Tensor, eos_id: int | None = None) -> Callable[[], float]:
    """One full training step (forward, backward, optimizer step) returning the loss.
    ours mirrors Trainer.train_step with grad_accum 1; the peer is used the way HF documents it
    (labels = input_ids, the model shifts them)."""
    if kind == "ours":
        doc_ids = document_ids(x, eos_id) if eos_id is not None else None

        def ours() -> float:
            loss = engine(x, y, doc_ids=doc_ids)
            engine.backward(loss)
            engine.step()
            return loss.item()

        return ours

    def peer() -> float:
        loss = engine(input_ids=x, labels=x).loss
        engine.backward(loss)
        engine.step()
        return loss.item()

    return peer
