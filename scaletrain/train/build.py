"""What a training step runs: the model with its hot-path options, and the optimizer (the trainer, the
benchmark and the growth tests build them the same way)."""

from __future__ import annotations

import torch

from scaletrain.config import Config
from scaletrain.model import classify
from scaletrain.model.fused_ops import use_fused_ops
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
from scaletrain.train import finetune
from scaletrain.train.perf import compile_model


def build_optimizer(model: torch.nn.Module, cfg: Config, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains are not decayed). `fused`: one kernel per
    step over all tensors (CPU and CUDA) instead of ~10 elementwise passes per tensor."""
    groups = finetune.param_groups(model, cfg)  # + lr_scale per group: train.freeze, train.body_lr_scale
    t = cfg.train
    if cfg.zero.offload_optimizer != "none":
        # ZeRO-Offload steps the fp32 master weights on the CPU: DeepSpeed's vectorised CPU Adam (a C++ op,
        # built once per machine into scaletrain's extensions dir) is the optimizer DeepSpeed accepts there.
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        from scaletrain.train.op_reuse import reuse_cpu_adam_build

        with reuse_cpu_adam_build():  # a reinstall of the same deepspeed and torch need not recompile it
            return DeepSpeedCPUAdam(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused or None)


def build_model(shape: LlamaShape, cfg: Config, pad_id: int = 2) -> LlamaForCausalLM:
    """The model (a classifier when model.num_labels > 0) with the configured hot-path options (chunked
    loss, compiled blocks)."""
    model = classify.build_model(shape, loss_chunk=cfg.train.loss_chunk, pad_id=pad_id)
    model.recompute_layers = cfg.train.activation_checkpointing
    use_fused_ops(model, cfg.model.fused_ops, cuda=torch.cuda.is_available())
    return compile_model(model) if cfg.train.compile else model
