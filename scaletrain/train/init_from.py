"""`init.from`: start a new run from existing weights (fine-tuning, continued pre-training).

Weights only: the optimizer, schedule and data position start fresh. The checkpoint's tokenizer becomes
`data.tokenizer` when that is unset, so the data is tokenised exactly as the model was trained. A run dir
that already has checkpoints resumes from them instead (what a requeued job needs).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from scaletrain.config import Config
from scaletrain.errors import UserError, heard_elsewhere

# Keys that decide the tensors' shapes: any difference is an error.
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size", "tie_word_embeddings",
              "norm", "ffn", "qk_norm", "parallel_block", "bias")
# Keys that change the function but not the shapes (e.g. a longer context): allowed, with a warning.
SOFT_KEYS = ("rope_theta", "norm_eps", "max_seq_len", "rope_scaling", "attention_window", "position")


def resolve(cfg: Config, warn=lambda msg: print(msg, file=sys.stderr)) -> Config:
    """Check init.from against the model config (before any data work) and fill in data.tokenizer."""
    if not cfg.init.from_:
        return cfg
    from scaletrain.weights import open_weights

    try:
        src = open_weights(cfg.init.from_)
    except UserError as e:
        if not _has_checkpoints(cfg):
            raise UserError(f"init.from: {e}") from None
        return _resume_without_source(cfg, str(e), warn)
    diffs = [f"model.{k}: checkpoint {getattr(src.model, k)}, config {getattr(cfg.model, k)}"
             for k in SHAPE_KEYS if getattr(src.model, k) != getattr(cfg.model, k)]
    if diffs:
        hint = f"--config {src.path}/config.yaml" if src.kind == "checkpoint" else "the checkpoint's model settings"
        raise UserError(f"init.from {src.path} does not match the model config: {'; '.join(diffs)}; start from {hint}")
    for k in SOFT_KEYS:
        if getattr(src.model, k) != getattr(cfg.model, k):
            warn(f"warning: init.from: model.{k} changes from {getattr(src.model, k)} to {getattr(cfg.model, k)}")
    if src.model.label_names and not cfg.model.label_names and src.model.num_labels == cfg.model.num_labels:
        cfg = cfg.model_copy(deep=True)  # the classes keep their names through the fine-tune (and its export)
        cfg.model.label_names = list(src.model.label_names)
    if cfg.data.tokenizer is None and src.tokenizer is not None:
        cfg = cfg.model_copy(deep=True)
        cfg.data.tokenizer = str(src.tokenizer.resolve())
    elif cfg.data.tokenizer is None and not _has_checkpoints(cfg):
        # else a new tokenizer would be trained: the pretrained embeddings would meet ids that mean other pieces
        raise UserError(f"init.from {src.path} has no tokenizer (no tokenizer/ copy or tokenizer files); set "
                        "data.tokenizer to the tokenizer that model was trained with")
    return cfg


def _has_checkpoints(cfg: Config) -> bool:
    """Whether run.dir already holds a saved tag (then a start resumes it and needs no init.from weights)."""
    from scaletrain.train import checkpoint

    root = Path(cfg.run.dir).expanduser() / "checkpoints"
    return any((root / tag / checkpoint.MANIFEST).is_file() for _, tag in checkpoint.tags_by_step(root))


def _resume_without_source(cfg: Config, problem: str, warn) -> Config:
    """A fine-tune whose base model was deleted (a purged scratch dir, a requeue days later) still resumes: its
    checkpoints hold every weight, and the run dir keeps a copy of the tokenizer the data was tokenised with."""
    from scaletrain.weights.sources import checkpoint_tokenizer

    run_dir = Path(cfg.run.dir).expanduser()
    warn(f"warning: init.from: {problem}; resuming {run_dir} from its own checkpoints (they hold all the weights)")
    source = Path(cfg.init.from_).expanduser().absolute()
    named = Path(cfg.data.tokenizer).expanduser().absolute() if cfg.data.tokenizer else None
    # (run.dir/config.yaml names the source's tokenizer: a file under it, or the HF dir itself)
    if named is None or (not named.exists() and {source, source.resolve()} & {named, *named.parents}):
        tok = checkpoint_tokenizer(run_dir)
        if tok is None:
            raise UserError(f"init.from: {problem}, and run.dir {run_dir} has no tokenizer/ copy to resume with; "
                            f"restore init.from or set data.tokenizer to the tokenizer the run was trained with")
        cfg = cfg.model_copy(deep=True)
        cfg.data.tokenizer = str(tok.resolve())
    return cfg


_PINNED: list = []  # rank 0's read lock on the pinned tag of a run that may still be training


def release_pinned() -> None:
    """After every rank has loaded init.from's weights: the parent run may prune that tag again."""
    for lock in _PINNED:
        if lock is not None:
            lock.release()
    _PINNED.clear()


def pinned_source(cfg: Config, dist) -> Path:
    """Collective: init.from as one directory for every rank. A run dir may still be training (saving new tags,
    pruning old ones) while the ranks read it: it becomes the tag rank 0 finds newest, so all ranks load the
    same checkpoint, and rank 0 holds it against pruning until `release_pinned`."""
    from scaletrain.train.distributed import main_rank_does

    def pick() -> tuple:  # (hashes the checkpoint's files: minutes for a large one, while the others wait)
        from scaletrain.weights import open_weights

        try:
            src = open_weights(cfg.init.from_)
            _PINNED.append(src.read_lock)  # the tag stays until every rank has loaded it (release_pinned)
            return ("ok", str(src.weights_at if src.kind == "run" else cfg.init.from_))
        except UserError as e:
            return ("error", f"init.from: {e}")

    out: list = [main_rank_does(pick)]
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.broadcast_object_list(out, src=0)
    kind, value = out[0]
    if kind == "error":  # rank 0's verdict, on every rank: rank 0 prints it
        raise heard_elsewhere(UserError(value), not dist.is_main)
    return Path(value)


def load_weights(model: torch.nn.Module, source: Path) -> None:
    """Copy the weights in `source` (init.from, pinned) into `model` (before DeepSpeed wraps it); mismatching
    keys -> one line."""
    from scaletrain.weights import load_into, open_weights

    src = open_weights(source)
    if getattr(model, "score", None) is not None and not src.model.num_labels:  # classifier from a language model
        from scaletrain.train.finetune import load_body

        return load_body(model, src)
    load_into(model, src, "init.from")
