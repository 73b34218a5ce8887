"""Every attention backend against the eager reference, and document masking in packed windows.

Tolerances: fp32 max |Δ| <= 1e-5 on outputs and gradients. bf16 max |Δ| <= 3e-2 on outputs of
O(1) magnitude (bf16 has 8 mantissa bits: eps 7.8e-3; the backends accumulate in different orders).
On CPU: flash raises a UserError (it needs CUDA) and flex runs forward only (torch has no CPU flex
backward; training with it raises a UserError). CUDA cases run where a GPU is present.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaletrain.errors import UserError
from scaletrain.model.attention import attention, check_backend
from scaletrain.model.docmask import dense_mask, document_ids, document_positions, varlen_offsets
from scaletrain.model.flex import document_block_mask
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape

FP32_TOL, BF16_TOL = 1e-5, 3e-2
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def qkv(b=2, h=4, k=2, t=48, d=16, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda heads: torch.randn(b, heads, t, d, generator=g).to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return make(h), make(k), make(k)


def run(backend, q, k, v, mask=None, grad=True):
    if not grad:
        with torch.no_grad():
            return attention(q.detach(), k.detach(), v.detach(), backend, mask), None
    out = attention(q, k, v, backend, mask)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out) / out.numel() ** 0.5)
    return out, grads


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_sdpa_matches_eager_fp32_forward_and_backward(heads, kv_heads):
    q, k, v = qkv(h=heads, k=kv_heads)
    ref, ref_g = run("eager", q, k, v)
    out, g = run("sdpa", q, k, v)
    assert max_diff(out, ref) <= FP32_TOL
    assert all(max_diff(a, b) <= FP32_TOL for a, b in zip(g, ref_g))


def test_sdpa_matches_eager_bf16():
    q, k, v = qkv(dtype=torch.bfloat16, t=128, d=32)
    ref, ref_g = run("eager", q, k, v)
    out, g = run("sdpa", q, k, v)
    assert max_diff(out, ref) <= BF16_TOL
    assert all(max_diff(a, b) <= BF16_TOL for a, b in zip(g, ref_g))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_flex_forward_matches_eager_on_cpu(kv_heads):
    q, k, v = qkv(h=4, k=kv_heads, t=160)  # not a multiple of flex's 128 block
    ref, _ = run("eager", q, k, v, grad=False)
    out, _ = run("flex", q, k, v, grad=False)
    assert max_diff(out, ref) <= FP32_TOL


def test_cpu_refuses_flash_and_flex_training_with_one_line_errors():
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        check_backend("flash", torch.device("cpu"))
    with pytest.raises(UserError, match="no backward"):
        check_backend("flex", torch.device("cpu"), training=True)
    check_backend("flex", torch.device("cpu"), training=False)  # evaluation is fine
    q, k, v = qkv()
    with pytest.raises(UserError, match="needs an NVIDIA GPU"):
        attention(q, k, v, "flash")
    with pytest.raises(UserError, match="no backward"):
        attention(q, k, v, "flex")


def test_document_ids_and_positions():
    tokens = torch.tensor([[5, 6, 2, 7, 8, 9, 2, 4], [2, 3, 3, 3, 3, 3, 3, 2]])
    doc = document_ids(tokens, eos_id=2)
    assert doc.tolist() == [[0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1, 1, 1]]
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 2, 3, 0], [0, 0, 1, 2, 3, 4, 5, 6]]
    cu, longest = varlen_offsets(doc)
    assert cu.tolist() == [0, 3, 7, 8, 9, 16] and longest == 7
    m = dense_mask(doc)[0, 0]
    assert m[4, 3] and not m[4, 2] and not m[3, 4] and m[7, 7] and not m[7, 6]


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_doc_mask_backends_match_eager_fp32(backend):
    q, k, v = qkv(t=64)
    doc = torch.tensor([[0] * 20 + [1] * 30 + [2] * 14, [0] * 64])
    ref, ref_g = run("eager", q, k, v, dense_mask(doc))
    out, g = run(backend, q, k, v, dense_mask(doc))
    assert max_diff(out, ref) <= FP32_TOL and all(max_diff(a, b) <= FP32_TOL for a, b in zip(g, ref_g))
    flex_out, _ = run("flex", q, k, v, document_block_mask(doc), grad=False)
    assert max_diff(flex_out, ref) <= FP32_TOL


def tiny_model(backend: str, seed: int = 0) -> LlamaForCausalLM:
    shape = LlamaShape(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                       vocab_size=97, max_seq_len=128, attention=backend, init_std=0.05)
    torch.manual_seed(seed)
    return LlamaForCausalLM(shape)


def with_backend(model: LlamaForCausalLM, backend: str) -> LlamaForCausalLM:
    model.shape = dataclasses.replace(model.shape, attention=backend)
    for layer in model.model.layers:
        layer.self_attn.s = model.shape
    return model


@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_packed_documents_equal_separate_runs(backend):
    """[docA | docB] in one window with doc masking == docA alone and docB alone (logits per token)."""
    model = with_backend(tiny_model("eager"), backend).eval()
    g = torch.Generator().manual_seed(3)
    doc_a = torch.cat([torch.randint(3, 97, (1, 22), generator=g), torch.tensor([[2]])], dim=1)  # ends with EOS
    doc_b = torch.randint(3, 97, (1, 17), generator=g)
    packed = torch.cat([doc_a, doc_b], dim=1)
    with torch.no_grad():
        together = model(packed, doc_ids=document_ids(packed, eos_id=2))
        alone = torch.cat([model(doc_a), model(doc_b)], dim=1)
        unmasked = model(packed)
    assert max_diff(together, alone) <= FP32_TOL
    assert max_diff(unmasked[:, 23:], alone[:, 23:]) > 1e-3  # without the mask docB does see docA


def test_doc_mask_training_gradients_match_eager():
    tokens = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(4))
    tokens[0, 9], tokens[0, 25], tokens[1, 30] = 2, 2, 2
    targets = torch.roll(tokens, -1, dims=1)
    doc = document_ids(tokens, 2)
    grads = {}
    for backend in ("eager", "sdpa"):
        model = tiny_model(backend, seed=1)
        loss = model(tokens, targets, doc_ids=doc)
        loss.backward()
        grads[backend] = (loss.detach(), [p.grad for p in model.parameters()])
    assert abs(grads["eager"][0] - grads["sdpa"][0]) <= FP32_TOL
    assert all(max_diff(a, b) <= FP32_TOL for a, b in zip(grads["eager"][1], grads["sdpa"][1]))


def test_eval_of_a_doc_mask_model_masks_as_training_did():
    """`scaletrain eval` of a model trained with data.doc_mask scores each window as the trainer's val/loss did:
    within documents (the model's own masked loss is the reference); unmasked it scores another condition."""
    from scaletrain.evaluate import evaluate

    tokens = torch.randint(3, 97, (2, 40), generator=torch.Generator().manual_seed(5))
    tokens[0, 9], tokens[0, 25], tokens[1, 30] = 2, 2, 2
    targets = torch.roll(tokens, -1, dims=1)
    model = tiny_model("sdpa", seed=2).eval()
    with torch.no_grad():
        trained_as = model(tokens, targets, doc_ids=document_ids(tokens, 2)).item()
    assert abs(evaluate(model, [(tokens, targets)], doc_eos=2)["loss"] - trained_as) <= FP32_TOL
    assert abs(evaluate(model, [(tokens, targets)])["loss"] - trained_as) > 1e-3


@cuda
@pytest.mark.parametrize("backend", ["sdpa", "flash", "flex"])
@pytest.mark.parametrize("doc", [False, True])
def test_cuda_backends_match_eager_bf16(backend, doc):
    q, k, v = qkv(t=256, d=64, dtype=torch.bfloat16, device="cuda")
    doc_ids = torch.tensor([[0] * 100 + [1] * 156, [0] * 256], device="cuda") if doc else None
    ref, ref_g = run("eager", q, k, v, dense_mask(doc_ids) if doc else None)
    if backend == "flash" and doc:
        from scaletrain.model.attention import has_flash_attn

        if not has_flash_attn():
            pytest.skip("varlen flash needs the flash-attn package")
        mask = varlen_offsets(doc_ids)
    elif backend == "flex" and doc:
        mask = document_block_mask(doc_ids)
    else:
        mask = dense_mask(doc_ids) if doc else None
    out, g = run(backend, q, k, v, mask)
    assert max_diff(out, ref) <= BF16_TOL
    assert all(max_diff(a, b) <= BF16_TOL for a, b in zip(g, ref_g))
