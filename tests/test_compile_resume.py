"""`train.compile`: checkpoints carry the eager model's names, so compiled and eager runs resume from
each other and export works from either. The runs also exercise train.loss_chunk and data.doc_mask.

A run is interrupted (SIGUSR1) right after its first checkpoint and resumed with compile switched;
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


def _interrupt_after_first_checkpoint(overrides: list[str], run_dir) -> int:
    proc = start_training(1, overrides)
    assert wait_for((run_dir / "checkpoints" / "latest").exists, timeout=300), proc.communicate()[0][-3000:]
    signal_ranks(run_dir)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "preempted" and status["step"] < STEPS, status
    return status["step"]


@pytest.mark.slow
@pytest.mark.parametrize("first,then", [(True, False), (False, True)], ids=["compiled-then-eager", "eager-then-compiled"])
def test_resume_across_compile_on_and_off(runs, first, then):
    root, base, expected = runs
    d = root / f"switch-{first}"
    stopped = _interrupt_after_first_checkpoint([*base, f"train.compile={str(first).lower()}", f"run.dir={d}"], d)
    if first:  # the compiled run's checkpoint holds plain parameter names
        states = torch.load(d / "checkpoints" / f"global_step{stopped}" / "mp_rank_00_model_states.pt",
                            map_location="cpu", weights_only=False)
        names = list(states["module"])
        shape = LlamaShape.from_config(load_config(REPO / "configs/tiny.yaml", [*TINY]).model)
        assert names == list(LlamaForCausalLM(shape).state_dict()) and not any("_orig_mod" in n for n in names)
    proc = run_training(1, [*base, f"train.compile={str(then).lower()}", f"run.dir={d}"], timeout=600)
    assert f"resumed from {d / 'checkpoints' / f'global_step{stopped}'}" in proc.stdout
    got = tb_scalars(d, "train/loss")
    assert sorted(got) == list(range(1, STEPS + 1))
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, rel=1e-3), f"step {step} (stopped at {stopped})"
    if then:  # export from a run that ended compiled
        from launch_utils import run_cli

        rc, out, err = run_cli("export-hf", str(d), "--out", str(root / f"hf-{first}"), timeout=300)
        assert rc == 0, err[-2000:]
        assert (root / f"hf-{first}" / "config.json").is_file()
