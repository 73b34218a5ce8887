"""Typed run configuration: YAML file + dotted `--set` overrides, validated once, plus ds_config generation.

Every other module receives a validated `Config`; nothing downstream re-checks user input.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from scaletrain.config_file import dump_yaml, parse_scalar, read_yaml
from scaletrain.deepspeed_keys import mapping_problem
from scaletrain.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)  # lr=.inf: all steps skipped

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_only_where_they_belong(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads `max_steps: true` as 1 and `compile: off` (text in YAML 1.2) or `compile: 1` as booleans;
        a switch is written true/false, and true/false is no number."""
        annotation = cls.model_fields[info.field_name].annotation
        if annotation in _SWITCHES and value is not None and not isinstance(value, bool):
            raise PydanticCustomError("bool_type", "expects true or false")
        if annotation not in _SWITCHES and (isinstance(value, bool) or
                                            (isinstance(value, list) and any(isinstance(v, bool) for v in value))):
            raise PydanticCustomError("number_type", "expects a number or text, not true/false")
        return value


_SWITCHES = (bool, Optional[bool])


class RunConfig(_Section):
    dir: str = Field("runs/tiny", min_length=1)


class ModelConfig(_Section):
    # Upper bounds far beyond any model, so that a garbled config is refused, not built (the meta-device build of
    # 10^9 layers ran until memory was gone)
    hidden_size: int = Field(256, gt=0, le=1 << 17)
    num_layers: int = Field(4, gt=0, le=4096)
    num_heads: int = Field(4, gt=0, le=4096)
    num_kv_heads: int = Field(4, gt=0, le=4096)
    intermediate_size: int = Field(688, gt=0, le=1 << 20)
    vocab_size: int = Field(8192, ge=16)
    max_seq_len: int = Field(2048, gt=0, le=1 << 24)
    rope_theta: float = Field(10000.0, gt=0)
    tie_word_embeddings: bool = True
    norm_eps: float = Field(1e-5, gt=0)
    attention: Literal["sdpa", "flash", "flex", "eager"] = "sdpa"
    fused_ops: Literal["none", "liger"] = "none"  # liger: Liger-Kernel RMSNorm/SwiGLU/RoPE (CUDA, the `gpu` extra)
    init_std: float = Field(0.02, gt=0)
    # Architecture switches (defaults: Llama). Checked together in scaletrain/model/variants.py.
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"  # layernorm has a bias iff model.bias
    ffn: Literal["swiglu", "gelu", "relu2"] = "swiglu"  # gelu/relu2: plain up -> act -> down MLP
    qk_norm: bool = False  # a model.norm over each query/key head (head_dim), before RoPE (Qwen3, OLMo-2)
    attention_window: Optional[int] = Field(None, gt=0)  # sliding window: a token sees itself and window-1 before it
    position: Literal["rope", "alibi", "none"] = "rope"
    rope_scaling: Optional[dict[str, Any]] = None  # HF-style {"rope_type": "linear"|"llama3", "factor": ..., ...}
    parallel_block: bool = False  # attention and FFN read the same normed input: x + attn(n(x)) + ffn(n(x))
    bias: bool = False  # biases on every linear layer (and LayerNorm); the output head never has one
    num_labels: int = Field(0, ge=0)  # > 0: sequence-classification head `score` instead of lm_head
    label_names: Optional[list[str]] = None  # a classifier's class names by id (HF id2label); None: LABEL_0, ...

    @model_validator(mode="after")
    def _check_heads(self) -> "ModelConfig":
        """On the section itself, so every model built from it (a growth stage, a grown child) obeys them too."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads ({self.num_heads}) must be a multiple of model.num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2 and self.position == "rope":
            raise ValueError(f"head size hidden_size/num_heads = {self.head_dim} must be even for RoPE; change model.num_heads")
        return self

    @model_validator(mode="after")
    def _check_label_names(self) -> "ModelConfig":
        names = self.label_names
        if names and (len(names) != self.num_labels or len(set(names)) != len(names)):
            raise ValueError(f"model.label_names must name each of the model.num_labels={self.num_labels} classes once "
                             f"(got {names}); or leave it out")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class MixPart(_Section):
    """One source of a data mixture: its windows make up `weight` / (sum of weights) of every step's batch."""
    source: str = Field(min_length=1)
    weight: float = Field(gt=0)
    name: Optional[str] = None  # in val/<name>/loss; default: the source's file or directory name


class MixPhase(_Section):
    """From the step after `at_step` on, these data.mix weights (by name; sources not named keep theirs)."""
    at_step: int = Field(gt=0)
    weights: dict[str, float]


class DataConfig(_Section):
    source: str = "stdlib"
    mix: list[MixPart] = []  # several sources in fixed proportions instead of data.source (scaletrain/data/mixture.py)
    mix_phases: list[MixPhase] = []  # later weights of data.mix (an annealing phase on the best data, say)
    text_field: str = "text"
    tokenizer: Optional[str] = None
    cache_dir: str = "~/.cache/scaletrain/data"
    val_fraction: float = Field(0.02, ge=0, lt=1)
    num_workers: int = Field(0, ge=0)
    tokenizer_sample_lines: int = Field(300_000, gt=0)
    doc_mask: bool = False  # attend only within each document of a packed window; RoPE restarts per document
    format: Literal["text", "prompt_completion", "classification"] = "text"  # prompt_completion: jsonl prompt/completion, loss on completion only; classification: jsonl text/label


class TrainConfig(_Section):
    max_steps: int = Field(300, gt=0)
    seq_len: int = Field(256, gt=0)
    micro_batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-3, gt=0)
    min_lr: float = Field(3e-4, ge=0)
    warmup_steps: int = Field(30, ge=0)
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"  # after warmup (train/schedule.py)
    decay_steps: int = Field(0, ge=0)  # wsd: steps of its final decay to min_lr (0 = the last 20 % after warmup)
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 where matmuls run natively (train/precision.py)
    seed: int = Field(1234, ge=0, lt=2**63)  # 2^64 overflowed torch.manual_seed after data preparation; headroom for seed + rank
    log_every: int = Field(10, gt=0)
    eval_every: int = Field(100, ge=0)
    eval_batches: int = Field(8, gt=0)
    save_every: int = Field(100, ge=0)
    keep_last: int = Field(2, ge=1)
    keep_every: int = Field(0, ge=0)  # checkpoints at multiples of this step are milestones, never pruned (0 = none)
    max_skipped: int = Field(10, ge=1)  # abort after this many consecutive steps with a non-finite loss/grad-norm
    memory_check: bool = True  # refuse at start a config whose estimated memory per rank cannot fit (scaletrain plan)
    threads: int = Field(0, ge=0)
    # FLOP/s of one GPU, or one CPU machine, that train/mfu divides by; 0 = measured at each start (~1 s on CPU)
    peak_flops: float = Field(0.0, ge=0, allow_inf_nan=False)
    compile: bool = False  # torch.compile (inductor) the model: fuses norms, RoPE, SwiGLU, residual adds
    loss_chunk: int = Field(0, ge=0)  # tokens per chunk of the fused head + cross-entropy (0 = full logits)
    # recompute each decoder layer in the backward: autograd keeps every layer's input and one layer's activations
    # instead of all of them, for about one more forward pass of compute (MFU counts model FLOPs, not the recompute)
    activation_checkpointing: bool = False
    # Fine-tuning (scaletrain/train/finetune.py)
    task: Literal["lm", "classify"] = "lm"  # classify: data.format=classification, model.num_labels > 0
    freeze: list[str] = Field(default_factory=list)  # [embeddings, layers.0-5, norm, head]: lr 0, no gradient
    body_lr_scale: float = Field(1.0, ge=0, le=1)  # lr of everything but the output head = lr x this
    early_stop_patience: int = Field(0, ge=0)  # stop after this many evals without improvement (0 = off)
    early_stop_metric: Optional[Literal["val/loss", "val/accuracy", "val/f1"]] = None  # None: val/accuracy (classify) or val/loss


class ZeroConfig(_Section):
    stage: int = Field(2, ge=0, le=3)
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_param: Literal["none", "cpu"] = "none"
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = Field(50_000_000, gt=0)


class InitConfig(_Section):
    """Start a new run from existing weights (fresh optimizer): a checkpoint dir, run dir or HF dir."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)
    from_: Optional[str] = Field(None, alias="from")


class GrowthStage(_Section):
    """One boundary of `growth.schedule`: after optimizer step `at_step`, grow to the model with `set` applied."""

    at_step: int = Field(gt=0)
    set: dict[str, Any]  # {"model.num_layers": 8, ...}: hidden_size, num_heads, num_kv_heads, intermediate_size, num_layers
    depth_method: Optional[Literal["identity", "stack", "interleave"]] = None  # None: growth.depth_method
    insert: Optional[Union[Literal["end", "interleave"], list[int]]] = None  # None: growth.insert
    noise: Optional[float] = Field(None, ge=0, allow_inf_nan=False)  # None: growth.noise


class GrowthConfig(_Section):
    """Staged training: grow the model inside the run (see scaletrain/growth/in_run.py)."""

    schedule: list[GrowthStage] = Field(default_factory=list)
    depth_method: Literal["identity", "stack", "interleave"] = "identity"
    insert: Union[Literal["end", "interleave"], list[int]] = "end"
    width_method: Literal["zero", "copy", "strict"] = "zero"
    noise: float = Field(0.0, ge=0, allow_inf_nan=False)
    optimizer: Literal["grow", "reset"] = "grow"  # Adam moments transformed with the weights, or fresh
    rewarmup_steps: int = Field(0, ge=0)  # linear lr re-warmup after each boundary (the schedule continues)
    seed: int = 0


class Config(_Section):
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    zero: ZeroConfig = ZeroConfig()
    init: InitConfig = InitConfig()
    growth: GrowthConfig = GrowthConfig()
    deepspeed: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_deepspeed(self) -> "Config":
        """The `deepspeed:` mapping may add anything DeepSpeed reads, but not a value scaletrain sets from its own
        keys: checkpoints, resharding, the memory plan and the lr schedule read those, and would disagree."""
        if problem := mapping_problem(self.deepspeed):
            raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _check_shapes(self) -> "Config":
        m, t = self.model, self.train
        if t.seq_len > m.max_seq_len:
            raise ValueError(f"train.seq_len ({t.seq_len}) exceeds model.max_seq_len ({m.max_seq_len}); lower it or raise model.max_seq_len")
        if t.min_lr > t.lr:
            raise ValueError(f"train.min_lr ({t.min_lr}) must not exceed train.lr ({t.lr})")
        from scaletrain.train.schedule import check_schedule

        check_schedule(t)
        if m.vocab_size > 2**31 - 1:
            raise ValueError("model.vocab_size is too large")
        if self.zero.offload_param != "none" and self.zero.stage != 3:
            raise ValueError("zero.offload_param needs zero.stage=3")
        if self.zero.offload_optimizer != "none" and self.zero.stage == 0:
            raise ValueError("zero.offload_optimizer needs zero.stage >= 1")
        if self.train.compile and self.zero.stage == 3:
            raise ValueError("train.compile needs zero.stage <= 2: ZeRO-3's per-module parameter hooks make "
                             "torch.compile recompile on every call (use zero.stage=2, or train.compile=false)")
        if self.data.mix or self.data.mix_phases:
            from scaletrain.data.mix_rules import validate_mix

            validate_mix(self.data)
        if self.data.format == "prompt_completion" and self.data.source == "stdlib":
            raise ValueError("data.format=prompt_completion needs data.source pointing at .jsonl/.parquet files with prompt and completion fields")
        from scaletrain.model.variants import validate_variants

        validate_variants(self)
        if self.growth.schedule:
            from scaletrain.growth.schedule import validate_schedule

            validate_schedule(self)
            layers = [f for f in self.train.freeze if f.startswith("layers.")]
            if layers and any("model.num_layers" in s.set for s in self.growth.schedule):
                raise ValueError(f"train.freeze {layers[0]} with a growth.schedule that adds layers: the layer numbers "
                                 "change at the boundary (identity blocks land among them); freeze layers in a run without "
                                 "depth growth, or grow first (scaletrain grow) and freeze in the child's run")
        return self

    # -- derived values -------------------------------------------------------------------------
    def global_batch_windows(self, world_size: int) -> int:
        """Sequences consumed by one optimizer step across all ranks."""
        return self.train.micro_batch_size * self.train.grad_accum * world_size

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)  # by_alias: init.from, not init.from_

    def fingerprint(self) -> str:
        """Short hash of the whole resolved config (stored in checkpoints for provenance)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# ---- loading ------------------------------------------------------------------------------------


def _closest(name: str, options: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.6)
    if match:
        return f" (did you mean '{prefix}{match[0]}'?)"
    return f" (valid: {', '.join(prefix + o for o in sorted(options))})"


def _model_for(path: tuple) -> Optional[type[BaseModel]]:
    """The pydantic class that owns the mapping at `path` (used to suggest key names)."""
    cls: type[BaseModel] = Config
    for part in path:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return None
        cls = field.annotation
    return cls


def _one_line(err: ValidationError) -> str:
    e = err.errors()[0]
    loc = tuple(e["loc"])
    key = ".".join(str(p) for p in loc)
    if e["type"] == "extra_forbidden":
        owner = _model_for(loc[:-1])
        prefix = ".".join(str(p) for p in loc[:-1]) + "." if len(loc) > 1 else ""
        names = [f.alias or n for n, f in owner.model_fields.items()] if owner else []
        # Match on the last part only: a shared section prefix would make every name look close.
        hint = _closest(str(loc[-1]), names, prefix) if owner else ""
        return f"unknown config key '{key}'{hint}"
    if e["type"] == "value_error":
        return "config: " + str(e["msg"]).removeprefix("Value error, ")
    got = e.get("input")
    return f"config key '{key}': {e['msg']} (got {got!r})"


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['model.num_layers=8', 'train.lr=3e-4'] -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"--set expects key=value, got '{pair}' (e.g. --set train.lr=3e-4)")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key or any(not p for p in key.split(".")):
            raise UserError(f"--set has an empty key in '{pair}'")
        try:
            value = parse_scalar(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        except RecursionError:
            raise UserError(f"--set {key}: the value nests too deeply") from None
        _set_dotted(tree, key, value)
    return tree


def deep_merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def build_config(tree: dict) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise UserError(_one_line(e)) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read YAML (or defaults when path is None), apply `--set` overrides, validate (a config to run with: the
    settings that would quietly do something else are refused too)."""
    tree = read_yaml(path) if path is not None else {}
    tree = deep_merge(tree, parse_overrides(overrides or []))
    cfg = build_config(tree)
    try:
        check_settings_to_run(cfg)
    except ValueError as e:
        raise UserError(f"config: {e}") from None
    return cfg


def check_settings_to_run(cfg: Config) -> None:
    """Rules for the configs users give, not for those saved with runs and checkpoints (build_config reads those:
    a run that trained under older rules must still resume, evaluate and export)."""
    t = cfg.train
    if t.keep_every and (not t.save_every or t.keep_every % t.save_every):
        raise ValueError(f"train.keep_every ({t.keep_every}) must be a multiple of train.save_every ({t.save_every}): "
                         "milestones are kept among the checkpoints that are saved")
    if t.early_stop_patience and cfg.data.val_fraction == 0:
        raise ValueError("train.early_stop_patience needs a validation split: data.val_fraction is 0")
    if problem := fp16_zero_problem(t.precision, cfg.zero.stage):  # refused at start too; plan must not say "fits"
        raise ValueError(problem)
    from scaletrain.model.variants import check_freeze_leaves_something

    check_freeze_leaves_something(cfg)


def fp16_zero_problem(precision: str, zero_stage: int, what: str = "train.precision=fp16") -> str | None:
    """fp16 at ZeRO-0: DeepSpeed 0.19 wraps a plain optimizer in FP16_UnfusedOptimizer, whose step divides the
    gradients by a loss scale that engine.backward never multiplied in: updates ~65536x too small, silently."""
    if precision == "fp16" and zero_stage == 0:
        return (f"{what} with zero.stage=0: DeepSpeed's fp16 path for a plain optimizer unscales gradients it "
                "never scaled (updates ~65536x too small); use zero.stage=1 or higher")
    return None


def config_yaml(cfg: Config) -> str:
    """The text of a saved config.yaml (run dirs, checkpoint dirs): the whole resolved config, in section order."""
    return dump_yaml(cfg.to_dict())


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(config_yaml(cfg))
