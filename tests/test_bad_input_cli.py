"""Users' mistakes through the real CLI (a subprocess): exit code 2, one `error:` line on stderr, no
traceback, and nothing created or changed on disk (run dir, data dir, cache dir, working dir)."""

from __future__ import annotations

import json
import shutil
import sysconfig
from pathlib import Path
from typing import Callable

import pytest

from bad_input_harness import check_refusal, run_cases
from launch_utils import REPO

TINY_YAML = str(REPO / "configs" / "tiny.yaml")
# Small enough that, should a case wrongly get past validation, it finishes quickly (and the snapshot catches it).
SMALL = ["model.hidden_size=64", "model.num_layers=1", "model.num_heads=4", "model.num_kv_heads=2",
         "model.intermediate_size=128", "model.vocab_size=512", "model.max_seq_len=128", "train.seq_len=32",
         "train.micro_batch_size=1", "train.max_steps=1", "train.precision=fp32", "train.save_every=0",
         "train.eval_every=0", "train.warmup_steps=0"]
A_STDLIB_FILE = Path(sysconfig.get_paths()["stdlib"]) / "heapq.py"


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def _good_data(tmp: Path) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    shutil.copyfile(A_STDLIB_FILE, d / "heapq.txt")
    return d


def _args(cmd: str, tmp: Path, *extra: str, source: Path | None = None, config: str = TINY_YAML) -> list[str]:
    source = _good_data(tmp) if source is None else source
    return [cmd, "--config", config, "--set", *SMALL, f"run.dir={tmp / 'run'}",
            f"data.cache_dir={tmp / 'cache'}", f"data.source={source}", *(["--set", *extra] if extra else [])]


def train(tmp: Path, *extra: str, **kw) -> list[str]:
    return _args("train", tmp, *extra, **kw)


def prep(tmp: Path, *extra: str, **kw) -> list[str]:
    return _args("prepare-data", tmp, *extra, **kw)


# ---- the cases: each builds its inputs under tmp and returns (argv, a word the message must contain) ----

def c_missing_config(tmp):
    return ["train", "--config", str(tmp / "nope.yaml")], "nope.yaml"


def c_yaml_syntax(tmp):
    cfg = _write(tmp / "bad.yaml", "model:\n  hidden_size: 64\n  num_heads: [4\ntrain:\n  lr: 1\n")
    return train(tmp, config=str(cfg)), ("bad.yaml", "line 4")


def c_unknown_key(tmp):
    return train(tmp, "model.hiden_size=64"), ("'model.hiden_size'", "'model.hidden_size'")


def c_wrong_type(tmp):
    return train(tmp, "model.hidden_size=abc"), "model.hidden_size"


def c_impossible_shape(tmp):
    return train(tmp, "model.num_heads=3"), "model.num_heads"


def c_negative_lr(tmp):
    return train(tmp, "train.lr=-1e-3"), "train.lr"


def c_seq_len_zero(tmp):
    return train(tmp, "train.seq_len=0"), "train.seq_len"


def c_prepare_bad_config(tmp):
    return prep(tmp, "model.vocab_size=8"), "model.vocab_size"


def c_missing_data_path_train(tmp):
    return train(tmp, source=tmp / "missing"), "matches no files"


def c_missing_data_path(tmp):
    return prep(tmp, source=tmp / "missing"), "matches no files"


def c_empty_data_dir(tmp):
    (tmp / "empty").mkdir()
    return prep(tmp, source=tmp / "empty"), "matches no files"


def c_empty_data_file(tmp):
    return prep(tmp, source=_write(tmp / "data" / "empty.txt", b"")), "empty"


def c_binary_file(tmp):
    d = _good_data(tmp)
    _write(d / "blob.txt", bytes(range(256)) * 8)
    return prep(tmp, source=d), "blob.txt"


def c_non_utf8(tmp):
    d = _good_data(tmp)
    _write(d / "latin1.txt", "caf\u00e9 cr\u00e8me br\u00fbl\u00e9e\n".encode("latin-1"))
    return prep(tmp, source=d), "latin1.txt"


def c_jsonl_bad_line(tmp):
    f = _write(tmp / "data" / "rows.jsonl", '{"text": "def f():\\n    return 1\\n"}\n{"text": "oops\n{"text": "x"}\n')
    return prep(tmp, source=f), "rows.jsonl:2"


def c_jsonl_missing_field(tmp):
    f = _write(tmp / "data" / "rows.jsonl", '{"body": "def f():\\n    return 1\\n"}\n')
    return prep(tmp, source=f), "text"


def c_bad_tokenizer_file(tmp):
    tok = _write(tmp / "garbage.model", b"this is not a sentencepiece model")
    return prep(tmp, f"data.tokenizer={tok}"), "garbage.model"


def c_vocab_too_big_for_corpus(tmp):
    one = _write(tmp / "data" / "one.txt", "x = 1\ny = 2\n")
    return prep(tmp, "model.vocab_size=4000", source=one), ("vocab_size", "<=")


def c_run_dir_under_file(tmp):
    f = _write(tmp / "a_file", "not a dir")
    return train(tmp, f"run.dir={f / 'run'}"), "run.dir"


def c_run_dir_other_model(tmp):
    from scaletrain.config import load_config, save_config

    run = tmp / "run"
    run.mkdir()
    other = load_config(TINY_YAML, [*SMALL, "model.hidden_size=128"])
    save_config(other, run / "config.yaml")
    _write(run / "status.json", json.dumps({"state": "finished", "step": 7}))
    return train(tmp), "different model"


def c_run_dir_cannot_be_created(tmp):
    return train(tmp, "run.dir=/proc/scaletrain-run"), ("run.dir", "/proc/scaletrain-run")


def c_flash_attention_without_cuda(tmp):
    return train(tmp, "model.attention=flash"), "model.attention=flash"


def c_run_dir_damaged_config(tmp):
    _write(tmp / "run" / "config.yaml", "model: {hidden_size: [\n")
    return train(tmp), "config.yaml"


def c_unknown_flag(tmp):
    return ["train", "--config", TINY_YAML, "--bogus"], "--bogus"


def c_missing_subcommand(tmp):
    return [], "command"


def c_unknown_subcommand(tmp):
    return ["fly"], "fly"


CASES: dict[str, Callable] = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    roots = {name: tmp_path_factory.mktemp(name) for name in CASES}
    # The one case that reaches DeepSpeed start-up (a data error found after it) is the slowest: start it first.
    return run_cases(CASES, roots, first=lambda name: name == "missing_data_path_train")


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, results):
    check_refusal(results[case].result())
