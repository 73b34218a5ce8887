"""Odd and damaged files on disk: unreadable, nested beyond reason, a directory where a file belongs, outputs
that would land where they must not. CLI cases keep the bad-input contract (bad_input_harness); the checks that
need a trained run or a crafted checkpoint are called directly."""

from __future__ import annotations

import json
import os
from typing import Callable

import pytest

from bad_input_harness import check_refusal, run_cases
from test_bad_input_cli import TINY_YAML, _good_data, _write, prep, train

UNREADABLE = "/proc/self/mem"  # read() fails with EIO, even for root (for whom chmod 000 changes nothing)


def c_unreadable_config(tmp):
    (tmp / "c.yaml").symlink_to(UNREADABLE)
    return ["plan", "--config", str(tmp / "c.yaml")], ("cannot read config file", "c.yaml")


def c_unreadable_data_file(tmp):
    data = _good_data(tmp)
    (data / "zz.txt").symlink_to(UNREADABLE)
    return prep(tmp, source=data), ("cannot read data file", "zz.txt")


def c_unreadable_jsonl_file(tmp):
    data = _good_data(tmp)
    (data / "rows.jsonl").symlink_to(UNREADABLE)
    return prep(tmp, source=data), ("cannot read data file", "rows.jsonl")


def c_config_nested_beyond_reason(tmp):
    f = _write(tmp / "deep.yaml", "deepspeed:\n  x: " + "[" * 5000 + "]" * 5000 + "\n")
    return ["plan", "--config", str(f)], "nests too deeply"


def c_set_value_nested_beyond_reason(tmp):
    return ["plan", "--config", TINY_YAML, "--set", "deepspeed.x=" + "[" * 3000 + "]" * 3000], ("deepspeed.x", "nests too deeply")


def c_jsonl_nested_beyond_reason(tmp):
    data = tmp / "rows"
    _write(data / "a.jsonl", json.dumps({"text": "hello"}) + "\n" + "[" * 100000 + "]" * 100000 + "\n")
    return prep(tmp, source=data), ("a.jsonl", "nests JSON too deeply")


def c_run_config_is_a_directory(tmp):
    (tmp / "run" / "config.yaml").mkdir(parents=True)
    return train(tmp), ("config.yaml", "is not a file")


def c_cache_dir_is_a_file(tmp):
    _write(tmp / "cachefile", "x")
    return prep(tmp, f"data.cache_dir={tmp / 'cachefile'}"), ("data.cache_dir", "is a file")


def c_hostfile_slots_beyond_any_node(tmp):
    f = _write(tmp / "hosts", "w0 slots=" + "9" * 40 + "\n")
    return ["plan", "--config", TINY_YAML, "--hostfile", str(f)], ("slots=", "at most 4096")


def c_bench_out_exists(tmp):
    _write(tmp / "res.json", "precious results\n")
    return ["bench", "--steps", "1", "--out", str(tmp / "res.json")], ("res.json", "already exists")


def c_model_too_deep_to_be_real(tmp):
    return train(tmp, "model.num_layers=1000000000"), ("model.num_layers", "4096")


def _rows_without_text(tmp):
    return _write(tmp / "rows" / "a.jsonl", json.dumps({"body": "hello"}) + "\n").parent


def c_failed_start_leaves_no_new_run_dir_or_cache_dir(tmp):
    """The error comes after the run dir's lock was taken and the cache dir made (while tokenising): both new
    dirs go again."""
    return train(tmp, f"run.dir={tmp / 'new' / 'run'}", f"data.cache_dir={tmp / 'new-cache' / 'sub'}",
                 source=_rows_without_text(tmp)), "'text' field"


def c_failed_build_leaves_no_new_cache_dir(tmp):
    return prep(tmp, f"data.cache_dir={tmp / 'new-cache'}", source=_rows_without_text(tmp)), "'text' field"


CASES: dict[str, Callable] = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    return run_cases(CASES, {name: tmp_path_factory.mktemp(name) for name in CASES})


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, results):
    check_refusal(results[case].result())


# ---- called directly ------------------------------------------------------------------------------------

def test_a_data_file_whose_name_looks_like_a_glob_is_that_file(tmp_path):
    from scaletrain.data.sources import resolve_source

    for name in ("notes[1].txt", "corpus[v2]/a.txt"):
        f = _write(tmp_path / name, "some text\n")
        assert resolve_source(str(f), "text").files == (f,)


def test_a_manifest_cannot_vouch_for_files_outside_its_checkpoint(tmp_path):
    from scaletrain.train.checkpoint import verify, write_manifest

    tag = tmp_path / "checkpoints" / "global_step1"
    _write(tag / "model.pt", b"weights")
    write_manifest(tag, {})
    assert verify(tag) is None
    outside = _write(tmp_path / "elsewhere", b"x")
    for rel in (str(outside), "../../elsewhere"):
        m = json.loads((tag / "manifest.json").read_text())
        m["files"] = {rel: {"sha256": "0" * 64, "bytes": 1}}
        (tag / "manifest.json").write_text(json.dumps(m))
        assert "outside its checkpoint" in verify(tag)


def test_a_run_whose_only_checkpoint_is_damaged_says_so(tmp_path):
    from scaletrain.errors import UserError
    from scaletrain.train.checkpoint import write_manifest
    from scaletrain.weights import open_weights

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    with pytest.raises(UserError, match="has no checkpoint yet"):
        open_weights(str(run))
    tag = run / "checkpoints" / "global_step3"
    _write(tag / "mp_rank_00_model_states.pt", b"weights")
    write_manifest(tag, {})
    _write(tag / "mp_rank_00_model_states.pt", b"weightz")
    with pytest.raises(UserError, match="none passes verification .*sha256") as exc:
        open_weights(str(run))
    assert "\n" not in str(exc.value) and "falling back" not in str(exc.value)


def test_outputs_refused_where_they_would_be_replaced_or_pruned(tmp_path):
    from scaletrain.errors import UserError
    from scaletrain.weights.checkpoint_dir import check_out

    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(UserError, match="symbolic link"):
        check_out(tmp_path / "link")
    tag = tmp_path / "run" / "checkpoints" / "global_step3"
    tag.mkdir(parents=True)
    check_out(tag / "child")  # (not a run of ours: no config.yaml beside checkpoints/)
    _write(tmp_path / "run" / "config.yaml", "model: {}\n")
    with pytest.raises(UserError, match="inside checkpoint .*prune"):
        check_out(tag / "child")
    check_out(tmp_path / "run" / "exports" / "child")  # beside the checkpoints: fine


def test_a_cached_tokenizer_that_changed_is_refused(tmp_path):
    from launch_utils import small_corpus
    from scaletrain.config import load_config
    from scaletrain.data.prepare import open_cache, prepare_data
    from scaletrain.errors import UserError

    cfg = load_config(TINY_YAML, [f"data.source={small_corpus(tmp_path / 'corpus')}", f"data.cache_dir={tmp_path / 'cache'}",
                                  "model.vocab_size=512"])
    cache = prepare_data(cfg, progress=False)
    assert open_cache(cache.dir) is not None
    cache.tokenizer_path.write_bytes(b"junk")  # trained on, then copied into runs: eval/generate would fail later
    with pytest.raises(UserError, match="not the tokenizer it was built with"):
        open_cache(cache.dir)
    os.remove(cache.dir / "tokenizer.model")
    with pytest.raises(UserError, match="not the tokenizer it was built with"):
        open_cache(cache.dir)
