"""bf16 gradient accumulation: with train.grad_accum > 1, ZeRO-2 and ZeRO-3 sum the micro-batches' gradients in
fp32 (DeepSpeed's default sums them in bf16). The oracle: the fp32 model's gradient of the same batch.

The engine runs in a subprocess (one rank: DeepSpeed needs a process group); gradients are read back through
DeepSpeed's `safe_get_full_grad` after the last micro-batch's backward, before the optimizer step.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from scaletrain.config import Config
from scaletrain.ds_config import deepspeed_config

from launch_utils import REPO, env

SCRIPT = textwrap.dedent('''
    import copy, json, sys
    import torch
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    from scaletrain.config import Config
    from scaletrain.ds_config import deepspeed_config
    from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
    from scaletrain.train.distributed import setup

    setup(1)
    G, MICRO = 64, 2
    shape = LlamaShape(64, 2, 4, 2, 172, 512, 64)
    torch.manual_seed(0)
    init = copy.deepcopy(LlamaForCausalLM(shape).state_dict())
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (MICRO, 33), generator=gen) for _ in range(G)]

    def fresh(dtype=torch.float32):
        m = LlamaForCausalLM(shape)
        m.load_state_dict(init)
        return m.to(dtype)

    ref = fresh()  # the oracle: fp32 throughout
    for x in batches:
        (ref(x[:, :-1], x[:, 1:]) / G).backward()
    ref = {n: p.grad for n, p in ref.named_parameters()}
    low = fresh(torch.bfloat16)  # bf16 gradients of each micro-batch, summed in fp32: the best a bf16 run can do
    summed = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in low.named_parameters()}
    for x in batches:
        low.zero_grad()
        (low(x[:, :-1], x[:, 1:]) / G).backward()
        for n, p in low.named_parameters():
            summed[n] += p.grad.float()

    def error(grads):  # mean over tensors of the relative L2 distance to the fp32 gradient
        return sum(float((grads[n] - ref[n]).norm() / ref[n].norm()) for n in ref) / len(ref)

    out = {"fp32_sums": error(summed)}
    for stage in (2, 3):
        for passthrough in ({}, {"data_types": {"grad_accum_dtype": "bf16"}}):  # ours, then DeepSpeed's default
            cfg = Config.model_validate({"train": {"precision": "bf16", "grad_accum": G, "micro_batch_size": MICRO,
                                                   "grad_clip": 0.0}, "zero": {"stage": stage}, "deepspeed": passthrough})
            model = fresh()
            engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                              config=deepspeed_config(cfg, 1))
            for i, x in enumerate(batches):
                engine.backward(engine(x[:, :-1].contiguous(), x[:, 1:].contiguous()))
                if i < G - 1:
                    engine.step()  # (a no-op between boundaries, as DeepSpeed wants it called)
            grads = {n: safe_get_full_grad(p).float() for n, p in engine.module.named_parameters()}
            out[f"zero{stage}" + ("_bf16_sums" if passthrough else "")] = error(grads)
            del engine
    print(json.dumps(out))
''')


def test_zero2_and_zero3_sum_bf16_micro_batches_in_fp32():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    err = json.loads(proc.stdout.strip().splitlines()[-1])
    for stage in (2, 3):
        assert err[f"zero{stage}"] == pytest.approx(err["fp32_sums"], rel=1e-3), err  # no error beyond bf16 compute
        assert err[f"zero{stage}_bf16_sums"] > 1.2 * err["fp32_sums"], err  # what DeepSpeed's default costs here


@pytest.mark.parametrize("stage,precision,grad_accum,fp32_sums", [
    (2, "bf16", 4, True), (3, "bf16", 2, True),
    (2, "bf16", 1, False),  # nothing to sum
    (1, "bf16", 4, False),  # DeepSpeed would switch ZeRO-1 to another optimizer class (and checkpoint layout)
    (0, "bf16", 4, False),  # DeepSpeed 0.19 has no fp32 sums without ZeRO
    (2, "fp32", 4, False),
])
def test_which_configs_sum_in_fp32(stage, precision, grad_accum, fp32_sums):
    cfg = Config.model_validate({"train": {"precision": precision, "grad_accum": grad_accum}, "zero": {"stage": stage}})
    assert ("data_types" in deepspeed_config(cfg, 2)) == fp32_sums
    if fp32_sums:
        assert deepspeed_config(cfg, 2)["data_types"] == {"grad_accum_dtype": "fp32"}
        mine = cfg.model_copy(update={"deepspeed": {"data_types": {"grad_accum_dtype": "bf16"}}})
        assert deepspeed_config(mine, 2)["data_types"] == {"grad_accum_dtype": "bf16"}  # the user's mapping wins
