"""`train.loss_chunk`: the chunked linear+cross-entropy equals the plain full-logits path.

fp32: loss and gradients within 1e-6 relative (only summation order differs). bf16: loss within
1e-3 relative, gradients within 2e-2 of the gradient's max magnitude (the plain path rounds one
[tokens, vocab] bf16 gradient; the chunked one rounds per chunk and accumulates the head in fp32).
"""

from __future__ import annotations

import pytest
import torch

from scaletrain.model.llama import IGNORE_INDEX, LlamaForCausalLM, LlamaShape
from scaletrain.model.loss import cross_entropy, linear_cross_entropy


def inputs(n=70, d=24, v=101, dtype=torch.float32, ignore=(), seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(v, d, generator=g) * 0.3).to(dtype).requires_grad_()
    t = torch.randint(0, v, (n,), generator=g)
    t[list(ignore)] = IGNORE_INDEX
    return h, w, t


def both(h, w, t, chunk):
    plain = cross_entropy(h @ w.t(), t)
    gp = torch.autograd.grad(plain, (h, w))
    chunked = linear_cross_entropy(h, w, t, chunk)
    gc = torch.autograd.grad(chunked, (h, w))
    return plain, chunked, gp, gc


def rel(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("chunk", [1, 16, 32, 70, 1000])  # 70 tokens: uneven last chunk, one chunk, bigger
def test_equals_plain_path_fp32(chunk):
    h, w, t = inputs(ignore=(0, 5, 6, 69))
    plain, chunked, gp, gc = both(h, w, t, chunk)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert rel(gc[0], gp[0]) <= 1e-6 and rel(gc[1], gp[1]) <= 1e-6


def test_equals_plain_path_bf16():
    h, w, t = inputs(n=256, d=64, v=512, dtype=torch.bfloat16, ignore=range(10))
    plain, chunked, gp, gc = both(h, w, t, 64)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-3)
    assert rel(gc[0], gp[0]) <= 2e-2 and rel(gc[1], gp[1]) <= 2e-2
    assert gc[0].dtype == gc[1].dtype == torch.bfloat16


def test_ignored_tokens_get_no_gradient_and_whole_ignored_chunks_work():
    h, w, t = inputs(ignore=range(0, 32))  # the first two 16-token chunks are entirely ignored
    plain, chunked, gp, gc = both(h, w, t, 16)
    assert chunked.item() == pytest.approx(plain.item(), rel=1e-6)
    assert gc[0][:32].abs().max() == 0
    assert rel(gc[1], gp[1]) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_call_without_targets_gives_zero_gradients_as_the_plain_path(dtype):
    """No counted token at all: both losses are NaN (a mean over nothing), but the gradients are zero, not NaN
    (NaN gradients would reach the weights under DeepSpeed's bf16 optimizer)."""
    h, w, t = inputs(n=12, dtype=dtype, ignore=range(12))
    plain, chunked, gp, gc = both(h, w, t, chunk=8)
    assert plain.isnan() and chunked.isnan()
    for a, b in zip(gp, gc):
        assert not a.isnan().any() and torch.equal(b, torch.zeros_like(b))


def test_upstream_gradient_scale_is_applied():
    """DeepSpeed backpropagates loss / grad_accum: the saved gradients must be scaled by it."""
    h, w, t = inputs()
    (g1,) = torch.autograd.grad(linear_cross_entropy(h, w, t, 16) * 0.25, (h,))
    (g2,) = torch.autograd.grad(cross_entropy(h @ w.t(), t) * 0.25, (h,))
    assert rel(g1, g2) <= 1e-6


def test_no_grad_evaluation_computes_only_the_loss():
    h, w, t = inputs()
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, t, 16)
    assert loss.item() == pytest.approx(cross_entropy(h @ w.t(), t).item(), rel=1e-6)
    assert loss.grad_fn is None


@pytest.mark.parametrize("tied", [True, False])
def test_model_with_loss_chunk_matches_plain_model(tied):
    shape = LlamaShape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64,
                       vocab_size=211, max_seq_len=64, tie_word_embeddings=tied, init_std=0.1)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 211, (3, 40), generator=g)
    y = torch.randint(0, 211, (3, 40), generator=g)
    y[0, :7] = IGNORE_INDEX
    grads, losses = [], []
    for chunk in (0, 32):
        torch.manual_seed(0)
        model = LlamaForCausalLM(shape, loss_chunk=chunk)
        loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert losses[1] == pytest.approx(losses[0], rel=1e-6)
    for name, g0 in grads[0].items():
        assert rel(grads[1][name], g0) <= 1e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunked_loss_equals_plain_path(dtype):
    """Traced whole by torch.compile (fullgraph: the autograd.Function with its chunk loop and in-place
    ops): same loss and gradients as the plain path, ignored rows and an uneven last chunk included."""
    import torch._dynamo

    torch._dynamo.reset()
    n, tol = (70, 1e-6) if dtype == torch.float32 else (256, 2e-2)
    h, w, t = inputs(n=n, d=32, v=300, dtype=dtype, ignore=(0, 5, 6, n - 1))
    plain = cross_entropy(h @ w.t(), t)
    gp = torch.autograd.grad(plain, (h, w))
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, 32), fullgraph=True)
    loss = compiled(h, w, t)
    gc = torch.autograd.grad(loss, (h, w))
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6 if dtype == torch.float32 else 1e-3)
    assert rel(gc[0], gp[0]) <= tol and rel(gc[1], gp[1]) <= tol
    assert gc[0][[0, 5, 6, n - 1]].abs().max() == 0  # ignored rows get no gradient


def test_fp16_gradients_survive_until_the_loss_scale():
    """fp16 (DeepSpeed's loss scaling): d(mean CE)/d logits is ~1/(tokens·vocab), mostly below fp16's smallest
    number, until the loss scale multiplies it in backward. The chunked path keeps it in fp32 until then: as
    close to the fp32 gradients as the plain fp16 path is (it was 50-70x further, and NaN at scale 2^16)."""
    h32, w32, t = inputs(n=1024, d=64, v=2048, seed=3)
    ref = torch.autograd.grad(cross_entropy(h32 @ w32.t(), t), (h32, w32))
    h, w = (x.detach().half().requires_grad_() for x in (h32, w32))
    for scale in (32768.0, 65536.0):
        plain = torch.autograd.grad(cross_entropy(h @ w.t(), t) * scale, (h, w))
        chunked = torch.autograd.grad(linear_cross_entropy(h, w, t, 256) * scale, (h, w))
        for p, c, r in zip(plain, chunked, ref):
            assert c.dtype == torch.float16 and torch.isfinite(c).all()
            err_plain, err_chunked = rel(p.float() / scale, r), rel(c.float() / scale, r)
            assert err_chunked <= 2 * err_plain + 1e-3, (scale, err_chunked, err_plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_negative_target_other_than_ignore_index_is_refused(dtype):
    """-1 (another library's "ignore") is an error here as in F.cross_entropy; it used to train towards id 0."""
    h, w, t = inputs(dtype=dtype)
    t[3] = -1
    with pytest.raises((IndexError, RuntimeError)):
        linear_cross_entropy(h, w, t, 16)


def test_bf16_upstream_scale_is_applied_in_fp32():
    """1/grad_accum = 1/3 rounded to bf16 first is 0.33398: every gradient 0.2 % too large, the same way."""
    h, w, t = inputs(n=256, d=64, v=512, dtype=torch.bfloat16)
    g_one = torch.autograd.grad(linear_cross_entropy(h, w, t, 64), (h, w))
    g_third = torch.autograd.grad(linear_cross_entropy(h, w, t, 64) / 3, (h, w))
    for one, third in zip(g_one, g_third):
        big = one.float().abs() > 1e-3 * one.float().abs().max()
        bias = (third.float()[big] / (one.float()[big] / 3)).mean().item()
        assert abs(bias - 1) < 5e-4, bias


@pytest.mark.parametrize("task", ["lm", "classify"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(task):
    """train.activation_checkpointing recomputes each layer in the backward: no dropout, so the same numbers
    (bit for bit on CPU in fp32), and autograd keeps the layer inputs only."""
    from scaletrain.config import load_config
    from scaletrain.train.build import build_model

    # head size 64: on an AVX-512 CPU the layers run our attention kernel (RoPE inside it) through the checkpoint
    sets = ["model.hidden_size=128", "model.num_layers=3", "model.num_heads=2", "model.num_kv_heads=1",
            "model.intermediate_size=128", "model.vocab_size=256", "train.seq_len=32"]
    if task == "classify":
        sets += ["model.num_labels=3", "train.task=classify", "data.format=classification", "data.source=x.jsonl"]
    results, saved = [], []
    for on in (False, True):
        cfg = load_config(None, [*sets, f"train.activation_checkpointing={str(on).lower()}"])
        torch.manual_seed(0)
        model = build_model(LlamaShape.from_config(cfg.model), cfg)
        assert model.recompute_layers is on
        x = torch.randint(0, 256, (2, 32))
        y = torch.randint(0, 3, (2,)) if task == "classify" else torch.randint(0, 256, (2, 32))
        count = [0]

        def pack(t):
            count[0] += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(x, y)
        loss.backward()
        results.append((loss.item(), [p.grad.clone() for p in model.parameters()]))
        saved.append(count[0])
    assert results[0][0] == results[1][0]
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))
    assert saved[1] < saved[0] / 2, saved  # what autograd holds for the backward
