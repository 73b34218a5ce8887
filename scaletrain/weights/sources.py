"""Recognise where a model lives and open it as a `WeightSource` (see `scaletrain.weights` for the API)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
import yaml

from scaletrain.config import Config, ModelConfig, build_config
from scaletrain.data.hf_tokenizer import tokenizer_files
from scaletrain.checkpoint_names import MANIFEST
from scaletrain.errors import UserError
from scaletrain.tag_lock import read_lock
from scaletrain.weights import files as wfiles
from scaletrain.weights.files import EMBED, HEAD
from scaletrain.weights.zero import ZeroTag

CONFIG_YAML = "config.yaml"
LINEAGE = "lineage.json"
TOKENIZER_DIR = "tokenizer"


@dataclass
class WeightSource:
    path: Path
    kind: str  # "checkpoint" | "hf" | "run" | "deepspeed"
    model: ModelConfig
    config: Optional[Config] = None  # the full scaletrain config, when the source has one
    tokenizer: Optional[Path] = None  # a sentencepiece .model file or an HF tokenizer directory
    lineage: Optional[dict] = None
    weights_at: Optional[Path] = None  # the directory the tensors are read from (a tag dir for runs)
    _files: list[Path] = field(default_factory=list)
    _zero: Optional[ZeroTag] = None
    adapter: Optional[object] = None  # HF dirs of other architectures: their names -> ours (hf/arch_map.py)
    read_lock: Optional[object] = None  # a run's tag: held against its trainer's pruning while this object lives

    def specs(self) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """(name, shape, dtype) in the order `tensors()` yields them; reads no tensor data."""
        if self._zero is not None:
            return [(n, s, torch.float32) for n, s in self._zero.specs()]
        tied = self.model.tie_word_embeddings
        specs = [s for s in wfiles.file_specs(self._files) if not (tied and s[0] == HEAD)]
        return self.adapter.specs(specs) if self.adapter is not None else specs

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF key, tensor) one at a time: fp32 masters for DeepSpeed checkpoints, stored dtype otherwise.
        A tied model yields no lm_head.weight. Tensors may be memory-mapped: copy what you keep."""
        if self._zero is not None:
            return self._zero.tensors()
        tensors = wfiles.file_tensors(self._files, frozenset({HEAD}) if self.model.tie_word_embeddings else frozenset())
        return self.adapter.tensors(tensors) if self.adapter is not None else tensors


def expected_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """HF key -> shape of every tensor a model with this config has (tied: without lm_head.weight)."""
    from scaletrain.model.classify import build_model
    from scaletrain.model.llama import LlamaShape

    with torch.device("meta"):
        model = build_model(LlamaShape.from_config(m))  # a classifier has score.weight instead of lm_head
    return {n: tuple(t.shape) for n, t in model.state_dict().items() if not (m.tie_word_embeddings and n == HEAD)}


def shape_problems(specs: list[tuple[str, tuple, torch.dtype]], expected: dict[str, tuple]) -> list[str]:
    """Human-readable differences between stored tensors and a config's tensors (empty: they match)."""
    have = {n: s for n, s, _ in specs}
    out = [f"{n}: stored {list(have[n])} vs config {list(s)}" for n, s in expected.items() if n in have and have[n] != s]
    out += [f"missing {n}" for n in expected if n not in have]
    out += [f"unexpected {n}" for n in have if n not in expected]
    return out


def summarise(problems: list[str], limit: int = 3) -> str:
    more = f" (+{len(problems) - limit} more)" if len(problems) > limit else ""
    return "; ".join(problems[:limit]) + more


def _read_yaml_config(p: Path) -> Config:
    try:
        return build_config(yaml.safe_load(p.read_text()) or {})
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise UserError(f"{p} is not valid YAML ({type(e).__name__})") from None


def read_lineage(d: Path) -> Optional[dict]:
    p = d / LINEAGE
    if not p.is_file():
        return None
    try:
        data = json.loads(p.read_text())
        return data if isinstance(data, dict) else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None


def checkpoint_tokenizer(d: Path) -> Optional[Path]:
    """`tokenizer/` of a checkpoint dir: our sentencepiece file, or an HF tokenizer directory."""
    t = d / TOKENIZER_DIR
    if not t.is_dir():
        return None
    if (t / "tokenizer_config.json").is_file() or (t / "tokenizer.json").is_file():
        return t
    return t / "tokenizer.model" if (t / "tokenizer.model").is_file() else None


def _open_checkpoint_dir(d: Path, verify_files: bool = True) -> WeightSource:
    if verify_files and (d / MANIFEST).is_file():  # (dirs written before 2026-12-08 have none)
        from scaletrain.manifest import verify

        problem = verify(d)
        if problem is not None:
            raise UserError(f"{problem}: restore {d} or make it again (grow / import-hf); to use its files as they "
                            f"are, delete {d / MANIFEST}")
    cfg = _read_yaml_config(d / CONFIG_YAML)
    return WeightSource(d, "checkpoint", cfg.model, cfg, checkpoint_tokenizer(d), read_lineage(d), d, wfiles.weight_files(d))


def _check_tied_head(d: Path, files: list[Path]) -> None:
    """A config that ties the head to the embedding, with weights that store a different lm_head.weight: which
    one is meant is unknown (transformers 5 uses the stored one), and dropping it changed every logit."""
    names = {n for n, _, _ in wfiles.file_specs(files)}
    if HEAD in names and EMBED in names:
        reader = wfiles.FileReader(files, tied=False)
        if not torch.equal(reader.read(HEAD), reader.read(EMBED)):
            raise UserError(f"{d}: config.json ties the output head to the embedding (tie_word_embeddings) but the "
                            "weights store a different lm_head.weight; set tie_word_embeddings to false in config.json "
                            "to keep that head, or remove lm_head.weight to use the embedding")


def _open_hf_dir(d: Path) -> WeightSource:
    from scaletrain.hf.arch_map import import_plan, peeker
    from scaletrain.hf.arch_config import read_hf_config

    m, adapter = import_plan(read_hf_config(d), str(d), peeker(d))  # Llama, Qwen3, Starcoder2, ... (names mapped)
    files = wfiles.weight_files(d)
    if m.tie_word_embeddings:
        _check_tied_head(d, files)
    has_tok = bool(tokenizer_files(d))
    return WeightSource(d, "hf", m, None, d if has_tok else None, read_lineage(d), d, files, adapter=adapter)


def _run_tokenizer(run: Path, cfg: Config) -> Optional[Path]:
    """The tokenizer a run trained with: the copy in the run dir, else its data cache's."""
    own = checkpoint_tokenizer(run)
    if own is not None:
        return own
    try:
        from scaletrain.data.cache import find_cache

        cache = find_cache(cfg)
    except UserError:
        return None
    for name in ("tokenizer.model", TOKENIZER_DIR):
        if (cache / name).exists():
            return cache / name
    return None


def _tag_model(tag: Path) -> Optional[ModelConfig]:
    """The model a tag was saved with (its manifest records it): after growth inside a run, the run's config.yaml
    names the grown model, while the tags before the boundary (the parent `scaletrain lineage` names) hold the
    smaller one. None for manifests from before they recorded it."""
    from scaletrain.manifest import read_manifest

    try:
        return ModelConfig.model_validate(read_manifest(tag)["model"])
    except (OSError, ValueError, KeyError, TypeError):  # (pydantic's ValidationError is a ValueError)
        return None


def _newest_good_tag(run: Path) -> tuple[Path, object]:
    """(the run's newest tag that verifies, the read lock held on it). The run may be training meanwhile: a tag it
    prunes while this looks is skipped, and a look that found nothing but pruned tags is made again."""
    from scaletrain.train.checkpoint import find_resumable, tags_by_step, verify

    root = run / "checkpoints"
    for _ in range(5):
        skipped: list[str] = []
        held: dict[str, object] = {}
        tag = find_resumable(root, log=skipped.append, hold=lambda t: held.setdefault(t.name, read_lock(t)) is not None)
        if tag is not None:
            for line in skipped:
                print(line, file=sys.stderr)
            return root / tag, held[tag]
        tags = tags_by_step(root)
        if not tags:
            raise UserError(f"run dir {run} has no checkpoint yet (its run saves one every train.save_every steps)")
        reason = verify(root / tags[0][1])
        if reason is not None:  # all damaged (or incomplete): why the newest fails, not a fallback that did not happen
            raise UserError(f"run dir {run} has checkpoints but none passes verification ({reason}); restore the "
                            "damaged files from a copy")
    raise UserError(f"run dir {run}: its checkpoints were replaced faster than they could be read; run the command again")


def _open_tag(tag: Path, run: Optional[Path], kind: str, lock: object = None) -> WeightSource:
    cfg = _read_yaml_config(run / CONFIG_YAML) if run is not None and (run / CONFIG_YAML).is_file() else None
    if cfg is None:
        raise UserError(f"{tag} is a DeepSpeed checkpoint without its run's config.yaml (expected in {run}); give the run directory")
    saved = _tag_model(tag)
    if saved is not None and saved.label_names is None and saved.num_labels == cfg.model.num_labels:
        saved = saved.model_copy(update={"label_names": cfg.model.label_names})  # (older manifests lack them)
    if saved is not None and saved != cfg.model:
        cfg = cfg.model_copy(update={"model": saved})
    lineage = read_lineage(tag) or (read_lineage(run) if run else None)
    zero = ZeroTag(tag, cfg.model.tie_word_embeddings)
    return WeightSource(tag, kind, cfg.model, cfg, _run_tokenizer(run, cfg), lineage, tag, _zero=zero, read_lock=lock)


def open_weights(path: str | Path, verify_files: bool = True) -> WeightSource:
    """A run dir (its newest verified checkpoint), a DeepSpeed tag dir, a scaletrain checkpoint dir or an HF dir.
    `verify_files=False`: files this run wrote moments ago (a growth stage) or verified already (a resharded
    resume): every rank hashing a grown child, moments included, at each boundary cost minutes at scale."""
    d = Path(path).expanduser()
    if not d.exists():
        raise UserError(f"{d} does not exist; give a run dir, a checkpoint dir or a Hugging Face model dir")
    if not d.is_dir():
        raise UserError(f"{d} is not a directory; give a checkpoint, run or Hugging Face model directory")
    if (d / CONFIG_YAML).is_file() and not (d / "checkpoints").is_dir() and any(d.glob("*.safetensors")):
        return _open_checkpoint_dir(d, verify_files)
    if (d / "config.json").is_file():
        return _open_hf_dir(d)
    if (d / "checkpoints").is_dir() or ((d / CONFIG_YAML).is_file() and (d / "status.json").is_file()):
        tag, lock = _newest_good_tag(d)
        src = _open_tag(tag, d, "run", lock)
        src.path = d
        return src
    if any(d.glob("*model_states.pt")):
        from scaletrain.manifest import verify

        run = d.parent.parent if d.parent.name == "checkpoints" else None
        lock = read_lock(d) if run is not None else None  # a run still training must not prune it under us
        if run is not None and lock is None:
            raise UserError(f"checkpoint {d} was just deleted by its run (train.keep_last); give the run dir for its "
                            "newest checkpoint, or keep milestones with train.keep_every")
        damaged = verify(d) if verify_files else None  # what resuming checks for every tag; named directly, no fallback
        if damaged:
            raise UserError(f"checkpoint {d} is not usable: {damaged}; give its run dir to use the newest good checkpoint")
        return _open_tag(d, run, "deepspeed", lock)
    if (d / CONFIG_YAML).is_file():
        raise UserError(f"{d} has a config.yaml but no model.safetensors; the checkpoint is incomplete")
    raise UserError(f"{d} is not a model: no config.json (Hugging Face), config.yaml + model.safetensors "
                    "(scaletrain checkpoint) or checkpoints/ (run dir)")
