"""Put grown fp32 master weights and Adam moments into a freshly built DeepSpeed engine; free an old engine.

Any ZeRO stage: ZeRO-1/2/3 and DeepSpeed's bf16 optimizer go through DeepSpeed's public
`safe_set_full_fp32_param` / `safe_set_full_optimizer_state` (each rank copies its own partition out of the
full tensor); ZeRO-0 holds a plain torch AdamW (fp32) or DeepSpeed's unfused wrapper with fp32 copies
(bf16), both set directly. Adam's state is created lazily by its first step, so moments are preceded by
one step with zero gradients at lr 0, which changes no weight (AdamW: p -= 0 * ..., decay p *= 1 - 0).
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Callable, Optional

import torch


def _base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _setter(engine) -> Callable[[torch.nn.Parameter, torch.Tensor, Optional[str]], None]:
    """set(param, full fp32 value, None | "exp_avg" | "exp_avg_sq") for this engine's optimizer."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    opt = engine.optimizer
    if isinstance(opt, torch.optim.Optimizer):  # ZeRO-0 fp32: the weights are the masters
        def plain(p, value, kind):
            target = p.data if kind is None else opt.state[p][kind]
            target.copy_(value.reshape(target.shape))
        return plain
    if engine.zero_optimization_stage() == 0 and hasattr(opt, "fp32_groups"):  # ZeRO-0 bf16/fp16 (unfused)
        hp = {id(lp): h for lg, hg in zip(opt.fp16_groups, opt.fp32_groups) for lp, h in zip(lg, hg)}

        def unfused(p, value, kind):
            master = hp[id(p)]
            target = master.data if kind is None else opt.optimizer.state[master][kind]
            target.copy_(value.reshape(target.shape))
        return unfused

    def zero(p, value, kind):
        if kind is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, kind)
    return zero


def _is_classifier(engine) -> bool:
    return getattr(getattr(engine.module, "shape", None), "num_labels", 0) > 0


def _materialise_adam_state(engine, grad_accum: int) -> None:
    """One optimizer step with zero gradients at lr 0, so every Adam state tensor exists (collective). The
    engine's counters and lr schedule are left as they were: the step is bookkeeping, not training."""
    opt = _base_optimizer(engine)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    sched = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None
    counters = (engine.global_steps, engine.global_samples, engine.skipped_steps)
    ids = torch.zeros(1, 2, dtype=torch.long, device=next(engine.module.parameters()).device)
    targets = ids[:, 0] if _is_classifier(engine) else ids  # a classifier's target is one label per sequence
    for _ in range(grad_accum):
        loss = engine(ids, targets)
        engine.backward(loss * 0.0)
        engine.step()
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    if sched is not None:
        engine.lr_scheduler.load_state_dict(sched)
    engine.global_steps, engine.global_samples, engine.skipped_steps = counters
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked"):
        # ZeRO-1/2 (DeepSpeed 0.19) links the state fragments after stepping its first param group, before the
        # second group's state exists: our second group (norm gains) would stay unlinked. Link again now.
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def install(engine, source: Path, precision: str, grad_accum: int, verify_files: bool = True) -> None:
    """Collective. After `deepspeed.initialize` on a model loaded from `source` (checkpoint, run or HF dir): in
    bf16/fp16 runs put its exact fp32 weights into the optimizer's masters (the module's low-precision copy lost
    bits); when `source` carries grown Adam moments (`scaletrain grow --optimizer grow`, growth.optimizer
    grow: optimizer/exp_avg, optimizer/exp_avg_sq, optimizer/state.json), install them and Adam's step."""
    from scaletrain.weights.files import MOMENT_KINDS, FileReader, adam_step_of, weight_files

    moments = Path(source) / "optimizer"
    # Grown moments belong to a language model's parameters; a classifier started from one has a `score` head
    # instead of the LM head, so it starts with a fresh optimizer (as init.from does everywhere else).
    has_moments = (moments / "state.json").is_file() and not _is_classifier(engine)
    if precision == "fp32" and not has_moments:
        return  # the module's fp32 weights are the masters already
    tied = getattr(getattr(engine.module, "shape", None), "tie_word_embeddings", False)
    named = list(engine.module.named_parameters())
    if has_moments:
        _materialise_adam_state(engine, grad_accum)
    set_full = _setter(engine)
    if precision != "fp32":
        from scaletrain.weights import open_weights

        params = dict(named)
        # Through open_weights: an HF dir of another architecture yields our names; a classifier started from a
        # language model skips the LM head (and its new `score` keeps its init). Same order on every rank.
        for name, t in open_weights(source, verify_files).tensors():
            if name in params:
                set_full(params[name], t.float(), None)
    if not has_moments:
        return
    for kind in MOMENT_KINDS:
        reader = FileReader(weight_files(moments / kind), tied)
        for name, p in named:
            set_full(p, reader.read(name).float(), kind)
    step = adam_step_of(moments)
    for state in _base_optimizer(engine).state.values():
        if "step" in state:  # bias correction continues where the parent's optimizer was
            state["step"] = torch.full_like(state["step"], float(step)) if torch.is_tensor(state["step"]) else step


def release_engine(engine) -> Callable[[], bool]:
    """Destroy `engine` and drop DeepSpeed's module-level references to it (ZeRO-3 keeps the root module in
    `parameter_offload.FWD_MODULE_STACK` and every coordinator in an unbounded lru_cache; growth.md §6).
    Returns a probe: True when the old module has really been freed."""
    ref = weakref.ref(engine.module)
    if hasattr(engine, "empty_partition_cache"):
        engine.empty_partition_cache()
    engine.destroy()
    try:
        from deepspeed.runtime.zero import parameter_offload, partitioned_param_coordinator as ppc

        parameter_offload.FWD_MODULE_STACK.clear()
        for attr in vars(ppc.PartitionedParameterCoordinator).values():  # the lru_cache sits inside an nvtx wrapper
            for cell in getattr(attr, "__closure__", None) or ():
                if hasattr(cell.cell_contents, "cache_clear"):
                    cell.cell_contents.cache_clear()
    except ImportError:
        pass
    return lambda: (gc.collect(), ref() is None)[1]
