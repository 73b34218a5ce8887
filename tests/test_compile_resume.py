"""`train.compile`: checkpoints carry the eager model's names, so compiled and eager runs resume from
each other and export works from either. The runs also exercise train.loss_chunk and data.doc_mask.

A run is interrupted (SIGUSR1) after a checkpoint and resumed with compile switched, twice (off, on, off);
its loss curve must follow a straight eager run's (fp32; inductor reorders float ops, so "follow"
means within 1e-3 relative, not bit-exact).
"""

from __future__ import annotations

import json

import pytest
import torch

from launch_utils import REPO, TINY, run_training, small_corpus, signal_ranks, start_training, tb_scalars, wait_for
from scaletrain.config import load_config
from scaletrain.errors import UserError
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
from scaletrain.train.perf import compile_model

STEPS = 30


VARIANTS = {  # the architecture switches (README "Variants"), in two compiled models
    "llama": {},
    "layernorm-gelu-qknorm-alibi-window-bias": dict(norm="layernorm", ffn="gelu", qk_norm=True, position="alibi",
                                                    attention_window=8, bias=True),
    "parallel-relu2-nope": dict(parallel_block=True, ffn="relu2", position="none"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_model_keeps_eager_names_and_numerics(variant):
    shape = LlamaShape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                       vocab_size=101, max_seq_len=64, init_std=0.1, **VARIANTS[variant])
    torch.manual_seed(0)
    eager = LlamaForCausalLM(shape)
    compiled = compile_model(LlamaForCausalLM(shape))
    compiled.load_state_dict(eager.state_dict())
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in k for k in compiled.state_dict())
    x = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(1))
    y = torch.roll(x, -1, 1)
    le, lc = eager(x, y), compiled(x, y)
    le.backward()
    lc.backward()
    assert lc.item() == pytest.approx(le.item(), rel=1e-5)
    for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
        assert torch.allclose(pc.grad, pe.grad, rtol=1e-4, atol=1e-6), name


def test_compile_with_zero3_is_refused_at_config_time():
    with pytest.raises(UserError, match="train.compile needs zero.stage <= 2"):
        load_config(None, ["train.compile=true", "zero.stage=3"])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    corpus = small_corpus(root / "corpus")
    base = [*TINY, f"data.source={corpus}", f"data.cache_dir={root / 'cache'}", "train.precision=fp32",
            "train.loss_chunk=48", "data.doc_mask=true", f"train.max_steps={STEPS}", "train.save_every=2"]
    straight = root / "straight"
    run_training(1, [*base, f"run.dir={straight}"])
    return root, base, tb_scalars(straight, "train/loss")


def _latest_step(run_dir) -> int:
    latest = run_dir / "checkpoints" / "latest"
    return int(latest.read_text().removeprefix("global_step")) if latest.exists() else 0


def _interrupt_after_a_new_checkpoint(overrides: list[str], run_dir) -> int:
    """Start, stop (SIGUSR1) once a checkpoint newer than the run's last one is written; the step it stopped at."""
    before = _latest_step(run_dir)
    proc = start_training(1, overrides)
    assert wait_for(lambda: _latest_step(run_dir) > before, timeout=300), proc.communicate()[0][-3000:]
    signal_ranks(run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and before < status["step"] < STEPS, status
    assert ("resumed from" in out) == bool(before), out[-3000:]
    return status["step"]


@pytest.mark.slow
def test_resume_across_compile_off_on_off_and_export_of_the_compiled_part(runs):
    """eager -> (stop, resume compiled) -> (stop, resume eager): the curve follows the straight run; the
    compiled part's checkpoint holds the eager names, and its export equals DeepSpeed's own reading of it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from hf_fixtures import tensors_of
    from launch_utils import run_cli

    root, base, expected = runs
    d = root / "switch"
    stopped = _interrupt_after_a_new_checkpoint([*base, "train.compile=false", f"run.dir={d}"], d)
    compiled_at = _interrupt_after_a_new_checkpoint([*base, "train.compile=true", f"run.dir={d}"], d)
    tag = d / "checkpoints" / f"global_step{compiled_at}"
    names = list(torch.load(tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"])
    shape = LlamaShape.from_config(load_config(REPO / "configs/tiny.yaml", [*TINY]).model)
    assert names == list(LlamaForCausalLM(shape).state_dict()) and not any("_orig_mod" in n for n in names)
    rc, out, err = run_cli("export-hf", str(tag), "--out", str(root / "hf-compiled"), timeout=300)
    assert rc == 0, err[-2000:]
    oracle = get_fp32_state_dict_from_zero_checkpoint(str(d / "checkpoints"), tag=tag.name)
    exported = tensors_of(root / "hf-compiled")
    assert exported and set(exported) <= set(oracle)
    assert all(torch.equal(v, oracle[k].to(v.dtype)) for k, v in exported.items())

    proc = run_training(1, [*base, "train.compile=false", f"run.dir={d}"], timeout=600)
    assert f"resumed from {tag}" in proc.stdout
    got = tb_scalars(d, "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-3), f"step {step} (stopped at {stopped}, {compiled_at})"
