"""Installing grown state into a fresh DeepSpeed engine (every ZeRO stage, fp32 and bf16) and freeing the old one.

Runs in a subprocess (one rank: DeepSpeed needs a process group). Values are read back through DeepSpeed's
own accessors (`safe_get_full_*`, the torch optimizer, or the state dict DeepSpeed would save).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from launch_utils import REPO

SCRIPT = textwrap.dedent('''
    import dataclasses, json, os, sys, tempfile
    from pathlib import Path
    import torch
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    from scaletrain.config import Config, save_config
    from scaletrain.growth.engine_state import install, release_engine
    from scaletrain.model.classify import LlamaForSequenceClassification
    from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
    from scaletrain.train.distributed import setup
    from scaletrain.train.schedule import LrSchedule
    from scaletrain.train.build import build_optimizer
    from scaletrain.weights.writer import write_safetensors

    setup(1)
    shape = LlamaShape(32, 2, 4, 2, 48, 64, 32, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = {n: torch.randn_like(p) * 0.05 for n, p in LlamaForCausalLM(shape).named_parameters()}
    moments = {k: {n: torch.rand_like(t) * (1e-3 if k == "exp_avg_sq" else 1e-2) for n, t in ref.items()}
               for k in ("exp_avg", "exp_avg_sq")}
    src = Path(tempfile.mkdtemp())
    specs = lambda d: [(n, tuple(t.shape), torch.float32) for n, t in d.items()]
    write_safetensors(src, specs(ref), ref.items(), 1 << 30, progress=False)
    for k, d in moments.items():
        (src / "optimizer" / k).mkdir(parents=True)
        write_safetensors(src / "optimizer" / k, specs(d), d.items(), 1 << 30, progress=False)
    (src / "optimizer" / "state.json").write_text(json.dumps({"adam_step": 7}))
    model_cfg = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=48, vocab_size=64,
                     max_seq_len=32, tie_word_embeddings=False)
    save_config(Config.model_validate({"model": model_cfg, "train": {"seq_len": 32}}), src / "config.yaml")

    def getter(engine, name, p, kind):
        opt = engine.optimizer
        if isinstance(opt, torch.optim.Optimizer):
            return p.data if kind is None else opt.state[p][kind]
        if engine.zero_optimization_stage() == 0:  # bf16 without ZeRO: what DeepSpeed would save
            i = next(j for j, q in enumerate(q for g in opt.fp16_groups for q in g) if q is p)
            sd = opt.state_dict()
            masters = [t for g in sd["fp32_groups"] for t in g]
            return masters[i] if kind is None else sd["optimizer_state_dict"]["state"][i][kind]
        return safe_get_full_fp32_param(p) if kind is None else safe_get_full_optimizer_state(p, kind)

    cfg = Config()
    for stage in (0, 1, 2, 3):
        for precision in ("fp32", "bf16"):
            model = LlamaForCausalLM(shape)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(ref[n])
            ds = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 2,
                  "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
                  "steps_per_print": 10**9, "gradient_clipping": 1.0}
            if precision == "bf16":
                ds["bf16"] = {"enabled": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds,
                                              lr_scheduler=lambda opt: LrSchedule(opt, 1e-3, 1e-4, 5, 100))
            install(engine, src, precision, grad_accum=2)
            # the lr-0 step that creates Adam's state is not a training step: schedule and counters stay at 0
            assert engine.lr_scheduler.steps_done == 0 and engine.global_steps == 0, (stage, precision)
            assert engine.global_samples == 0 and engine.skipped_steps == 0, (stage, precision)
            for n, p in engine.module.named_parameters():
                for kind, want in ((None, ref[n]), ("exp_avg", moments["exp_avg"][n]), ("exp_avg_sq", moments["exp_avg_sq"][n])):
                    got = getter(engine, n, p, kind).float().reshape(want.shape)
                    assert torch.equal(got, want), (stage, precision, n, kind, (got - want).abs().max())
            base = engine.optimizer
            while not isinstance(base, torch.optim.Optimizer):
                base = base.optimizer
            assert all(float(s["step"]) == 7 for s in base.state.values()), (stage, precision)
            freed = release_engine(engine)
            del engine, model, base, p, _  # (_ holds the optimizer deepspeed.initialize returned)
            assert freed(), ("old engine still referenced", stage, precision)
            print("ok", stage, precision, flush=True)

    # A classifier started from a grown LM dir: the moments are the LM head's, so the optimizer starts fresh; the
    # lr-0 step (also run when a classifier run is resharded) feeds it one label per sequence.
    from scaletrain.growth.engine_state import _base_optimizer, _materialise_adam_state
    model = LlamaForSequenceClassification(dataclasses.replace(shape, num_labels=3))
    ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
          "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds)
    install(engine, src, "fp32", grad_accum=1)
    assert not _base_optimizer(engine).state
    _materialise_adam_state(engine, 1)
    assert len(_base_optimizer(engine).state) > 0
    print("ok classifier", flush=True)
''')


def test_install_masters_and_moments_every_zero_stage_and_free_engine():
    env = {"PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 9, proc.stdout
