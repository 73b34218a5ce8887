"""generation_config.json through import, fine-tunes, growth and export.

A Hugging Face model's generation_config.json holds what `generate()` does by default: its stop tokens (often
several: Llama-3.1-Instruct stops on <|end_of_text|>, <|eom_id|> and <|eot_id|>) and its sampling settings.
`import-hf` keeps the file in the checkpoint dir and every checkpoint dir made from one (grow) keeps it too; a
run started with `init.from` finds it by following init.from back. `export-hf` writes it back, with our bos/eos
ids included; a model that never had one gets plain greedy defaults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import yaml

GENERATION_CONFIG = "generation_config.json"
MAX_HOPS = 16  # init.from chains longer than this are not followed (a loop, or an unusual family tree)


def _read(d: Path) -> Optional[dict]:
    try:
        data = json.loads((d / GENERATION_CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _init_from(d: Path) -> Optional[Path]:
    """The init.from of the config.yaml in d (a run dir or a checkpoint dir), if any."""
    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        source = cfg.get("init", {}).get("from")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None
    return Path(source).expanduser() if isinstance(source, str) and source else None


def find(start: Path) -> Optional[dict]:
    """The generation settings that belong to the model in `start` (a checkpoint, run, tag or HF dir):
    its own file, else the one its init.from (and theirs) had."""
    d: Optional[Path] = start
    seen = set()
    for _ in range(MAX_HOPS):
        if d is None or d in seen:
            return None
        seen.add(d)
        found = _read(d)
        if found is not None:
            return found
        if d.parent.name == "checkpoints":  # a tag: its run dir holds config.yaml
            d = d.parent.parent
            continue
        d = _init_from(d)
    return None


def keep(start: Path, dest: Path) -> None:
    """Into `dest` (a checkpoint dir being written): the generation settings of the model in `start`, if any."""
    found = find(start)
    if found is not None:
        (dest / GENERATION_CONFIG).write_text(json.dumps(found, indent=2))


def for_export(found: Optional[dict], bos: Optional[int], eos: int, transformers_version: str) -> dict:
    """generation_config.json of an export: the source's settings (sampling, extra stop tokens) with our bos and
    eos ids in them, else greedy decoding that stops at eos."""
    if found is None:
        return {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False, "transformers_version": transformers_version}
    theirs = found.get("eos_token_id")
    stops = theirs if isinstance(theirs, list) else ([theirs] if isinstance(theirs, int) else [])
    stops = stops if eos in stops else [eos, *stops]
    return {**found, "bos_token_id": bos, "eos_token_id": stops[0] if len(stops) == 1 else stops,
            "transformers_version": transformers_version}
