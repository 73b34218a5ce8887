"""SwiGLU's elementwise kernel (scaletrain/kernels/swiglu.cpp): silu(gate) * up and its gradients against
PyTorch's fp32 autograd, in the model's FFN and under torch.compile. Needs an AVX2 or AVX-512 CPU and a compiler
(bf16 also AVX-512-BF16); skips elsewhere, where the FFN keeps F.silu(gate) * up."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scaletrain.kernels import swiglu

needs_fp32 = pytest.mark.skipif(not swiglu._ready(False), reason="needs an AVX2 or AVX-512 CPU and a C++ compiler")


def _skip_unless(dtype):
    if not swiglu._ready(dtype == torch.bfloat16):
        pytest.skip("the bf16 kernel needs AVX-512-BF16" if dtype == torch.bfloat16 else "needs the kernels")


def reference(gate, up, grad):
    g, u = gate.double().requires_grad_(), up.double().requires_grad_()
    out = F.silu(g) * u
    return (out, *torch.autograd.grad(out, (g, u), grad.double()))


def rel(a, b) -> float:
    return ((a.double() - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(64, 688), (3, 37)])  # 37 * 3: a scalar tail after the 16-lane loop
def test_kernel_matches_autograd(dtype, shape):
    _skip_unless(dtype)
    g = torch.Generator().manual_seed(0)
    gate, up, grad = ((torch.randn(*shape, generator=g) * 4).to(dtype) for _ in range(3))
    gate[0, :3] = torch.tensor([-100.0, 100.0, 0.0])  # saturated sigmoid both ways, and its midpoint
    want_out, want_dg, want_du = reference(gate, up, grad)
    a, b = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = swiglu.silu_mul(a, b)
    dg, du = torch.autograd.grad(out, (a, b), grad)
    tol = 1e-6 if dtype == torch.float32 else 8e-3  # bf16: one rounding of each result
    assert out.dtype == dg.dtype == du.dtype == dtype
    assert rel(out, want_out) <= tol and rel(dg, want_dg) <= tol and rel(du, want_du) <= tol
    assert torch.isfinite(dg).all() and torch.isfinite(out).all()


@needs_fp32
def test_kernel_is_used_and_off_switch_restores_pytorch(monkeypatch):
    calls = []
    real = swiglu._silu_mul
    monkeypatch.setattr(swiglu, "_silu_mul", lambda *a: calls.append(1) or real(*a))
    gate, up = torch.randn(8, 32), torch.randn(8, 32)
    swiglu.silu_mul(gate, up)
    swiglu.silu_mul(gate.t(), up.t())  # not contiguous: PyTorch's ops
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_ffn_matches_eager_pytorch(dtype):
    """The FFN compiled (the custom op is one node with its own backward) equals F.silu(gate) * up eager."""
    _skip_unless(dtype)
    import torch._dynamo

    from scaletrain.model.blocks import SwiGLU

    torch._dynamo.reset()
    torch.manual_seed(0)
    ffn = SwiGLU(32, 96, bias=False).to(dtype)
    x = torch.randn(4, 16, 32).to(dtype).requires_grad_()
    compiled = torch.compile(ffn, fullgraph=True)
    out = compiled(x)
    grads = torch.autograd.grad(out.float().square().sum(), [x, *ffn.parameters()])
    x2 = x.detach().requires_grad_()
    plain = ffn.down_proj(F.silu(ffn.gate_proj(x2)) * ffn.up_proj(x2))
    want = torch.autograd.grad(plain.float().square().sum(), [x2, *ffn.parameters()])
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert ((out.float() - plain.float()).abs().max() / plain.float().abs().max()).item() <= tol
    for a, b in zip(grads, want):
        assert ((a.float() - b.float()).abs().max() / b.float().abs().max()).item() <= tol
