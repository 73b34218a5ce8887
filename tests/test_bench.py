"""`scaletrain bench` end to end on tiny shapes: it runs, and its JSON has every promised field.
No timing assertions: performance claims live in the bench output and the README, not in tests."""

from __future__ import annotations

import json

import pytest

from launch_utils import run_cli

TINY = ["--hidden", "64", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
        "--vocab", "512", "--seq", "64", "--micro-batch", "2", "--steps", "2", "--warmup", "1"]


def _json(stdout: str) -> dict:
    return json.loads(stdout)  # the whole of stdout: `scaletrain bench > out.json` must give valid JSON


@pytest.mark.slow
def test_training_bench_two_ranks_prints_the_comparison(tmp_path):
    out = tmp_path / "bench.json"
    # One precision here (each (precision, model) pair's memory is measured in fresh ranks: ~8 s a pair on
    # 2 cores); both precisions in one invocation are the one-rank test's.
    rc, stdout, stderr = run_cli("bench", *TINY, "--precision", "fp32", "--loss-chunk", "32",
                                 "--no-compile", "--out", str(out), timeout=900)
    assert rc == 0, stderr[-3000:]
    report = _json(stdout)
    assert json.loads(out.read_text()) == report
    m = report["machine"]
    assert {"cpu", "amx_bf16", "torch", "deepspeed", "transformers", "cores"} <= set(m)
    assert report["config"]["ranks"] == 2 and report["config"]["zero_stage"] == 2
    assert report["ours_settings"]["compile"] is False and report["ours_settings"]["loss_chunk"] == 32
    assert list(report["results"]) == ["fp32"]
    r = report["results"]["fp32"]
    assert r["peak_matmul_flops"] > 0 and r["flops_per_token"] > 0 and r["tokens_per_step"] == 2 * 2 * 64
    for kind in ("ours", "peer"):
        k = r[kind]
        assert k["tokens_per_sec"] > 0 and 0 < k["mfu"] and len(k["step_times_s"]) == 2
        assert k["tokens_per_sec"] == pytest.approx(r["tokens_per_step"] / k["step_time_s"], rel=1e-3)
        assert k["mfu"] == pytest.approx(k["tokens_per_sec"] * r["flops_per_token"] / r["peak_matmul_flops"], rel=2e-2)
        mem = k["memory_per_rank"]
        assert len(mem) == 2 and all(x["peak_rss_mb"] > x["rss_before_model_mb"] > 0 for x in mem)
        assert 4.0 < k["last_loss"] < 8.0  # ln(512) = 6.2: both really trained on the same kind of data
    assert r["speedup"] == pytest.approx(r["ours"]["tokens_per_sec"] / r["peer"]["tokens_per_sec"], rel=1e-2)
    # the same model on both sides, counted by the formula the docs give: 6N + 12LdT (the tied embedding is the
    # head's weight: N counts it once, as the model's parameters do)
    assert r["ours"]["params"] == r["peer"]["params"] > 0
    c = report["config"]
    assert r["flops_per_token"] == 6 * r["ours"]["params"] + 12 * c["num_layers"] * c["hidden_size"] * c["seq_len"]


@pytest.mark.slow
def test_one_contestant_alone_on_one_rank():
    """`--only ours`: the big-shape MFU mode (both models would not fit in one device's memory); two
    precisions in one invocation, each with its own measured peak."""
    rc, stdout, stderr = run_cli("bench", *TINY, "--ranks", "1", "--only", "ours", "--precision", "bf16", "fp32",
                                 "--no-compile", "--no-memory", timeout=600)
    assert rc == 0, stderr[-3000:]
    report = _json(stdout)
    assert report["config"]["contestants"] == ["ours"] and sorted(report["results"]) == ["bf16", "fp32"]
    for precision in ("bf16", "fp32"):
        r = report["results"][precision]
        assert "peer" not in r and "speedup" not in r and r["peak_matmul_flops"] > 0
        assert r["tokens_per_step"] == 2 * 64 and r["ours"]["mfu"] > 0 and len(r["ours"]["step_times_s"]) == 2
        assert 4.0 < r["ours"]["last_loss"] < 8.0


@pytest.mark.slow
def test_attention_only_bench_reports_every_backend():
    rc, stdout, stderr = run_cli("bench", "--attention-only", "--attention-seqs", "128", "--precision", "fp32",
                                 "--steps", "3", timeout=600)
    assert rc == 0, stderr[-3000:]
    report = _json(stdout)["attention"]
    rows = report["results"]
    assert len(rows) == 1 and rows[0]["T"] == 128
    assert report["cpu_kernels"].startswith(("attention", "off", "not used"))  # says which sdpa ran
    row = rows[0]
    assert row["sdpa"]["speedup_vs_eager"] > 0 and row["sdpa"]["max_abs_diff_vs_eager"] <= 1e-5
    assert "needs an NVIDIA GPU" in row["flash"]["skipped"]  # on this CPU-only suite
    assert "no backward" in row["flex"]["skipped"]


def test_loss_memory_bench_fields():
    from scaletrain.bench.loss_memory import loss_memory_bench

    report = loss_memory_bench("cpu", 64, "float32", tokens=256, hidden=32, vocabs=(1000,))
    plain, chunked = report["results"]
    assert plain["loss_chunk"] == 0 and chunked["loss_chunk"] == 64
    assert chunked["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert plain["peak_extra_mb"] >= 0 and chunked["peak_extra_mb"] >= 0


def test_bench_flag_mistakes_are_one_line(cli):
    rc, _, err = cli("bench", "--fused-ops", "liger")
    assert rc == 2 and "needs --device cuda" in err and err.count("\n") == 1
    rc, _, err = cli("bench", "--seq", "0")
    assert rc == 2 and "--seq: must be at least 1, got 0" in err and err.count("\n") == 1
    rc, _, err = cli("bench", "--warmup", "-1")
    assert rc == 2 and "--warmup: must be at least 0" in err
    rc, _, err = cli("bench", "--heads", "3")
    assert rc == 2 and "divisible" in err


def test_throughput_window_counts_only_step_time_and_restarts_after_each_log_line():
    from scaletrain.train.metrics import ThroughputWindow

    w = ThroughputWindow()
    w.add(1000, 0.5)
    w.add(1000, 0.5)  # a validation or save between steps adds no seconds: it is not a step
    assert w.take() == pytest.approx(2000.0)
    w.add(300, 1.0)
    assert w.take() == pytest.approx(300.0)  # a new window, not the average since the start


def test_bench_ranks_leave_no_semaphore_behind(tmp_path):
    """The ranks skip interpreter teardown (os._exit); a multiprocessing lock made in one (tqdm makes one under
    inductor) was then reported as "leaked semaphore objects" at the end of every `scaletrain bench`."""
    import subprocess
    import sys

    from launch_utils import env

    (tmp_path / "lockjob.py").write_text("import multiprocessing\nKEEP = []\n\n\ndef job(dist):\n"
                                         "    KEEP.append(multiprocessing.RLock())  # alive until the rank exits\n"
                                         "    return {'ok': 1}\n")
    e = env()
    e["PYTHONPATH"] = f"{tmp_path}:{e['PYTHONPATH']}"
    code = "from scaletrain.bench.spawn import run_ranks\nimport lockjob\nprint(run_ranks(lockjob.job, (), 1))"
    p = subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "{'ok': 1}" in p.stdout, p.stderr[-3000:]
    assert "leaked" not in p.stderr, p.stderr[-3000:]
