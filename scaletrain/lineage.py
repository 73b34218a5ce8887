"""Lineage: every checkpoint and export says what it is, where it came from and how it was made.

`lineage.json` (in checkpoint dirs, HF exports, each training checkpoint tag and the run dir):
    id             content id: sha256 of the weights (per-tensor hashes of name, dtype, shape, bytes; see
                   weights/writer.py). Training checkpoints hash the parameters as training holds them
                   (compute dtype, gathered under ZeRO-3): the same id at any ZeRO stage or world size
    kind           pre-train | fine-tune | import-hf | grow | export
    parents        [{id, kind, path}]: what it was made from (path as it was then; `scaletrain lineage`
                   follows it across run dirs, checkpoint dirs and HF dirs)
    config_diff    {dotted key: [parent value, value]} against the parent's config (pre-train: the defaults)
    model          the model config section
    steps, tokens  optimizer steps and training tokens of the run that made it (carried over by exports)
    data           {source, fingerprint, format} of the training data, val_loss the last validation loss
    date, scaletrain_version, path
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Optional

from scaletrain import __version__

LINEAGE = "lineage.json"
FORMAT = 1


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def config_diff(parent: Optional[dict], child: dict) -> dict[str, list]:
    """{dotted key: [parent value, child value]} for every key that differs (None where absent). A key the
    parent's config lacks because an older scaletrain wrote it (a setting added since) is no change while the
    child keeps its default."""
    from scaletrain.config import Config

    a, b = flatten(parent or {}), flatten(child)
    defaults = flatten(Config().to_dict()) if parent else {}
    return {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])}


def make(kind: str, content_id: str, parents: list[dict], model: dict, config_diff: Optional[dict] = None,
         steps: Optional[int] = None, tokens: Optional[int] = None, data: Optional[dict] = None,
         val_loss: Optional[float] = None, path: Optional[Path] = None, **extra) -> dict:
    return {
        "format": FORMAT, "id": content_id, "kind": kind, "parents": parents, "config_diff": config_diff or {},
        "model": model, "steps": steps, "tokens": tokens, "data": data, "val_loss": val_loss,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "scaletrain_version": __version__,
        "path": str(Path(path).resolve()) if path else None, **extra,
    }


def parent_ref(path: Path, record: Optional[dict], kind: str = "hf", content_id: Optional[str] = None) -> dict:
    """How a child names its parent: the parent's own id when it has lineage, else what we know."""
    if record:
        return {"id": record.get("id"), "kind": record.get("kind"), "path": str(Path(path).resolve())}
    return {"id": content_id, "kind": kind, "path": str(Path(path).resolve())}


def read(path: str | Path) -> Optional[dict]:
    """lineage.json of a dir (run dir, tag dir, checkpoint dir, HF dir), or the file itself."""
    p = Path(path)
    p = p / LINEAGE if p.is_dir() else p
    try:
        data = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return None
    return data if _well_formed(data) else None


def _well_formed(rec) -> bool:
    """The fields the tree prints have the types it prints them as (a hand-edited or foreign record that does
    not is "damaged", one line, instead of a traceback half-way through the tree)."""
    def opt(v, *types):
        return v is None or (isinstance(v, types) and not isinstance(v, bool))

    if not isinstance(rec, dict) or not isinstance(rec.get("kind"), str):
        return False
    if not all(opt(rec.get(k), str) for k in ("id", "path", "date")) or not all(
            opt(rec.get(k), int) for k in ("steps", "tokens")) or not opt(rec.get("val_loss"), int, float):
        return False
    if not all(opt(rec.get(k), dict) for k in ("model", "data", "config_diff")):
        return False
    if any(not (isinstance(v, (list, tuple)) and len(v) == 2) for v in (rec.get("config_diff") or {}).values()):
        return False
    parents = rec.get("parents")
    return opt(parents, list) and all(isinstance(q, dict) and all(opt(q.get(k), str) for k in ("id", "path", "kind"))
                                      for q in parents or [])


def _why_unread(path: Path) -> str:
    """Why `read(path)` gave None: the file is missing, or there but not a lineage record."""
    p = path / LINEAGE if path.is_dir() else path
    return f"damaged {LINEAGE}" if p.is_file() else f"no {LINEAGE}"


def dumps(record: dict) -> str:
    return json.dumps(record, indent=1, default=str)


def write(directory: Path, record: dict) -> None:
    from scaletrain.durable import write_text_atomic

    write_text_atomic(Path(directory) / LINEAGE, dumps(record))


# ---- the family tree -----------------------------------------------------------------------------


def _summary(rec: dict) -> str:
    bits = []
    if rec.get("steps") is not None:
        bits.append(f"{rec['steps']:,} steps")
    if rec.get("tokens") is not None:
        bits.append(f"{rec['tokens']:,} tokens")
    if rec.get("val_loss") is not None:
        bits.append(f"val loss {rec['val_loss']:.4f}")
    data = rec.get("data") or {}
    if data.get("fingerprint"):
        bits.append(f"data {data['fingerprint']} ({data.get('format', 'text')})")
    m = rec.get("model") or {}
    if m:
        bits.append(f"{m.get('num_layers')}L d{m.get('hidden_size')} {m.get('num_heads')}/{m.get('num_kv_heads')} heads")
    return " · ".join(bits)


def _diff_line(rec: dict, limit: int = 6) -> str:
    skip = ("run.dir", "data.cache_dir")
    items = [(k, v) for k, v in (rec.get("config_diff") or {}).items() if k not in skip]
    if not items:
        return ""
    text = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in items[:limit])
    return "config: " + text + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def tree_lines(path: str | Path, max_depth: int = 32) -> list[str]:
    """The lineage of `path` as lines: the node itself, then its parents indented below it."""
    lines: list[str] = []

    def node(rec: Optional[dict], ref: dict, prefix: str, last: bool, depth: int, seen: set) -> None:
        branch = "" if depth == 0 else ("└── " if last else "├── ")
        child_prefix = prefix + ("" if depth == 0 else ("    " if last else "│   "))
        if rec is None:
            where = ref.get("path") or "?"
            state = "not found" if not Path(where).exists() else _why_unread(Path(where))
            lines.append(f"{prefix}{branch}{ref.get('kind') or '?'} {(ref.get('id') or '-')[:16]}  {where}  ({state})")
            return
        lines.append(f"{prefix}{branch}{rec.get('kind')} {(rec.get('id') or '-')[:16]}  {rec.get('path') or ref.get('path')}  {(rec.get('date') or '')[:16]}")
        detail = child_prefix + ("│   " if rec.get("parents") else "    ")
        for extra in (_summary(rec), _diff_line(rec)):
            if extra:
                lines.append(detail + extra)
        if ref.get("id") and rec.get("id") and ref["id"] != rec["id"]:
            lines.append(detail + f"(changed since: the child recorded id {ref['id'][:16]})")
        # A loop revisits the same record; the id alone is not enough: an export of unchanged weights has
        # its parent's id (same tensors, same hash) yet is another node.
        key = (rec.get("id"), str(rec.get("path") or ref.get("path")))
        if key in seen or depth >= max_depth:
            if rec.get("parents"):  # say why the walk stops here, so a cut tree does not read as the whole one
                lines.append(detail + ("(loop: this record was already shown above; its parents are not repeated)"
                                       if key in seen else f"(deeper than {max_depth} generations: parents not shown)"))
            return
        parents = rec.get("parents") or []
        for i, parent in enumerate(parents):
            p = parent.get("path")
            node(read(p) if p else None, parent, child_prefix, i == len(parents) - 1, depth + 1, seen | {key})

    root = Path(path)
    rec = read(root)
    if rec is None:
        from scaletrain.errors import UserError

        if _why_unread(root) != f"no {LINEAGE}":
            raise UserError(f"{root / LINEAGE if root.is_dir() else root} is damaged (not a lineage record); restore it "
                            "from a copy, or give another checkpoint")
        if not root.exists():
            raise UserError(f"{root} does not exist; give a checkpoint dir, run dir, checkpoint tag or export made by scaletrain")
        raise UserError(f"{root} has no lineage.json (give a checkpoint dir, run dir, checkpoint tag or export made by scaletrain)")
    node(rec, {"path": str(root)}, "", True, 0, set())
    return lines
