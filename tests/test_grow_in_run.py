"""Growth inside a run (growth.schedule) with 2 CPU ranks under ZeRO-3: exact function at each boundary,
one TensorBoard curve, and a loss curve that is bit-identical whether the run is interrupted (SIGUSR1) before
or after a boundary, or resumed from the checkpoint taken at the boundary itself (a crash during growth)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from launch_utils import (TINY, live_rank_pids, run_training, small_corpus, signal_ranks, start_training, tb_scalars, tb_steps,
                          wait_for)

pytestmark = pytest.mark.slow

# Stops land a few steps after the signal on a fast machine: leave >= 7 steps after each trigger.
B1, B2, STEPS = 6, 14, 22
SCHEDULE = (f"growth.schedule=[{{at_step: {B1}, set: {{model.num_layers: 4}}}}, "
            f"{{at_step: {B2}, set: {{model.hidden_size: 128, model.num_heads: 8, model.num_kv_heads: 4, "
            f"model.intermediate_size: 344}}}}]")


@pytest.fixture(scope="module")
def common(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("grow_runs")
    corpus = small_corpus(root / "corpus")
    return [*TINY, f"data.source={corpus}", f"data.cache_dir={root / 'cache'}", "train.precision=fp32",
            "zero.stage=3", f"train.max_steps={STEPS}", "train.save_every=4", "train.keep_last=20",
            "growth.rewarmup_steps=2", "growth.noise=0.05", SCHEDULE]


@pytest.fixture(scope="module")
def straight(common, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("straight") / "run"
    proc = run_training(2, [*common, f"run.dir={d}"], timeout=600)
    (d / "stdout.txt").write_text(proc.stdout)
    return d


def test_growth_boundaries_are_exact_and_logged(straight):
    out = (straight / "stdout.txt").read_text()
    assert "grew to stage 1" in out and "grew to stage 2" in out and "still referenced" not in out
    params = tb_scalars(straight, "train/model_params")
    p0, p1, p2 = params[1], params[B1 + 1], params[B2 + 1]
    assert p0 < p1 < p2 and params[B1] == p0 and params[B2] == p1 and params[STEPS] == p2
    for stage in (1, 2):
        rec = json.loads((straight / "growth" / f"stage{stage}" / "lineage.json").read_text())
        check = rec["grow"]["check"]
        assert rec["grow"]["exact"] and check["max_abs_dlogits"] <= 1e-5, check
        assert abs(check["parent_loss"] - check["child_loss"]) <= 1e-5
        assert rec["grow"]["optimizer"] == "grow" and rec["grow"]["noise"] == 0.05
    assert sorted(tb_scalars(straight, "train/loss")) == list(range(1, STEPS + 1))  # one continuous curve
    cfg = yaml.safe_load((straight / "config.yaml").read_text())
    assert cfg["model"]["hidden_size"] == 128 and cfg["model"]["num_layers"] == 4 and cfg["growth"]["schedule"] == []
    manifest = json.loads((straight / "checkpoints" / f"global_step{B1}" / "manifest.json").read_text())
    assert manifest["model"]["num_layers"] == 2  # the boundary checkpoint is the parent
    # the family tree: final checkpoint <- grown child 2 <- boundary checkpoint B2 <- grown child 1 <- B1
    final = json.loads((straight / "lineage.json").read_text())
    assert final["steps"] == STEPS and final["parents"][0]["kind"] == "grow"
    assert Path(final["parents"][0]["path"]) == (straight / "growth" / "stage2").resolve()
    stage2 = json.loads((straight / "growth" / "stage2" / "lineage.json").read_text())
    b2 = json.loads((straight / "checkpoints" / f"global_step{B2}" / "lineage.json").read_text())
    assert stage2["parents"][0]["id"] == b2["id"] and b2["parents"][0]["kind"] == "grow"
    b2_files = json.loads((straight / "checkpoints" / f"global_step{B2}" / "manifest.json").read_text())["files"]
    assert "lineage.json" in b2_files  # the tag's lineage is checked like its weights
    assert json.loads((straight / "checkpoints" / f"global_step{STEPS}" / "lineage.json").read_text()) == final
    from launch_utils import run_cli

    rc, tree, err = run_cli("lineage", str(straight))
    assert rc == 0, err
    assert tree.count("grow") >= 2 and "pre-train" in tree, tree


def test_the_run_dirs_own_config_cannot_renumber_the_stages(straight, tmp_path):
    """run.dir/config.yaml holds the grown model with the rest of the schedule: started with it, the run would
    count the last stage as stage 0 and a later growth would overwrite growth/stage1."""
    from launch_utils import run_cli

    d = tmp_path / "run"
    shutil.copytree(straight, d, ignore=shutil.ignore_patterns("tb"))
    rc, out, err = run_cli("train", "--config", str(d / "config.yaml"), "--set", f"run.dir={d}", "train.max_steps=40",
                           "growth.schedule=[{at_step: 30, set: {model.num_layers: 6}}]", timeout=300)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert "grew into this config's model at growth/stage2" in lines[0] and "config the run was started with" in lines[0]


@pytest.mark.parametrize("stage,boundary", [(1, B1), (2, B2)], ids=["depth", "width"])
def test_grown_child_computes_its_parent_by_transformers(straight, tmp_path, stage, boundary):
    """Not the growth code's own check: transformers computes the logits of the parent (the boundary
    checkpoint, as DeepSpeed's zero_to_fp32 reads it from the ZeRO-3 shards) and of the grown child."""
    import shutil

    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import save_file

    from test_grow_cli import hf_logits

    child = straight / "growth" / f"stage{stage}"
    parent = tmp_path / "parent"
    parent.mkdir()
    cfg = yaml.safe_load((child / "config.yaml").read_text())
    cfg["model"] = json.loads((straight / "checkpoints" / f"global_step{boundary}" / "manifest.json").read_text())["model"]
    sd = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag=f"global_step{boundary}")
    tied = cfg["model"]["tie_word_embeddings"]
    save_file({k: v.contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")}, parent / "model.safetensors")
    (parent / "config.yaml").write_text(yaml.safe_dump(cfg))
    shutil.copytree(child / "tokenizer", parent / "tokenizer")
    x = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(stage))
    diff = (hf_logits(parent, x) - hf_logits(child, x)).abs().max().item()
    assert diff <= 1e-5, f"stage {stage}: the grown child differs from its parent by {diff:.2e} (transformers' logits)"


def test_checkpoints_from_before_a_boundary_open_with_their_own_model(straight, tmp_path):
    """After growth the run's config.yaml names the grown model; the tags saved before a boundary (the parents
    `scaletrain lineage` names) were opened with that shape and refused by eval, export-hf, generate, grow
    and init.from. Each tag's manifest records its own model."""
    from launch_utils import run_cli

    for step in (B1, B2):
        tag = straight / "checkpoints" / f"global_step{step}"
        saved = json.loads((tag / "manifest.json").read_text())["model"]
        rc, _, err = run_cli("export-hf", str(tag), "--out", str(tmp_path / f"hf{step}"), timeout=300)
        assert rc == 0, err
        hf = json.loads((tmp_path / f"hf{step}" / "config.json").read_text())
        assert (hf["num_hidden_layers"], hf["hidden_size"]) == (saved["num_layers"], saved["hidden_size"]), (step, hf)


def _stopped_at(run_dir: Path) -> int:
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted", status
    return status["step"]


def test_resume_before_and_after_each_boundary_is_exact(common, straight, tmp_path):
    expected = tb_scalars(straight, "train/loss")
    d = tmp_path / "run"
    args = [*common, f"run.dir={d}"]
    stops = []
    # segment 1: stopped before the first boundary (signalled as soon as the ranks are up); 2: between the
    # boundaries; 3: after the second
    for trigger in (d / "pids", d / "growth" / "stage1" / "lineage.json", d / "growth" / "stage2" / "lineage.json"):
        shutil.rmtree(d / "pids", ignore_errors=True)  # only this segment's ranks get the signal
        proc = start_training(2, args)
        ready = lambda: (trigger.exists() and len(live_rank_pids(d)) == 2) or proc.poll() is not None  # noqa: E731
        assert wait_for(ready, timeout=300, interval=0.02) and trigger.exists(), proc.communicate()[0][-3000:]
        signal_ranks(d)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, out[-3000:]
        stops.append(_stopped_at(d))
    assert stops[0] <= B1 < stops[1] <= B2 < stops[2] < STEPS, stops
    run_training(2, args, timeout=600)
    got = tb_scalars(d, "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in sorted(got)] == [expected[s] for s in sorted(got)], "resumed curve differs"


def test_resume_from_the_boundary_checkpoint_regrows_identically(common, straight, tmp_path):
    """As if the process died during growth, or before the next save: only the parent checkpoint of step B2 is
    left, with the TensorBoard events the first attempt wrote; the restart grows again and writes them once."""
    d = tmp_path / "run"
    shutil.copytree(straight, d, ignore=shutil.ignore_patterns("growth", "stdout.txt"))
    for tag in (d / "checkpoints").glob("global_step*"):
        if int(tag.name.removeprefix("global_step")) > B2:
            shutil.rmtree(tag)
    (d / "checkpoints" / "latest").write_text(f"global_step{B2}")
    proc = run_training(2, [*common, f"run.dir={d}"], timeout=600)
    assert f"resumed from {d / 'checkpoints' / f'global_step{B2}'}" in proc.stdout and "grew to stage 2" in proc.stdout
    got, expected = tb_scalars(d, "train/loss"), tb_scalars(straight, "train/loss")
    assert got == expected
    for tag in ("growth/stage", "growth/child_loss", "train/loss"):
        assert tb_steps(d, tag) == tb_steps(straight, tag), tag  # no step written twice


def test_grow_cli_from_a_two_rank_zero3_run_dir(straight, cli, tmp_path):
    """Offline growth of the ZeRO-3 run (fp32 masters and Adam moments read from both ranks' shards), checked
    against DeepSpeed's own zero_to_fp32 for the parent and transformers for both; then init.from trains it."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from test_grow_cli import hf_logits

    child = tmp_path / "child"
    rc, out, err = cli("grow", str(straight), "--out", str(child), "--set", "model.num_layers=6", "model.hidden_size=256",
                       "model.num_heads=16", "model.num_kv_heads=8", "model.intermediate_size=688", "--optimizer", "grow",
                       "--noise", "0.1", timeout=300)
    assert rc == 0, err
    assert "val windows" in out  # the run's own val data was found for the check
    assert sorted(p.name for p in (child / "optimizer").iterdir()) == ["exp_avg", "exp_avg_sq", "state.json"]
    assert json.loads((child / "optimizer" / "state.json").read_text())["adam_step"] == STEPS
    parent = tmp_path / "parent"  # the parent as DeepSpeed itself reconstructs it
    sd = get_fp32_state_dict_from_zero_checkpoint(str(straight / "checkpoints"), tag=f"global_step{STEPS}")
    parent.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in sd.items() if k != "lm_head.weight"}, parent / "model.safetensors")
    shutil.copy(child / "config.yaml", parent / "config.yaml")
    cfg = yaml.safe_load((parent / "config.yaml").read_text())
    cfg["model"].update(yaml.safe_load((straight / "config.yaml").read_text())["model"])
    (parent / "config.yaml").write_text(yaml.safe_dump(cfg))
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    assert (hf_logits(parent, x) - hf_logits(child, x)).abs().max().item() <= 1e-5
    # training starts from it (weights + grown Adam moments), 1 rank ZeRO-0
    import subprocess

    from launch_utils import REPO, env, train_cmd

    run = tmp_path / "ft"
    cmd = train_cmd(1, [f"init.from={child}", f"run.dir={run}", "train.max_steps=2", "train.save_every=0",
                        "train.eval_every=0", "zero.stage=0", "growth.schedule=[]"], config=str(child / "config.yaml"))
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    parents = json.loads((run / "lineage.json").read_text())["parents"]
    assert parents[0]["kind"] == "grow"
    # the base model is deleted (a purged scratch dir): the same command, longer, resumes from the run's own
    # checkpoint and tokenizer copy, with a warning, and the family tree keeps the parent it started from
    shutil.rmtree(child)
    cmd = train_cmd(1, [f"init.from={child}", f"run.dir={run}", "train.max_steps=3", "train.save_every=0",
                        "train.eval_every=0", "zero.stage=0", "growth.schedule=[]"], config=str(run / "config.yaml"))
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "resuming" in proc.stderr and "from its own checkpoints" in proc.stderr, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout and (run / "checkpoints" / "global_step3").is_dir()
    assert json.loads((run / "lineage.json").read_text())["parents"] == parents


def test_checkpoints_written_before_a_new_model_field_still_resume(tmp_path):
    """A manifest's model section from before model.label_names existed, or with class names a fine-tune copied
    from an init.from source that is gone since, is still its stage: every resume looks its stage up."""
    from scaletrain.config import load_config
    from scaletrain.growth.in_run import RunGrowth

    cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"), [*TINY, SCHEDULE])
    growth = RunGrowth(cfg)
    tag = tmp_path / "global_step3"
    tag.mkdir()
    for k, m in enumerate(growth.models):
        older = {key: v for key, v in m.model_dump(mode="json").items() if key != "label_names"}
        (tag / "manifest.json").write_text(json.dumps({"model": older}))
        assert growth.stage_of(tag) == k
    (tag / "manifest.json").write_text(json.dumps({"model": {**older, "num_layers": 3}}))
    with pytest.raises(Exception, match="no stage of this config"):
        growth.stage_of(tag)
