"""Preflight arithmetic: parameters, FLOPs, memory per rank by ZeRO stage, tokens per step, step time.

Shared by `scaletrain plan` (prints it) and the trainer (refuses, at start, a config whose estimate does not
fit the memory each rank has). Memory per rank, P parameters, D data-parallel ranks, e bytes per module
element (2 in bf16/fp16, 4 in fp32):

    params      P*e            (ZeRO-3: P*e/D + one gathered layer; zero.offload_param=cpu: the shards in CPU
                               memory, the gathered layer still on the device)
    grads       P*e            (ZeRO-1/2/3: + their flat fp32 copy 4P/D for the step + the reduce bucket,
                               allocated whole: zero.reduce_bucket_size*e; ZeRO-2/3: P*e/D instead of P*e;
                               bf16 with grad_accum > 1 sums in fp32: ZeRO-2 4P/D, ZeRO-3 8P/D, + the bucket);
                               on CPU + 4P: the model is built in fp32 before DeepSpeed converts it, and
                               glibc keeps that memory (perf.tune_cpu_allocator)
    optimizer   12P            fp32 master copy (4P; none for ZeRO-0 fp32, whose weights are the masters)
                               + Adam moments (8P); ZeRO-1/2/3: /D; zero.offload_optimizer=cpu: in CPU memory,
                               with the flat fp32 gradient copy (4P/D) the CPU step reads
    activations what autograd keeps for one micro-batch: per layer and token about 12d + 4·kv + 4f elements
                (norm inputs/outputs, q/k/v before and after RoPE, attention output, FFN gate/up/act/product),
                heads·T scores per token and layer more with eager attention, fp32 logits (4 vocab-sized
                rows per token: logits, log-softmax and both gradients; only a loss_chunk of tokens at a
                time when set) and one layer's worth of gradients in flight during backward
    runtime     the framework itself (measured: ~0.3 GB per CPU rank; CUDA context ~1 GB, not measured here)

How good is it: see README "Reliability" (estimate vs measured peak RSS on CPU for three shapes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from scaletrain.config import Config
from scaletrain.ds_config import sums_gradients_in_fp32
from scaletrain.errors import UserError

GB = 1e9
RUNTIME_BYTES = {"cpu": 0.35 * GB, "cuda": 1.0 * GB}
TYPICAL_MFU = {"cpu": 0.3, "cuda": 0.4}  # for the "expected" step time; the 100%-of-peak figure is a hard floor


@dataclass
class MemoryPlan:
    params: float  # bytes per rank, on the device
    grads: float
    optimizer: float
    activations: float
    runtime: float
    offloaded: float  # bytes per rank moved to CPU memory by zero.offload_*

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.runtime

    def largest(self) -> str:
        parts = {"params": self.params, "grads": self.grads, "optimizer": self.optimizer, "activations": self.activations}
        return max(parts, key=parts.get)


def num_params(cfg: Config) -> int:
    from scaletrain.model.llama import LlamaShape

    return LlamaShape.from_config(cfg.model).num_params()


def flops_per_token(cfg: Config) -> float:
    from scaletrain.model.llama import LlamaShape
    from scaletrain.train.metrics import flops_per_token as fpt

    return fpt(LlamaShape.from_config(cfg.model), cfg.train.seq_len)


def activation_bytes(cfg: Config) -> float:
    """What autograd holds for one micro-batch at the peak (start of backward)."""
    m, t = cfg.model, cfg.train
    e = 4 if t.precision == "fp32" else 2
    tokens = t.micro_batch_size * t.seq_len
    kv = m.num_kv_heads * m.head_dim
    per_layer = (12 * m.hidden_size + 4 * kv + 4 * m.intermediate_size) * e
    if m.attention == "eager":  # scores, probabilities (+ a bool mask) per head; fused kernels keep none
        per_layer += m.num_heads * t.seq_len * (2 * e + 1)
    head_rows = m.num_labels or m.vocab_size
    logit_tokens = tokens if not t.loss_chunk or m.num_labels else min(tokens, t.loss_chunk)
    logits = 4 * 4 * head_rows * (logit_tokens if not m.num_labels else t.micro_batch_size)
    if t.activation_checkpointing:  # every layer's input, and one layer recomputed (+1: its gradients in flight)
        body = tokens * (m.hidden_size * e * m.num_layers + per_layer * 2 + 4 * m.hidden_size * e)
    else:
        body = tokens * (per_layer * (m.num_layers + 1) + 4 * m.hidden_size * e)  # +1 layer: gradients in flight
    return float(body + logits)


def memory_per_rank(cfg: Config, ranks: int, device: str = "cpu") -> MemoryPlan:
    P, z, t, m = num_params(cfg), cfg.zero, cfg.train, cfg.model
    e = 4 if t.precision == "fp32" else 2
    D = max(1, ranks)
    bucket = z.reduce_bucket_size * e  # DeepSpeed allocates the whole bucket, however small the model
    if z.stage == 3:
        layer = P / max(1, m.num_layers)  # the gathered parameters of the layer being computed
        params = P * e / D + layer * e
    else:
        params = P * e
    if z.stage == 0:
        grads = P * e + (4 * P if e != 4 else 0)  # bf16: DeepSpeed accumulates an fp32 copy
    elif sums_gradients_in_fp32(cfg):  # ZeRO-2's partition is fp32 (no copy at the step); ZeRO-3's buffer is too
        grads = (4 * P / D if z.stage == 2 else 8 * P / D) + bucket
    else:  # the reduced gradients (full under ZeRO-1) + their flat fp32 copy for the step + the bucket
        grads = (P * e if z.stage == 1 else P * e / D) + 4 * P / D + bucket
    master = 0 if (z.stage == 0 and t.precision == "fp32") else 4 * P
    optimizer = (master + 8 * P) / (D if z.stage >= 1 else 1)
    # On CPU the model is built in fp32 before DeepSpeed converts/flattens it and glibc keeps that memory
    # (perf.tune_cpu_allocator): the peak keeps one fp32 copy. On GPU that copy lives in host memory.
    transient = 4 * P if device == "cpu" and not (z.stage == 0 and e == 4) else 0.0
    offloaded = 0.0
    if z.offload_optimizer == "cpu":  # the optimizer step runs on the CPU: its fp32 gradient partition lives there too
        fp32_grads = 4 * P / D if z.stage >= 1 else 0.0
        offloaded += optimizer + fp32_grads
        optimizer, grads = 0.0, grads - fp32_grads
    if z.offload_param == "cpu":  # the shards live in CPU memory; the layer being computed is still gathered here
        gathered = (P / max(1, m.num_layers)) * e if z.stage == 3 else 0.0
        offloaded += params - gathered
        params = gathered
    return MemoryPlan(params, grads + transient, optimizer, activation_bytes(cfg),
                      RUNTIME_BYTES.get(device, RUNTIME_BYTES["cuda"]), offloaded)


def device_memory(device: str, local_ranks: int) -> tuple[float, str]:
    """(bytes one rank may use, what that is): GPU memory on CUDA, else the machine's RAM / local ranks."""
    if device == "cuda":
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        return float(total), f"{total / GB:.1f} GB of GPU memory"
    import psutil

    total = psutil.virtual_memory().total
    return total / max(1, local_ranks), f"{total / GB:.1f} GB RAM / {local_ranks} rank(s)"


def needed(plan: MemoryPlan, device: str) -> float:
    """Bytes a rank needs: offloading to CPU saves nothing on a CPU run."""
    return plan.total + (plan.offloaded if device == "cpu" else 0)


def advice(plan: MemoryPlan, cfg: Config, ranks: int, device: str, have: float) -> str:
    """The knob to turn for the part that dominates, checked to fit where it is a ZeRO setting."""
    z = cfg.zero
    if plan.largest() == "activations":
        recompute = "" if cfg.train.activation_checkpointing else "set train.activation_checkpointing=true, "
        return (f"{recompute}lower train.micro_batch_size (raise train.grad_accum to keep the batch) or train.seq_len, "
                "or set train.loss_chunk")
    settings = [{"zero.stage": s} for s in range(z.stage + 1, 4)]
    if device == "cuda":  # on a CPU run the host's memory is the same memory
        settings += [{"zero.stage": 3, "zero.offload_optimizer": "cpu"},
                     {"zero.stage": 3, "zero.offload_optimizer": "cpu", "zero.offload_param": "cpu"}]
    for setting in settings:
        c = cfg.model_copy(deep=True)
        for key, value in setting.items():
            setattr(c.zero, key.split(".")[1], value)
        trial = memory_per_rank(c, ranks, device)
        if needed(trial, device) <= have:
            what = " ".join(f"{k}={v}" for k, v in setting.items())
            return f"set {what} (about {_fmt(needed(trial, device))} per rank)"
    more = "more GPUs" if device == "cuda" else "more machines (ranks on one machine share its RAM)"
    bf16 = "" if cfg.train.precision == "bf16" else " train.precision=bf16,"
    return f"no ZeRO setting fits on {ranks} rank(s): use {more},{bf16} or a smaller model"


def _fmt(b: float) -> str:
    return f"{b / GB:.2f} GB" if b >= 0.1 * GB else f"{b / 1e6:.1f} MB"


def check_fits(cfg: Config) -> None:
    """Training's preflight: refuse (UserError, one line) a config whose estimate exceeds what a rank has.
    World size and local ranks come from the launcher's environment (1 without a launcher)."""
    if not cfg.train.memory_check:
        return
    import torch

    from scaletrain.train.distributed import launcher_world

    world, local = launcher_world()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    plan = memory_per_rank(cfg, world, device)
    have, what = device_memory(device, local)
    need = needed(plan, device)
    if need > have:
        raise UserError(
            f"this config needs about {_fmt(need)} per rank (params {_fmt(plan.params)}, grads {_fmt(plan.grads)}, "
            f"optimizer {_fmt(plan.optimizer + (plan.offloaded if device == 'cpu' else 0))}, activations {_fmt(plan.activations)}) "
            f"but each of the {world} rank(s) has {_fmt(have)} ({what}): {advice(plan, cfg, world, device, have)} "
            "(or train.memory_check=false to start anyway)")


def step_time(cfg: Config, ranks: int, total_peak_flops: float, device: str) -> tuple[float, float]:
    """(seconds at 100% of peak, seconds at a typical MFU) for one optimizer step; `total_peak_flops` of all
    ranks together (CPU ranks on one machine share its cores: the machine's peak, not ranks x peak)."""
    tokens = cfg.global_batch_windows(ranks) * cfg.train.seq_len
    recompute = 4 / 3 if cfg.train.activation_checkpointing else 1.0  # the forward (a third of the work) runs twice
    best = flops_per_token(cfg) * recompute * tokens / total_peak_flops
    return best, best / TYPICAL_MFU.get(device, 0.4)


def report(cfg: Config, gpus: int, nodes: int = 1, device: Optional[str] = None, memory: Optional[float] = None,
           peak_flops: Optional[float] = None, ranks: Optional[int] = None) -> str:
    """The text `scaletrain plan` prints. `gpus`: ranks per node (the most on one node where a hostfile's hosts
    differ); `ranks`: all of them (default gpus x nodes); `memory`: bytes per rank (default: this machine's,
    see device_memory); `peak_flops`: per GPU or per CPU machine (default: train.peak_flops, else measured here)."""
    import torch

    from scaletrain.dtypes import DTYPES
    from scaletrain.growth.schedule import advance
    from scaletrain.train.metrics import measure_peak_flops
    from scaletrain.train.precision import planned

    ranks = ranks or gpus * nodes
    here = "cuda" if torch.cuda.is_available() else "cpu"
    device = device or here
    cfg = planned(cfg, device)  # train.precision auto: what a run on `device` would use
    grows = len(cfg.growth.schedule)
    first = num_params(cfg)
    if grows:  # the largest model decides whether it fits (training checks the same one at start)
        cfg = advance(cfg, grows)
    P, fpt = num_params(cfg), flops_per_token(cfg)
    t, z = cfg.train, cfg.zero
    tokens_step = cfg.global_batch_windows(ranks) * t.seq_len
    lines = [
        f"model        {P:,} parameters ({P / 1e6:.2f}M), {fpt / 1e6:,.1f} MFLOPs per token (6N + 12·L·d·T)"
        + (f" after {grows} growth stage(s) (the run starts at {first:,}; memory and step time below are the "
           "final stage's)" if grows else ""),
        f"batch        {ranks} rank(s) x {t.micro_batch_size} x {t.grad_accum} accum = {cfg.global_batch_windows(ranks)} "
        f"sequences x {t.seq_len} tokens = {tokens_step:,} tokens/step; {tokens_step * t.max_steps:,} tokens in {t.max_steps} steps",
        f"memory per rank on {device} by ZeRO stage ({t.precision}; * = zero.stage {z.stage} as configured):",
        f"  {'stage':<7}{'params':>11}{'grads+buf':>11}{'optimizer':>11}{'activations':>13}{'runtime':>10}{'total':>11}{'offloaded':>11}",
    ]
    for stage in range(4):
        if stage < 3 and z.offload_param != "none":
            continue  # offload_param needs stage 3
        c = cfg.model_copy(deep=True)
        c.zero.stage = stage
        if stage == 0:
            c.zero.offload_optimizer = "none"
        p = memory_per_rank(c, ranks, device)
        mark = "*" if stage == z.stage else " "
        lines.append(f" {mark}{stage:<7}{_fmt(p.params):>11}{_fmt(p.grads):>11}{_fmt(p.optimizer):>11}"
                     f"{_fmt(p.activations):>13}{_fmt(p.runtime):>10}{_fmt(p.total):>11}{_fmt(p.offloaded):>11}")
    plan = memory_per_rank(cfg, ranks, device)
    need = needed(plan, device)
    if memory is not None:
        have, what = memory, "given with --memory-gb"
    elif device == here:
        have, what = device_memory(device, gpus)
    else:
        have, what = None, f"no {device} here: pass --memory-gb"
    if have is None:
        lines.append(f"available    unknown ({what})")
    else:
        verdict = "fits" if need <= have else f"does NOT fit: {advice(plan, cfg, ranks, device, have)}"
        lines.append(f"available    {_fmt(have)} per rank ({what}) -> zero.stage {z.stage} {verdict}")
    if peak_flops is None and t.peak_flops:  # the figure the run's train/mfu divides by (per GPU or CPU machine)
        peak_flops, source = t.peak_flops, "train.peak_flops"
    elif peak_flops is None and device == here:
        dtype = DTYPES[t.precision]
        peak_flops = measure_peak_flops(dtype, torch.device(device))
        source = f"measured on this {device} in {t.precision}"
    else:
        source = "given with --peak-tflops"
    if peak_flops:
        # CPU: a machine's ranks share its peak, and the busiest machine sets the pace of every step
        best, typical = step_time(cfg, ranks, peak_flops * (ranks / gpus if device == "cpu" else ranks), device)
        lines.append(f"step time    >= {best:.3g} s at 100% of {peak_flops / 1e12:.2f} TFLOP/s per {'machine' if device == 'cpu' else 'GPU'} ({source}); "
                     f"~{typical:.3g} s at {TYPICAL_MFU.get(device, 0.4):.0%} MFU -> {typical * t.max_steps / 3600:.2f} h for {t.max_steps} steps")
    else:
        lines.append(f"step time    unknown (no {device} here: pass --peak-tflops)")
    return "\n".join(lines)
