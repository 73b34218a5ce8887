"""The row-wise softmax cross-entropy kernel (scaletrain/kernels/cross_entropy.cpp) against PyTorch's
fp32 log-softmax, and the chunked linear+CE routing through it. Needs an AVX2 or AVX-512 CPU and a compiler
(skips elsewhere, where the chunked loss keeps PyTorch's ops)."""

from __future__ import annotations

import pytest
import torch

from scaletrain.kernels import cross_entropy as ce_kernel
from scaletrain.model.llama import IGNORE_INDEX
from scaletrain.model.loss import linear_cross_entropy

needs_kernel = pytest.mark.skipif(not ce_kernel.kernel_ready(), reason="needs an AVX2 or AVX-512 CPU and a C++ compiler")


@pytest.fixture(autouse=True)
def _bf16_needs_avx512_bf16(request):
    dtype = getattr(request.node, "callspec", None) and request.node.callspec.params.get("dtype")
    if dtype == torch.bfloat16 and not ce_kernel.kernel_ready(True):
        pytest.skip("the bf16 kernel needs AVX-512-BF16")


def reference(logits, targets, weight):
    logp = torch.log_softmax(logits.float(), dim=-1)
    grad = logp.exp()
    grad[torch.arange(len(targets)), targets] -= 1
    return -logp.gather(1, targets[:, None]).squeeze(1), grad * weight[:, None]


@needs_kernel
@pytest.mark.parametrize("dtype,vocab", [(torch.float32, 8192), (torch.float32, 101), (torch.bfloat16, 8192),
                                         (torch.bfloat16, 1000)])  # 101, 1000: the scalar tail of a row
def test_kernel_matches_fp32_log_softmax(dtype, vocab):
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(37, vocab, generator=g) * 4).to(dtype)
    targets = torch.randint(0, vocab, (37,), generator=g)
    weight = torch.rand(37, generator=g)
    want_loss, want_grad = reference(logits, targets, weight)
    buf = logits.clone()
    loss = ce_kernel.softmax_cross_entropy_(buf, targets, weight)
    assert loss.dtype == torch.float32 and buf.dtype == dtype  # the gradient replaced the logits in place
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert torch.allclose(loss, want_loss, rtol=1e-5, atol=1e-5)
    assert (buf.float() - want_grad).abs().max() <= tol * want_grad.abs().max()


@needs_kernel
def test_kernel_rejects_out_of_range_targets():
    with pytest.raises(RuntimeError, match="targets must lie in"):
        ce_kernel.softmax_cross_entropy_(torch.zeros(2, 8), torch.tensor([0, 8]), torch.ones(2))


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_uses_the_kernel_and_equals_pytorch_ops(dtype, monkeypatch):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(96, 32, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(300, 32, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (96,), generator=g)
    t[:20] = IGNORE_INDEX
    calls = []
    real = ce_kernel.softmax_cross_entropy_
    monkeypatch.setattr(ce_kernel, "softmax_cross_entropy_", lambda *a: calls.append(1) or real(*a))
    ours = linear_cross_entropy(h, w, t, 40)
    ours_grads = torch.autograd.grad(ours, (h, w))
    assert len(calls) == 3  # 96 tokens in chunks of 40
    monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", "torch")
    torch_path = linear_cross_entropy(h, w, t, 40)
    torch_grads = torch.autograd.grad(torch_path, (h, w))
    assert len(calls) == 3
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert ours.item() == pytest.approx(torch_path.item(), rel=tol)
    for a, b in zip(ours_grads, torch_grads):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@needs_kernel
@pytest.mark.parametrize("dtype,chunk", [(torch.bfloat16, 40), (torch.bfloat16, 96), (torch.float32, 40),
                                         (torch.float32, 200)])
def test_in_place_path_passes_and_chunks_equal_pytorch_ops(dtype, chunk, monkeypatch):
    """The path where torch's matmul writes into one [chunk, vocab] buffer (bf16; fp32 where torch.mm serves
    fp32, as on Intel CPUs), walked PASS_ROWS rows at a time: uneven passes and chunks, ignored rows, one
    chunk (weight gradient from one GEMM) and several (accumulated in fp32) — against PyTorch's ops."""
    from scaletrain.model import loss as loss_module

    g = torch.Generator().manual_seed(2)
    h = torch.randn(96, 32, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(300, 32, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, 300, (96,), generator=g)
    t[30:45] = IGNORE_INDEX
    monkeypatch.setattr(loss_module, "PASS_ROWS", 16)
    monkeypatch.setattr(loss_module, "preferred", lambda x: False)  # fp32 too takes the in-place path
    calls = []
    real = ce_kernel.softmax_cross_entropy_
    monkeypatch.setattr(ce_kernel, "softmax_cross_entropy_", lambda g, *a: calls.append(len(g)) or real(g, *a))
    ours = linear_cross_entropy(h, w, t, chunk)
    ours_grads = torch.autograd.grad(ours, (h, w))
    chunks = [min(chunk, 96 - s) for s in range(0, 96, chunk)]
    assert calls == [min(16, c - a) for c in chunks for a in range(0, c, 16)]
    monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", "torch")
    torch_path = linear_cross_entropy(h, w, t, chunk)
    torch_grads = torch.autograd.grad(torch_path, (h, w))
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert ours.item() == pytest.approx(torch_path.item(), rel=tol)
    assert ours_grads[1].dtype == dtype and ours_grads[0][30:45].abs().max() == 0
    for a, b in zip(ours_grads, torch_grads):
        assert (a.float() - b.float()).abs().max() <= tol * b.float().abs().max()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_nan_logit_gives_a_nan_loss_as_pytorch_does(dtype):
    """The row's NaN must reach the loss (and the NaN guard), not count as probability 0."""
    if dtype == torch.bfloat16 and not ce_kernel.kernel_ready(True):
        pytest.skip("the bf16 kernel needs AVX-512-BF16")
    logits = torch.randn(3, 64).to(dtype)
    logits[0, 5] = logits[1, 63] = float("nan")
    loss = ce_kernel.softmax_cross_entropy_(logits, torch.tensor([1, 2, 3]), torch.ones(3))
    assert loss[:2].isnan().all() and not loss[2].isnan()
