"""The CPU attention kernel (scaletrain/kernels/cpu_attention.cpp), bf16 and fp32, against fp32 eager attention.

The oracle is autograd through eager attention in fp32 on the same bf16 inputs; the tolerance is stated
relative to the largest gradient (bf16 has 8 bits of mantissa: PyTorch's own bf16 kernel lands at ~1e-2).
In bf16 the kernel needs AMX or AVX-512-BF16, in fp32 AVX-512 or AVX2; those tests skip elsewhere, the routing tests
run everywhere.
"""

from __future__ import annotations

import math

import pytest
import torch

from scaletrain.kernels import build, cpu_attention
from scaletrain.model.attention import attention, eager_attention
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape

needs_kernel = pytest.mark.skipif(not cpu_attention.kernel_ready(bf16=True), reason="needs AMX or AVX-512-BF16 and a C++ compiler")
needs_fp32_kernel = pytest.mark.skipif(not cpu_attention.kernel_ready(bf16=False), reason="needs AVX2 or AVX-512 and a C++ compiler")
BF16_REL = 2e-2


def qkv(b, h, kh, t, d, seed=0, layout="bhtd", dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    if layout == "bthd":  # the model's layout: projections give [B, T, H, D], attention reads a transposed view
        make = lambda n: torch.randn(b, t, n, d, generator=g).to(dtype).transpose(1, 2)  # noqa: E731
    elif layout == "odd":  # an odd row stride (d + 1): bf16 rows are not whole 32-bit words (the packing's other path)
        make = lambda n: torch.randn(b, n, t, d + 1, generator=g).to(dtype)[..., :d]  # noqa: E731
    elif layout == "shifted":  # rows that start at an odd bf16 offset (not on a 32-bit word)
        make = lambda n: torch.randn(b, n, t, d + 2, generator=g).to(dtype)[..., 1 : d + 1]  # noqa: E731
    else:
        make = lambda n: torch.randn(b, n, t, d, generator=g).to(dtype)  # noqa: E731
    return [x.detach().requires_grad_() for x in (make(h), make(kh), make(kh))]


def grads(fn, q, k, v, dout):
    out = fn(q, k, v)
    (out.float() * dout).sum().backward()
    result = [out.detach().float()] + [x.grad.float() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    return result


def rel_err(a, ref):
    return ((a - ref).abs().max() / ref.abs().max()).item()


SHAPES = [
    (2, 4, 4, 64, 64, "bhtd"),     # one block
    (2, 4, 2, 200, 64, "bthd"),    # GQA, T not a multiple of the block, strided views
    (1, 2, 1, 130, 128, "bhtd"),   # head size 128, a 2-row last block
    (1, 2, 2, 333, 64, "bthd"),    # odd rows in the last block (13): P and dS rows go in pairs
    (4, 4, 4, 512, 64, "bthd"),    # the bench's reference shape
    (1, 2, 1, 128, 64, "odd"),     # rows at an odd stride
    (1, 2, 1, 96, 64, "shifted"),  # rows at an odd offset
]


def check_against_fp32_eager(b, h, kh, t, d, layout, dtype, tol):
    q, k, v = qkv(b, h, kh, t, d, layout=layout, dtype=dtype)
    dout = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(1))
    assert cpu_attention.applies(q, k, v)
    ours = grads(cpu_attention.attention, q, k, v, dout)
    ref = grads(lambda *x: eager_attention(*(y.float() for y in x)), q, k, v, dout)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a, r) < tol, name


@needs_kernel
@pytest.mark.parametrize("b,h,kh,t,d,layout", SHAPES)
def test_kernel_gradients_match_fp32_eager(b, h, kh, t, d, layout):
    check_against_fp32_eager(b, h, kh, t, d, layout, torch.bfloat16, BF16_REL)


@needs_fp32_kernel
@pytest.mark.parametrize("b,h,kh,t,d,layout", SHAPES)
def test_fp32_kernel_gradients_match_fp32_eager(b, h, kh, t, d, layout):
    check_against_fp32_eager(b, h, kh, t, d, layout, torch.float32, 1e-5)


@needs_kernel
def test_sdpa_backend_routes_training_through_the_kernel(monkeypatch):
    calls = []
    real = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(1) or real(*a))
    q, k, v = qkv(1, 2, 2, 64, 64)
    attention(q, k, v, "sdpa")
    assert calls == [1]
    with torch.no_grad():  # inference: PyTorch's forward alone
        attention(q, k, v, "sdpa")
    attention(*(x.detach().float().requires_grad_() for x in (q, k, v)), "sdpa")  # fp32: ours too
    assert calls == [1, 1]
    attention(q[..., :32], k[..., :32], v[..., :32], "sdpa")  # head size 32: PyTorch's kernel
    monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", "torch")
    attention(q, k, v, "sdpa")
    assert calls == [1, 1]


@needs_kernel
def test_packing_gives_the_vnni_panels_the_micro_kernels_read():
    """Every GEMM's B operand goes through this packing: [k, n] -> n/64 panels, each [k/2][64][2] (row pairs
    interleaved). Ours (AVX-512-BF16 CPUs) must give exactly that layout; where oneDNN packs (AMX), its
    packing must equal ours, or the kernel's assumption about the tile layout is wrong."""
    k, n = 96, 192
    x = torch.randn(k, n).to(torch.bfloat16)
    want = x.view(k // 2, 2, n // 64, 64).permute(2, 0, 3, 1).reshape(k, n)  # panel, row pair, column, parity
    ext = build.extension()
    assert torch.equal(ext.pack_panels(x, False), want)
    if torch.cpu._is_amx_tile_supported() and build.bf16_engine() == "AMX":
        assert torch.equal(ext.pack_panels(x, True), want)


def test_applies_only_to_what_the_kernel_computes():
    q = torch.randn(1, 2, 64, 64, requires_grad=True)
    assert not cpu_attention.applies(q.half(), q.half(), q.half())  # fp16
    qb = q.detach().to(torch.bfloat16).requires_grad_()
    assert not cpu_attention.applies(qb, qb[:, :, :32], qb[:, :, :32])  # Tq != Tk (a KV cache)
    assert not cpu_attention.applies(qb[..., :48], qb[..., :48], qb[..., :48])  # head size not a multiple of 64
    assert not cpu_attention.applies(qb.detach(), qb.detach(), qb.detach())  # nothing needs a gradient


@needs_kernel
def test_compiled_bf16_model_step_matches_pytorch_backward(monkeypatch):
    """A compiled model's step with the kernel equals the same step with PyTorch's backward (bf16 noise)."""
    shape = LlamaShape(vocab_size=256, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=256, max_seq_len=96)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape).to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 96))
    results = []
    for mode in ("ours", "torch"):
        monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", mode)
        torch._dynamo.reset()
        step = torch.compile(model)
        loss = step(ids[:, :-1], ids[:, 1:])
        model.zero_grad()
        loss.backward()
        results.append((loss.item(), [p.grad.float().clone() for p in model.parameters()]))
    (loss_a, grads_a), (loss_t, grads_t) = results
    assert math.isclose(loss_a, loss_t, rel_tol=1e-3)
    for a, t in zip(grads_a, grads_t):
        assert rel_err(a, t) < 5e-2


ROPE_SHAPES = [(2, 4, 2, 200, 64, "bthd"), (1, 2, 1, 130, 128, "bhtd"), (4, 4, 4, 512, 64, "bthd")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("b,h,kh,t,d,layout", ROPE_SHAPES)
def test_rope_inside_the_kernel_matches_eager_on_rotated_inputs(b, h, kh, t, d, layout, dtype):
    """q, k go in unrotated with the model's tables; out and the gradients w.r.t. the unrotated q, k, v equal
    fp32 eager attention of apply_rope(q), apply_rope(k), v (autograd through the rotation)."""
    if not cpu_attention.kernel_ready(bf16=dtype == torch.bfloat16):
        pytest.skip("needs the kernel for this dtype")
    from scaletrain.model.llama import apply_rope, rope_tables

    q, k, v = qkv(b, h, kh, t, d, layout=layout, dtype=dtype, seed=3)
    cos, sin = (x.to(dtype) for x in rope_tables(d, 10000.0, torch.arange(t)))
    assert cpu_attention.rope_applies(q, cos)
    dout = torch.randn(b, h, t, d, generator=torch.Generator().manual_seed(4))
    ours = grads(lambda *x: cpu_attention.attention(*x, cos, sin), q, k, v, dout)
    c, s = cos.float(), sin.float()
    ref = grads(lambda q, k, v: eager_attention(apply_rope(q.float(), c, s), apply_rope(k.float(), c, s), v.float()),
                q, k, v, dout)
    tol = 1e-5 if dtype == torch.float32 else BF16_REL
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a, r) < tol, name


@needs_fp32_kernel
@pytest.mark.parametrize("layout", ["bthd", "bhtd"])
def test_outputs_come_in_their_inputs_layout(layout):
    """The model's q, k, v are [B, T, H, D] memory seen as [B, H, T, D]: out, dq, dk, dv come the same way,
    so reshaping them for a linear layer is a view; contiguous inputs get contiguous outputs."""
    q, k, v = qkv(1, 4, 2, 64, 64, dtype=torch.float32, layout=layout)
    out, lse = cpu_attention._forward(q, k, v, None, None)
    grads = cpu_attention._backward(torch.ones_like(out), q, k, v, out, lse, None, None)
    for x, y in zip((q, q, k, v), (out, *grads)):
        assert y.stride() == x.stride()
    assert out.transpose(1, 2).is_contiguous() == (layout == "bthd")


@needs_fp32_kernel
@pytest.mark.parametrize("doc_ids", [False, True])
def test_model_rotates_inside_the_kernel_only_where_it_can(doc_ids, monkeypatch):
    """fp32 model, eager: with the kernel (RoPE inside it; per-document positions keep the model's rotation)
    loss and gradients equal the model with PyTorch's kernels, and the model's own rope runs only where
    the kernel cannot take it."""
    from scaletrain.model.docmask import document_ids
    from scaletrain.model.llama import Attention

    shape = LlamaShape(vocab_size=256, hidden_size=128, num_layers=2, num_heads=2, num_kv_heads=1,
                       intermediate_size=256, max_seq_len=96)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape)
    ids = torch.randint(1, 256, (2, 97))
    ids[:, 40] = 0
    docs = document_ids(ids[:, :-1], 0) if doc_ids else None
    rotations = []
    real_rope = Attention.rope
    monkeypatch.setattr(Attention, "rope", lambda self, *a: rotations.append(1) or real_rope(self, *a))
    results = []
    for mode in ("ours", "torch"):
        monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", mode)
        rotations.clear()
        model.zero_grad()
        loss = model(ids[:, :-1], ids[:, 1:], doc_ids=docs)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()], len(rotations)))
    (loss_a, grads_a, rot_a), (loss_t, grads_t, rot_t) = results
    assert rot_t == 2 and rot_a == (2 if doc_ids else 0)
    assert math.isclose(loss_a, loss_t, rel_tol=1e-6)
    for a, t in zip(grads_a, grads_t):
        assert rel_err(a, t) < 1e-4


@needs_fp32_kernel
def test_value_gradient_follows_its_own_layout_when_k_and_v_differ():
    """dV is written with dV's strides, not dK's: K contiguous, V a transposed view (it was off by ~4)."""
    q, k, _ = qkv(1, 2, 2, 64, 64, dtype=torch.float32)
    v = torch.randn(1, 64, 2, 64, generator=torch.Generator().manual_seed(3)).transpose(1, 2).requires_grad_()
    assert cpu_attention.applies(q, k, v)
    dout = torch.randn(1, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    ours = grads(cpu_attention.attention, q, k, v, dout)
    ref = grads(eager_attention, q, k, v, dout)
    for name, a, r in zip(("out", "dq", "dk", "dv"), ours, ref):
        assert rel_err(a, r) < 1e-5, name


@needs_fp32_kernel
def test_shapes_the_kernel_cannot_read_are_refused():
    """V with another head size or head count than K goes to SDPA; the op itself refuses it (it read and
    wrote past V's rows)."""
    q, k, _ = qkv(1, 2, 2, 64, 128, dtype=torch.float32)
    for v in (torch.randn(1, 2, 64, 64), torch.randn(1, 4, 64, 128)):
        v.requires_grad_()
        assert not cpu_attention.applies(q, k, v)
        with pytest.raises(RuntimeError, match="k and v of one shape"):
            build.extension().attention_forward(q, k, v, 0.125, None, None)


@needs_fp32_kernel
def test_a_nan_key_makes_the_output_nan_as_in_eager():
    """A NaN score is not probability 0: the NaN must reach the loss, where the NaN guard sees it."""
    q, k, v = qkv(1, 2, 2, 64, 64, dtype=torch.float32)
    k = k.detach().clone()
    k[0, 0, 5, 3] = float("nan")
    k.requires_grad_()
    ours = cpu_attention.attention(q, k, v)
    assert torch.equal(ours.isnan(), eager_attention(q, k, v).isnan()) and ours[0, 0, 5:].isnan().all()
