"""kernels/cpu_matmul.py: oneDNN fp32 linear (forward and both gradients) against F.linear, the routing
rule (AMD CPUs, fp32, switchable off), and a compiled model's step equal with and without it.

The op tests call the oneDNN path directly, so they run on any CPU with oneDNN, not only where the
trainer would route to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from scaletrain.kernels import build, cpu_matmul
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape
from scaletrain.train.metrics import measure_peak_flops

needs_onednn = pytest.mark.skipif(not cpu_matmul.onednn_available(), reason="PyTorch built without oneDNN")


def rel_err(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_forward_and_gradients_equal_f_linear(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 96, generator=g).transpose(0, 1)  # non-contiguous 3-D input: reshaped inside
    w = torch.randn(80, 96, generator=g)
    b = torch.randn(80, generator=g) if bias else None
    dy = torch.randn(40, 3, 80, generator=g)
    results = []
    for fn in (lambda *a: cpu_matmul._linear(a[0].reshape(-1, 96), *a[1:]).view(40, 3, 80), F.linear):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        bs = b.clone().requires_grad_() if bias else None
        y = fn(xs, ws, bs)
        (y * dy).sum().backward()
        results.append([y.detach(), xs.grad, ws.grad] + ([bs.grad] if bias else []))
    for name, ours, ref in zip(("y", "dx", "dw", "db"), *results):
        assert rel_err(ours, ref) < 1e-6, name


@needs_onednn
def test_mm_nt_takes_transposed_views():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(64, 48, generator=g), torch.randn(64, 32, generator=g)
    assert rel_err(cpu_matmul.mm_nt(a.t(), b.t()), a.t() @ b) < 1e-6  # [48, 64] @ [64, 32]


def test_routing_is_fp32_cpu_on_amd_with_avx512_only_and_switchable(monkeypatch):
    x = torch.randn(4, 8)
    amd = cpu_matmul._cpu_vendor() == "AuthenticAMD" and cpu_matmul.onednn_available()
    assert cpu_matmul.preferred(x) == (amd and build.cpu_has_avx512())
    monkeypatch.setattr(build, "cpu_has_avx512", lambda: False)  # AVX2 only: MKL is as fast (docstring)
    assert not cpu_matmul.preferred(x)
    monkeypatch.setattr(build, "cpu_has_avx512", lambda: True)
    assert cpu_matmul.preferred(x) == amd
    assert not cpu_matmul.preferred(x.to(torch.bfloat16))  # bf16 matmuls already run in oneDNN
    monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", "torch")
    assert not cpu_matmul.preferred(x)


def test_peak_is_at_least_what_torch_mm_reaches():
    """The bench's MFU denominator takes the faster of mm and oneDNN: it can never be below mm's."""
    torch.manual_seed(0)
    before = torch.get_rng_state()
    peak = measure_peak_flops(torch.float32, torch.device("cpu"), size=256, seconds=0.2)
    assert peak > 1e9
    # measured after a resume restored the RNG: it must not draw from the global stream
    assert torch.equal(torch.get_rng_state(), before)


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@needs_onednn
def test_model_linears_and_chunked_loss_go_through_onednn_when_routed(monkeypatch):
    shape = LlamaShape(vocab_size=256, hidden_size=64, num_layers=1, num_heads=1, num_kv_heads=1,
                       intermediate_size=128, max_seq_len=16)
    model = LlamaForCausalLM(shape, loss_chunk=8)
    ids = torch.randint(0, 256, (1, 16))
    monkeypatch.setattr(cpu_matmul, "_onednn_faster", lambda: True)
    with OpNames() as seen:
        model(ids[:, :-1], ids[:, 1:]).backward()
    assert {"scaletrain.onednn_linear", "scaletrain.onednn_mm_nt"} <= seen.names
    assert "aten.mm" not in seen.names  # every fp32 matmul of the step went to oneDNN
    monkeypatch.setattr(cpu_matmul, "_onednn_faster", lambda: False)
    with OpNames() as seen:
        model(ids[:, :-1], ids[:, 1:]).backward()
    assert "scaletrain.onednn_linear" not in seen.names and "aten.mm" in seen.names


@needs_onednn
def test_compiled_model_step_is_the_same_with_onednn_linears(monkeypatch):
    shape = LlamaShape(vocab_size=256, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=256, max_seq_len=96)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape, loss_chunk=64)
    ids = torch.randint(0, 256, (2, 96))
    monkeypatch.setattr(cpu_matmul, "_onednn_faster", lambda: True)  # route to oneDNN on any CPU
    results = []
    for mode in ("ours", "torch"):
        monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", mode)
        torch._dynamo.reset()
        model.zero_grad()
        loss = torch.compile(model)(ids[:, :-1], ids[:, 1:])
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_t, grads_t) = results
    assert loss_a == pytest.approx(loss_t, rel=1e-6)
    for a, t in zip(grads_a, grads_t):
        assert rel_err(a, t) < 1e-5
