"""Reading a config file: YAML, safely, with YAML 1.2's plain scalars and a key written twice refused.

PyYAML follows YAML 1.1, where `seed: 0100` is octal 64, `name: no` is false, `1:30` is 90 and `2026-12-07` a
date; a config means what it shows, so plain scalars resolve as YAML 1.2's core schema says: ints in decimal
(or `0o`/`0x`), `true`/`false` only, everything else not a number is a string.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from scaletrain.errors import UserError


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key written twice in one mapping is an error (YAML keeps the last silently, so a
    second `model:` section at the end of a file replaced the first one whole), and plain scalars as YAML 1.2."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: merged keys may be overridden, as YAML says
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(None, None, "a key must be a plain value (not a list or mapping)",
                                                    key_node.start_mark) from None
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"'{key}' appears twice in one mapping (first at line {seen[key] + 1}); keep one", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)

_BOOL, _INT, _FLOAT, _TIME = (f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "timestamp"))
_UniqueKeyLoader.yaml_implicit_resolvers = {  # PyYAML's own resolvers, less the YAML 1.1 scalars replaced below
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_BOOL, _INT, _FLOAT, _TIME)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
# Underscores between digits stay allowed (`1_000_000`), as PyYAML allowed them.
_SCALARS_12 = [
    (_BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
    (_INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0o[0-7][0-7_]*|0x[0-9a-fA-F][0-9a-fA-F_]*)$"), list("-+0123456789")),
    (_FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9][0-9_]*|[0-9][0-9_]*(?:\.[0-9_]*)?)(?:[eE][-+]?[0-9]+)?"
                        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789.")),
]
for _tag, _regexp, _first in _SCALARS_12:
    _UniqueKeyLoader.add_implicit_resolver(_tag, _regexp, _first)


def _not_a(what: str, node: yaml.ScalarNode) -> yaml.constructor.ConstructorError:
    """An explicit `!!int` / `!!float` on text that is none (`!!int 0b11`): a YAML error with its place, not a
    ValueError from int()."""
    return yaml.constructor.ConstructorError(None, None, f"'{node.value}' is not {what}", node.start_mark)


def _int_yaml12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    try:
        return int(text[2:] if base != 10 else text, base)  # decimal keeps leading zeros decimal: 0100 is 100
    except ValueError:
        raise _not_a("an integer", node) from None


def _float_yaml12(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> float | int:
    """A float, except that a whole number in e-notation without a point (`5e7`, a bucket size) is an int: DeepSpeed
    passes some of its settings to C++ unchecked, where 50000000.0 is not a size."""
    text = loader.construct_scalar(node).replace("_", "")
    try:
        value = yaml.SafeLoader.construct_yaml_float(loader, node)
    except ValueError:
        raise _not_a("a number", node) from None
    if "." not in text and text.lstrip("+-")[:1].isdigit() and abs(value) < 2**63 and value.is_integer():
        return int(value)
    return value


_UniqueKeyLoader.add_constructor(_INT, _int_yaml12)
_UniqueKeyLoader.add_constructor(_FLOAT, _float_yaml12)
# Explicit tags for values no config holds (a date, bytes, a set, ordered pairs) are unknown tags, i.e. YAML
# errors: their values failed later, e.g. a date in the deepspeed: mapping when ds_config.json was written.
for _tag in ("timestamp", "binary", "set", "omap", "pairs"):
    del _UniqueKeyLoader.yaml_constructors[f"tag:yaml.org,2002:{_tag}"]


class _QuotingDumper(yaml.SafeDumper):
    """safe_dump, quoting every string that either YAML 1.1 (PyYAML's safe_load) or YAML 1.2 (read_yaml) would
    read as a number or a boolean: a saved config.yaml given back with --config means the same."""


for _tag, _regexp, _first in _SCALARS_12:
    _QuotingDumper.add_implicit_resolver(_tag, _regexp, _first)


def dump_yaml(tree: dict) -> str:
    return yaml.dump(tree, Dumper=_QuotingDumper, sort_keys=False)


def parse_scalar(raw: str) -> Any:
    """A `--set key=value` value, read as the same value would be in a config file."""
    return yaml.load(raw, Loader=_UniqueKeyLoader)


def read_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        example = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"  # the repo's, from any directory
        example = example if example.is_file() and example.resolve() != p.resolve() else "configs/tiny.yaml"
        raise UserError(f"config file not found: {p} (pass --config with an existing YAML file, e.g. {example})")
    try:
        data = yaml.load(p.read_text(), Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"config file {p} is not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {p} is not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"cannot read config file {p} ({e.strerror or e})") from None
    except RecursionError:
        raise UserError(f"config file {p} nests too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping of sections (run, model, data, train, zero), not {type(data).__name__}")
    return data
