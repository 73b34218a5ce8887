"""Real DeepSpeed runs on CPU ranks: data-parallel parity for ZeRO 0-3, exact resume, TensorBoard output."""

from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest

from scaletrain.config import load_config
from scaletrain.model.llama import LlamaShape
from scaletrain.train.metrics import flops_per_token

from launch_utils import TINY, kill_group, run_training, small_corpus, signal_ranks, start_training, tb_scalars, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("runs")
    corpus = small_corpus(root / "corpus")
    return [*TINY, f"data.source={corpus}", f"data.cache_dir={root / 'cache'}"]


def _curve(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    return tb_scalars(run_dir, tag)


def test_data_parallel_parity_zero_0_and_2(base, tmp_path):
    """2 ranks x 1 micro-batch must equal 1 rank x 2 accumulated micro-batches: same global batch,
    so the same loss and grad-norm at every step (catches silent all-reduce bugs of DeepSpeed on gloo).
    ZeRO-1 and ZeRO-3 (gathers) are checked the same way in test_variants_runs.py, with other architectures."""
    steps = ["train.max_steps=5", "train.precision=fp32", "train.save_every=0"]
    ref_dir = tmp_path / "ref"
    run_training(1, [*base, *steps, f"run.dir={ref_dir}", "zero.stage=0", "train.grad_accum=2"])
    ref_loss, ref_grad = _curve(ref_dir), _curve(ref_dir, "train/grad_norm")
    assert sorted(ref_loss) == [1, 2, 3, 4, 5]
    assert ref_loss[5] < ref_loss[1]
    fpt = flops_per_token(LlamaShape.from_config(load_config(ref_dir / "config.yaml").model), 64)
    tokens_per_sec, mfu = _curve(ref_dir, "train/tokens_per_sec"), _curve(ref_dir, "train/mfu")
    assert mfu[5] == pytest.approx(tokens_per_sec[5] * fpt / 1e11, rel=1e-6)  # TINY's train.peak_flops, 1 rank
    for stage in (0, 2):
        d = tmp_path / f"z{stage}"
        run_training(2, [*base, *steps, f"run.dir={d}", f"zero.stage={stage}", "train.grad_accum=1"])
        loss, grad = _curve(d), _curve(d, "train/grad_norm")
        # one CPU machine, whatever its rank count: the same figure, the same denominator
        assert _curve(d, "train/mfu")[5] == pytest.approx(_curve(d, "train/tokens_per_sec")[5] * fpt / 1e11, rel=1e-6)
        for s in ref_loss:
            assert loss[s] == pytest.approx(ref_loss[s], rel=2e-5), f"ZeRO-{stage} loss differs at step {s}"
            assert grad[s] == pytest.approx(ref_grad[s], rel=1e-4), f"ZeRO-{stage} grad-norm differs at step {s}"


def test_zero2_bf16_two_ranks_learns_and_logs(base, tmp_path):
    d = tmp_path / "bf16"
    proc = run_training(2, [*base, "train.max_steps=30", "train.precision=bf16", "zero.stage=2", "train.peak_flops=0",
                            "train.eval_every=15", "train.save_every=15", f"run.dir={d}"], launcher="deepspeed")
    assert "TensorBoard: tensorboard --logdir" in proc.stdout
    said = re.search(r"MFU peak: ([\d.e+]+) TFLOP/s over 1 CPU machine\(s\) in bf16 \(measured now; train.peak_flops=([\d.e+]+) "
                     r"reuses it\)", proc.stdout)  # (both ranks measured at once: the machine's peak)
    assert said and float(said[1]) * 1e12 == pytest.approx(float(said[2]), rel=1e-3), proc.stdout[:3000]
    tokens_per_sec, mfu = _curve(d, "train/tokens_per_sec"), _curve(d, "train/mfu")
    fpt = flops_per_token(LlamaShape.from_config(load_config(d / "config.yaml").model), 64)
    assert mfu[30] == pytest.approx(tokens_per_sec[30] * fpt / (float(said[1]) * 1e12), rel=1e-3)
    loss = _curve(d)
    assert set(loss) == set(range(1, 31))
    assert sum(loss[s] for s in range(26, 31)) / 5 < loss[1] - 1.0, "loss did not fall"
    for tag in ("train/lr", "train/grad_norm", "train/tokens_per_sec", "train/consumed_tokens", "train/mfu", "val/loss", "val/ppl"):
        assert _curve(d, tag), f"missing TensorBoard scalar {tag}"
    val, ppl = _curve(d, "val/loss"), _curve(d, "val/ppl")
    assert sorted(val) == [15, 30] and ppl[30] == pytest.approx(math.exp(val[30]), rel=1e-5)
    assert _curve(d, "train/consumed_tokens")[30] == 30 * 2 * 2 * 64
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 30
    tags = sorted(p.name for p in (d / "checkpoints").iterdir() if p.is_dir())
    assert tags == ["global_step15", "global_step30"]
    assert (d / "checkpoints" / "latest").read_text() == "global_step30"
    assert (d / "config.yaml").is_file() and json.loads((d / "ds_config.json").read_text())["train_batch_size"] == 4


def _latest_step(run_dir: Path) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().removeprefix("global_step")) if latest.exists() else 0


@pytest.mark.parametrize("ranks,stage,sigs", [(1, 0, (signal.SIGTERM, signal.SIGINT)), (2, 3, (signal.SIGUSR1,))],
                         ids=["1rank-zero0-SIGTERM-then-Ctrl-C", "2ranks-zero3-SIGUSR1"])
def test_resume_after_signal_is_exact(base, tmp_path, ranks, stage, sigs):
    """Interrupt with SIGUSR1 (what SLURM sends before preemption), SIGTERM (plain `scancel`, a node
    drain) or SIGINT (Ctrl-C) -- the 1-rank run twice, the second time after resuming -- re-run the same
    command, and the loss at every step equals an uninterrupted run's, bit for bit (CPU, fp32)."""
    common = [*base, "train.max_steps=40", "train.precision=fp32", f"zero.stage={stage}", "train.save_every=4"]
    straight = tmp_path / "straight"
    run_training(ranks, [*common, f"run.dir={straight}"])
    expected = _curve(straight)

    resumed, stopped_at = tmp_path / "resumed", 0
    for i, sig in enumerate(sigs):  # the first start under the real `deepspeed` launcher: what a user's job sees
        proc = start_training(ranks, [*common, f"run.dir={resumed}"], launcher="deepspeed" if i == 0 else "local")
        assert wait_for(lambda: _latest_step(resumed) > stopped_at, timeout=180), proc.communicate()[0][-3000:]
        signal_ranks(resumed, sig)
        out, _ = proc.communicate(timeout=180)
        assert proc.returncode == 0, out[-3000:]
        status = json.loads((resumed / "status.json").read_text())
        assert status["state"] == "preempted" and stopped_at < status["step"] < 40, status
        assert (f"resumed from {resumed / 'checkpoints' / f'global_step{stopped_at}'}" in out) == (i > 0)
        stopped_at = status["step"]

    proc = run_training(ranks, [*common, f"run.dir={resumed}"])  # (the launcher is not what this part tests)
    assert f"resumed from {resumed / 'checkpoints' / f'global_step{stopped_at}'}" in proc.stdout
    got = _curve(resumed)
    assert sorted(got) == sorted(expected) == list(range(1, 41))
    assert [got[s] for s in got] == [expected[s] for s in got], "resumed curve differs from the uninterrupted one"
    assert json.loads((resumed / "status.json").read_text())["state"] == "finished"
    assert "tokenised data changed" not in proc.stdout
    if ranks == 1:  # the command once more (another lr): nothing to train; the finished run's record stays as it was
        record = {f: (resumed / f).read_text() for f in ("status.json", "config.yaml", "ds_config.json")}
        events = sorted((resumed / "tb").rglob("*"))
        proc = run_training(ranks, [*common, f"run.dir={resumed}", "train.lr=5e-3", "data.val_fraction=0.3"])
        assert "has finished: step 40 of train.max_steps 40" in proc.stdout, proc.stdout[-2000:]
        assert "warning: the tokenised data changed since checkpoint global_step40" in proc.stdout  # other val split
        assert {f: (resumed / f).read_text() for f in record} == record and sorted((resumed / "tb").rglob("*")) == events
        # four more steps at half the window: the tokens count what was trained, not windows x the new seq_len
        run_training(ranks, [*common, f"run.dir={resumed}", "train.max_steps=44", "train.seq_len=32", "train.eval_every=100"])
        batch = 2  # TINY: micro_batch_size 2 windows a step, one rank, no accumulation
        assert json.loads((resumed / "status.json").read_text())["consumed_tokens"] == 40 * batch * 64 + 4 * batch * 32
        assert _curve(resumed, "train/consumed_tokens")[44] == 40 * batch * 64 + 4 * batch * 32
        # the last val loss (of step 44) survives a resume: checkpoint 48's lineage record carries it, as without one
        run_training(ranks, [*common, f"run.dir={resumed}", "train.max_steps=50", "train.seq_len=32", "train.eval_every=100",
                                    "train.keep_last=10"])
        val = [json.loads((resumed / "checkpoints" / f"global_step{s}" / "lineage.json").read_text())["val_loss"] for s in (44, 48)]
        assert val[0] is not None and val[1] == val[0], val


def test_second_trainer_on_a_live_run_dir_is_refused(base, tmp_path):
    """The same command started again while the first still trains (a second terminal, a job submitted
    twice): one line, exit 2, before it touches anything; the first trains on and its curve is whole."""
    d = tmp_path / "live"
    args = [*base, "train.max_steps=100000", "train.precision=fp32", "train.save_every=5", f"run.dir={d}"]
    first = start_training(1, args)
    try:
        assert wait_for((d / "checkpoints" / "latest").exists, timeout=180)
        second = run_training(1, args, check=False)
        errors = [ln for ln in second.stdout.splitlines() if ln.startswith("error: ")]
        assert second.returncode == 2 and "Traceback" not in second.stdout, second.stdout[-3000:]
        assert len(errors) == 1 and f"run.dir {d} is in use by a running trainer (pid {first.pid} on " in errors[0]
        signal_ranks(d, signal.SIGUSR1)
        out, _ = first.communicate(timeout=180)
    finally:
        kill_group(first)
    assert first.returncode == 0, out[-3000:]
    stopped_at = json.loads((d / "status.json").read_text())["step"]
    assert sorted(_curve(d)) == list(range(1, stopped_at + 1))  # train.log_every=1: every step, once


def test_zero_offload_optimizer_trains_like_the_plain_optimizer(base, tmp_path):
    """zero.offload_optimizer=cpu: DeepSpeed's CPU Adam on the offloaded fp32 master weights computes the
    same AdamW as torch's (fp32): the same loss curve within float rounding."""
    steps = [*base, "train.max_steps=5", "train.precision=fp32", "train.save_every=0", "zero.stage=2"]
    plain, offload = tmp_path / "plain", tmp_path / "offload"
    run_training(1, [*steps, f"run.dir={plain}"])
    run_training(1, [*steps, f"run.dir={offload}", "zero.offload_optimizer=cpu"], timeout=600)  # builds CPU Adam once
    want, got = _curve(plain), _curve(offload)
    assert sorted(got) == sorted(want) == [1, 2, 3, 4, 5]
    assert got[5] < got[1]
    for s in want:
        assert got[s] == pytest.approx(want[s], rel=1e-5), f"offloaded optimizer differs at step {s}"


def test_status_json_follows_the_checkpoints_and_forgets_the_last_start(base, tmp_path):
    """status.json was written at a start and at the end only: a rank killed mid-run left the start's step,
    and a resumed run showed the previous start's loss and seconds as its own until it ended."""
    d = tmp_path / "status"
    args = [*base, "train.precision=fp32", f"run.dir={d}"]
    run_training(1, [*args, "train.max_steps=4", "train.save_every=0"])
    before = json.loads((d / "status.json").read_text())
    assert before["state"] == "finished" and math.isfinite(before["loss"]) and before["seconds"] > 0
    proc = start_training(1, [*args, "train.max_steps=100000", "train.save_every=3"])
    try:
        assert wait_for(lambda: json.loads((d / "status.json").read_text())["state"] == "running", timeout=180)
        status = json.loads((d / "status.json").read_text())  # (this start's, or already a checkpoint's)
        assert status["loss"] != before["loss"], status  # (seconds may round alike: 0.1 s then, 0.1 s now)
        assert (status["loss"] is None and status["seconds"] is None) or status["step"] >= 6, status
        assert wait_for(lambda: json.loads((d / "status.json").read_text())["step"] >= 6, timeout=180)
    finally:
        kill_group(proc)  # SIGKILL: nothing more is written
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "running" and status["step"] >= 6 and math.isfinite(status["loss"]), status
    assert status["consumed_tokens"] == status["step"] * 2 * 64  # TINY: 2 windows of 64 tokens a step


@pytest.mark.parametrize("problem, needle", [
    ("train.lr=abc", "train.lr"),                              # the config, read by every rank before they can talk
    ("data.source=/nonexistent/corpus", "/nonexistent/corpus"),  # a check every rank makes before the process group
])
def test_an_error_every_rank_reaches_is_printed_once(base, tmp_path, problem, needle):
    """Under a launcher every rank raised the same error and printed it: N identical lines for N ranks. The quiet
    rank must not exit first either: the launcher then killed the printing one before its line (1 run in 12)."""
    for _ in range(2 if problem.startswith("train.") else 1):  # (the config case is the quickest to fail)
        proc = run_training(2, [*base, f"run.dir={tmp_path / 'run'}", problem], check=False)
        errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("error: ")]
        assert proc.returncode == 2 and len(errors) == 1 and needle in errors[0], proc.stdout[-3000:]


def test_errors_after_the_ranks_connect_are_printed_once_and_lone_processes_always_print(base, tmp_path):
    """rank 0's resume verdict reached every rank through a broadcast and each printed it; and a single process
    with LOCAL_RANK in its environment (a batch script's export) printed nothing at all."""
    import subprocess
    import sys

    from launch_utils import REPO, env

    d = tmp_path / "run"
    run_training(1, [*base, f"run.dir={d}", "train.max_steps=2", "train.micro_batch_size=3", "train.precision=fp32"])
    proc = run_training(2, [*base, f"run.dir={d}", "train.max_steps=4", "train.micro_batch_size=3"], check=False)
    errors = [ln for ln in proc.stdout.splitlines() if ln.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "sequences per step" in errors[0], proc.stdout[-3000:]
    lone = subprocess.run([sys.executable, "launch/train.py", "--set", "train.bogus=1"], cwd=REPO, capture_output=True,
                          text=True, env={**env(), "LOCAL_RANK": "1"}, timeout=120)
    assert lone.returncode == 2 and lone.stderr.count("error: ") == 1, lone.stderr[-2000:]


def test_a_resume_that_lengthens_the_run_takes_the_new_schedule_from_its_first_step(base, tmp_path):
    """ZeRO-1/2 load the optimizer after the lr scheduler: its saved lr (of the old train.max_steps' cosine) was
    used for the first step after the resume, while the log printed the new schedule's. ZeRO-0 was right."""
    curves = {}
    for stage in (0, 2):
        d = tmp_path / f"z{stage}"
        args = [*base, "train.precision=fp32", f"zero.stage={stage}", f"run.dir={d}"]
        run_training(1, [*args, "train.max_steps=4"])
        run_training(1, [*args, "train.max_steps=6"])
        curves[stage] = _curve(d)
    assert sorted(curves[2]) == list(range(1, 7))
    for step in (5, 6):
        assert curves[2][step] == pytest.approx(curves[0][step], rel=1e-5), f"step {step}: {curves}"


def test_a_checkpoint_whose_manifest_does_not_name_its_data_cache_still_warns_of_other_data(base, tmp_path):
    """Manifests of older versions did not record the data cache: a resume onto other tokenised data (a newer
    version keys an HF tokenizer's cache differently) went on silently. The tag's lineage record names it."""
    d = tmp_path / "old"
    args = [*base, "train.precision=fp32", f"run.dir={d}"]
    run_training(1, [*args, "train.max_steps=2"])
    manifest = d / "checkpoints" / "global_step2" / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["data_stream"]["data.cache"]
    manifest.write_text(json.dumps(m))
    out = run_training(1, [*args, "train.max_steps=3", "data.val_fraction=0.3"]).stdout
    assert "warning: the tokenised data changed since checkpoint global_step2" in out, out[-2000:]
