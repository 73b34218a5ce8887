"""`scaletrain lineage`'s tree walk on hand-written records: an export with its parent's id (unchanged
weights hash the same) is still drawn as its own node, a loop of records ends, a changed parent is flagged."""

from __future__ import annotations

from scaletrain import lineage


def _write(d, kind, content_id, parents):
    d.mkdir(parents=True, exist_ok=True)
    lineage.write(d, lineage.make(kind, content_id, parents, {"num_layers": 2}, path=d))


def test_export_with_its_parents_id_is_its_own_node(tmp_path):
    base, ft, exp = tmp_path / "base", tmp_path / "ft", tmp_path / "export"
    _write(base, "import-hf", "aaaa", [])
    _write(ft, "fine-tune", "bbbb", [lineage.parent_ref(base, lineage.read(base), "import-hf")])
    _write(exp, "export", "bbbb", [lineage.parent_ref(ft, lineage.read(ft), "fine-tune")])
    kinds = [ln.split()[0].strip("│├└─ ") or ln.split()[1] for ln in lineage.tree_lines(exp) if "  " + str(tmp_path) in ln]
    assert kinds == ["export", "fine-tune", "import-hf"], lineage.tree_lines(exp)
    assert not any("changed since" in ln for ln in lineage.tree_lines(exp))


def test_a_loop_of_records_ends(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _write(a, "pre-train", "aaaa", [{"id": "bbbb", "kind": "pre-train", "path": str(b)}])
    _write(b, "pre-train", "bbbb", [{"id": "aaaa", "kind": "pre-train", "path": str(a)}])
    lines = lineage.tree_lines(a)
    assert 2 <= sum(str(tmp_path) in ln for ln in lines) <= 3, lines
    assert "(loop:" in lines[-1], lines
    deep = lineage.tree_lines(a, max_depth=1)
    assert "deeper than 1" in deep[-1] and "(loop:" not in "".join(deep), deep


def test_a_parent_changed_since_is_flagged(tmp_path):
    base, ft = tmp_path / "base", tmp_path / "ft"
    _write(base, "pre-train", "aaaa", [])
    _write(ft, "fine-tune", "bbbb", [lineage.parent_ref(base, lineage.read(base), "pre-train")])
    _write(base, "pre-train", "cccc", [])  # the parent's dir was trained further after the child was made
    assert any("changed since: the child recorded id aaaa" in ln for ln in lineage.tree_lines(ft))


def test_a_resume_continues_the_record_of_the_checkpoint_it_resumes(tmp_path):
    """The weights come from the resumed tag, so its record decides kind and parents: not init.from added to a
    pre-train run's command, nor a run-dir lineage.json that a crash left older than the tag."""
    from types import SimpleNamespace

    from scaletrain.config import load_config
    from scaletrain.train.run_lineage import RunLineage

    run, tag = tmp_path / "run", tmp_path / "run" / "checkpoints" / "global_step8"
    cache = SimpleNamespace(dir=tmp_path / "cache" / "fp0123", tokenizer_path=tmp_path / "no-tokenizer")
    cfg = load_config(None, [f"run.dir={run}", f"init.from={tmp_path / 'some-model'}"])
    _write(tag, "pre-train", "aaaa", [])
    rec = RunLineage(cfg, run, cache, resumed_tag=tag).record(tag, "bbbb", 9, 100, None)
    assert rec["kind"] == "pre-train" and rec["parents"] == []

    parent = {"id": "base", "kind": "import-hf", "path": str(tmp_path / "base")}
    _write(tag, "fine-tune", "cccc", [parent])
    _write(run, "fine-tune", "dddd", [{"id": "newer", "kind": "pre-train", "path": str(tmp_path / "elsewhere")}])
    rec = RunLineage(cfg, run, cache, resumed_tag=tag).record(tag, "eeee", 9, 100, None)
    assert rec["kind"] == "fine-tune" and rec["parents"] == [parent]


def test_malformed_records_are_damaged_not_tracebacks(tmp_path):
    """Valid JSON with fields of the wrong type (hand-edited, or another tool's) is a damaged record: one line
    at the root, a marked node as a parent; it used to raise TypeError/ValueError/AttributeError mid-tree."""
    import json

    import pytest

    from scaletrain.errors import UserError

    bad = [{"kind": "x", "id": 5}, {"kind": "x", "steps": "10"}, {"kind": "x", "parents": [None]},
           {"kind": "x", "parents": [{"path": 5}]}, {"kind": "x", "model": "m"}, {"kind": "x", "config_diff": {"a": 1}},
           {"kind": "x", "val_loss": "low"}, {"kind": 3}]
    child = tmp_path / "child"
    for i, rec in enumerate(bad):
        d = tmp_path / f"bad{i}"
        d.mkdir()
        (d / "lineage.json").write_text(json.dumps(rec))
        with pytest.raises(UserError, match="is damaged"):
            lineage.tree_lines(d)
        _write(child, "fine-tune", "cccc", [{"id": None, "kind": "x", "path": str(d)}])
        assert lineage.tree_lines(child)[-1].endswith("(damaged lineage.json)")
    good = {"kind": "x", "steps": 10, "val_loss": 2.5, "config_diff": {"a": [1, 2]}, "parents": []}
    (tmp_path / "good").mkdir()
    (tmp_path / "good" / "lineage.json").write_text(json.dumps(good))
    assert "10 steps" in "".join(lineage.tree_lines(tmp_path / "good"))


def test_settings_added_since_the_parent_was_written_are_no_change():
    """A parent written by an older scaletrain lacks keys added since: `train.activation_checkpointing None ->
    False` was listed as if the user had changed it. A child that sets a non-default value still shows it."""
    old = {"train": {"max_steps": 4, "lr": 0.003}}
    assert lineage.config_diff(old, {"train": {"max_steps": 6, "lr": 0.003, "activation_checkpointing": False}}) == \
        {"train.max_steps": [4, 6]}
    assert lineage.config_diff(old, {"train": {"max_steps": 4, "lr": 0.003, "activation_checkpointing": True}}) == \
        {"train.activation_checkpointing": [None, True]}
    assert lineage.config_diff({"train": {"lr": 0.003, "max_steps": 4}}, {"train": {"max_steps": 4}}) == {"train.lr": [0.003, None]}
