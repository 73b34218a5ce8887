"""The lineage id of a training checkpoint is a hash of the weights alone: the same at ZeRO stage 0, 2 and 3
(where parameters are in pieces and must be gathered), equal to a hash computed here from the tensors by
the documented scheme, and different once a step has changed the weights.

Runs in a subprocess (one rank: DeepSpeed needs a process group).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from launch_utils import REPO

SCRIPT = textwrap.dedent('''
    import hashlib
    import deepspeed, torch
    from scaletrain.config import Config
    from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
    from scaletrain.train.distributed import setup
    from scaletrain.train.run_lineage import weights_id
    from scaletrain.train.build import build_optimizer

    ST = {torch.float32: "F32", torch.bfloat16: "BF16"}

    def by_hand(tensors):  # name|dtype|shape| + raw bytes per tensor, then the sorted name=digest lines
        lines = []
        for name in sorted(tensors):
            t = tensors[name]
            h = hashlib.sha256(f"{name}|{ST[t.dtype]}|{list(t.shape)}|".encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            lines.append(f"{name}={h.hexdigest()}\\n")
        return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]

    setup(1)
    shape = LlamaShape(32, 2, 4, 2, 48, 64, 32, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = {n: p.detach().clone() for n, p in LlamaForCausalLM(shape).named_parameters()}
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        want = by_hand({n: t.to(dtype) for n, t in ref.items()})
        for stage in (0, 2, 3):
            model = LlamaForCausalLM(shape)
            with torch.no_grad():
                for n, p in model.named_parameters():
                    p.copy_(ref[n])
            ds = {"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
            if precision == "bf16":
                ds["bf16"] = {"enabled": True}
            engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, Config()), config=ds)
            if stage == 3:
                assert all(p.numel() == 0 for p in engine.module.parameters()), "ZeRO-3 should hold no full parameter"
            got = weights_id(engine.module, True)
            assert got == want, (precision, stage, got, want)
            x = torch.randint(0, 64, (1, 16))
            loss = engine(x, targets=x)
            engine.backward(loss)
            engine.step()
            after = weights_id(engine.module, True)
            assert after != want, (precision, stage, "a step did not change the id")
            print("ok", precision, stage, got, after, flush=True)
    import sys
    # DeepSpeed's ZeRO check would import Muon, whose @torch.compile imports inductor (1.7 s a start): skipped
    assert "torch._inductor.compile_fx" not in sys.modules, "a ZeRO engine for AdamW imported inductor"
''')


def test_training_checkpoint_id_hashes_the_weights_at_every_zero_stage():
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") == 6, proc.stdout


def test_shard_sizes_parse_or_fail_in_one_line():
    from scaletrain.errors import UserError
    from scaletrain.weights.writer import parse_size

    assert [parse_size(t) for t in ("2GB", "500MB", "1GiB", "3 kib", "7")] == [2 * 10**9, 5 * 10**8, 2**30, 3072, 7]
    for bad in ("5i", "5IB", "2 GBs", "-1MB", "0"):
        with pytest.raises(UserError, match="--max-shard-size"):
            parse_size(bad)


def test_writer_refuses_a_stream_that_disagrees_with_its_specs(tmp_path):
    """The shards are planned from the specs before any tensor is read: a stream with a tensor the plan lacks
    (or in another order) is an internal error, never a file that silently misses a weight."""
    import torch

    from scaletrain.weights.writer import write_safetensors

    a, b = torch.ones(2, 3), torch.zeros(4)
    specs = [("a", (2, 3), torch.float32)]
    with pytest.raises(RuntimeError, match="after the last planned tensor"):
        write_safetensors(tmp_path, specs, [("a", a), ("b", b)], 1 << 20, progress=False)
    with pytest.raises(RuntimeError, match="out of order"):
        write_safetensors(tmp_path, specs + [("b", (4,), torch.float32)], [("b", b), ("a", a)], 1 << 20, progress=False)
    info = write_safetensors(tmp_path, specs, [("a", a)], 1 << 20, progress=False)
    from safetensors.torch import load_file

    assert info["files"] == ["model.safetensors"] and torch.equal(load_file(tmp_path / "model.safetensors")["a"], a)
