"""The memory plan (`scaletrain plan`, and the check every training start makes): parameter and stage
arithmetic, the refusal of a config that cannot fit and the setting the advice names, growing runs, and the
ranks a hostfile gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = str(REPO / "configs" / "tiny.yaml")


def test_plan_counts_and_stage_arithmetic():
    from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
    from scaletrain.plan import memory_per_rank, num_params

    cfg = load_config(TINY_YAML, ["train.precision=fp32"])
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaShape.from_config(cfg.model))
    assert num_params(cfg) == sum(p.numel() for p in model.parameters())
    p = {s: memory_per_rank(load_config(TINY_YAML, ["train.precision=fp32", f"zero.stage={s}"]), 4, "cuda") for s in range(4)}
    P = num_params(cfg)
    assert p[0].optimizer == 8 * P and p[1].optimizer == p[2].optimizer == p[3].optimizer == 12 * P / 4
    assert p[3].params < p[2].params == p[1].params == 4 * P
    assert p[2].grads < p[1].grads
    assert p[0].activations == p[3].activations > 0
    body = [memory_per_rank(load_config(TINY_YAML, ["train.precision=fp32", "train.loss_chunk=256", "model.num_layers=12",
                                                    f"train.activation_checkpointing={on}"]), 4) for on in ("false", "true")]
    assert 0 < body[1].activations < body[0].activations / 2  # layer inputs + one layer, not every layer's activations
    off = memory_per_rank(load_config(TINY_YAML, ["train.precision=fp32", "zero.stage=3", "zero.offload_optimizer=cpu",
                                                  "zero.offload_param=cpu"]), 4, "cuda")
    # offloading moves bytes to CPU memory and loses none; the layer being computed is still gathered on the
    # device, and the CPU optimizer step reads its fp32 gradient partition from CPU memory
    assert off.optimizer == 0 and off.params == 4 * P / cfg.model.num_layers
    assert off.grads == p[3].grads - 4 * P / 4
    assert off.total + off.offloaded == pytest.approx(p[3].total)


def test_training_refuses_a_config_that_cannot_fit(monkeypatch):
    from scaletrain.plan import check_fits

    monkeypatch.setenv("WORLD_SIZE", "1")
    check_fits(load_config(TINY_YAML))  # the default fits anywhere
    huge = load_config(TINY_YAML, ["model.hidden_size=8192", "model.num_layers=64", "model.num_heads=64",
                                   "model.num_kv_heads=8", "model.intermediate_size=22016"])
    with pytest.raises(UserError, match=r"needs about .* per rank .*no ZeRO setting fits on 1 rank"):
        check_fits(huge)  # one rank: sharding has no one to share with, and on CPU offloading saves nothing
    check_fits(load_config(TINY_YAML, ["model.hidden_size=8192", "model.num_layers=64", "model.num_heads=64",
                                       "model.num_kv_heads=8", "model.intermediate_size=22016", "train.memory_check=false"]))


def test_plan_report_lines():
    from scaletrain.plan import report

    text = report(load_config(TINY_YAML), gpus=2, nodes=1, device="cuda", memory=80e9, peak_flops=100e12)
    assert "4,999,424 parameters" in text and "4,096 tokens/step" in text
    assert " *2 " in text and "80.00 GB per rank" in text and "fits" in text and "step time" in text


def test_plan_takes_the_runs_train_peak_flops_unless_given_one():
    """The figure a run's train/mfu divides by (per GPU or CPU machine) is the plan's peak too; --peak-tflops still
    wins. (Nothing is measured: the lines name their source.)"""
    from scaletrain.plan import report

    cfg = load_config(TINY_YAML, ["train.peak_flops=5e11"])
    assert "of 0.50 TFLOP/s per GPU (train.peak_flops)" in report(cfg, gpus=2, device="cuda", memory=80e9)
    text = report(cfg, gpus=2, device="cpu", memory=80e9)
    assert "of 0.50 TFLOP/s per machine (train.peak_flops)" in text, text
    assert "(given with --peak-tflops)" in report(cfg, gpus=2, device="cuda", memory=80e9, peak_flops=100e12)


def test_the_suggested_zero_setting_fits():
    """The advice said "raise zero.stage" whatever the ranks (on 1 rank ZeRO-3 needed more than ZeRO-0) and
    "offload to CPU" on CPU runs (where it saves nothing): now it names a setting that the same plan says fits."""
    from scaletrain.plan import report

    big = ["model.hidden_size=4096", "model.num_layers=32", "model.num_heads=32", "model.num_kv_heads=8",
           "model.intermediate_size=11008", "train.micro_batch_size=1", "train.precision=bf16", "zero.stage=0"]
    cfg = load_config(TINY_YAML, big)
    text = report(cfg, gpus=8, nodes=1, device="cuda", memory=40e9, peak_flops=100e12)
    assert "does NOT fit: set zero.stage=1 (about 37.01 GB per rank)" in text, text
    text = report(load_config(TINY_YAML, [*big, "zero.stage=1"]), gpus=8, nodes=1, device="cuda", memory=40e9,
                  peak_flops=100e12)
    assert "zero.stage 1 fits" in text, text
    text = report(cfg, gpus=1, nodes=1, device="cuda", memory=40e9, peak_flops=100e12)
    assert "does NOT fit: set zero.stage=3 zero.offload_optimizer=cpu" in text, text
    text = report(cfg, gpus=1, nodes=1, device="cpu", memory=40e9, peak_flops=1e12)
    assert "no ZeRO setting fits on 1 rank(s): use more machines" in text, text


def test_plan_of_a_growing_run_is_the_final_stages():
    """A run with growth.schedule is refused at start when its largest stage does not fit; plan used to judge
    (and time) only the model it starts with."""
    from scaletrain.plan import memory_per_rank, report
    from scaletrain.growth.schedule import advance

    cfg = load_config(TINY_YAML, ["growth.schedule=[{at_step: 5, set: {model.num_layers: 48, model.hidden_size: 1024, "
                                  "model.num_heads: 16, model.num_kv_heads: 16, model.intermediate_size: 2752}}]"])
    final = advance(cfg, 1)
    need = memory_per_rank(final, 2, "cuda").total
    assert need > 2 * memory_per_rank(cfg, 2, "cuda").total
    text = report(cfg, gpus=2, nodes=1, device="cuda", memory=need * 0.9, peak_flops=100e12)
    assert "after 1 growth stage(s)" in text and "4,999,424" in text and "does NOT fit" in text
    assert "fits" in report(cfg, gpus=2, nodes=1, device="cuda", memory=need * 1.1, peak_flops=100e12)


@pytest.mark.parametrize("flags,ranks,per_node", [
    ([], 16, 8),                                   # hostfile.example: 2 hosts x 8 slots
    (["--include", "worker-0@worker-1:0,2"], 10, 8),  # the README's filters: hosts left with different slots
    (["--exclude", "worker-1:0"], 15, 8),
    (["--nodes", "1"], 8, 8),                      # as deepspeed --num_nodes / --num_gpus: first hosts, first slots
    (["--gpus", "2"], 4, 2),
])
def test_plan_counts_the_ranks_deepspeed_would_start_from_a_hostfile(flags, ranks, per_node, capsys):
    from scaletrain.cli import main

    argv = ["plan", "--config", TINY_YAML, "--hostfile", str(REPO / "hostfile.example"), "--device", "cpu",
            "--memory-gb", "64", "--peak-tflops", "1", *flags]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert f"batch        {ranks} rank(s) x " in text
    # the busiest machine's ranks share its 1 TFLOP/s: the step takes as long as `per_node` ranks' work on one
    cfg = load_config(TINY_YAML)
    from scaletrain.plan import flops_per_token

    tokens = cfg.global_batch_windows(ranks) * cfg.train.seq_len
    best = float(text.split("step time    >= ")[1].split(" s")[0])
    assert best == pytest.approx(tokens * flops_per_token(cfg) / (1e12 * ranks / per_node), rel=2e-3)
