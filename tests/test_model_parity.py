"""Our LlamaForCausalLM against Hugging Face's, weight for weight: same state-dict keys, same logits.

Random weights only (no hub access): HF's model is built from a LlamaConfig and our state_dict is loaded
into it with strict=True, so any naming, shape, RoPE, GQA-layout, norm or tying difference shows up.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from scaletrain.model.llama import IGNORE_INDEX, LlamaForCausalLM, LlamaShape  # noqa: E402

TOL = 1e-5

# id: (hidden, layers, heads, kv_heads, intermediate, vocab, rope_theta, tied)
SHAPES = {
    "gqa6x2-untied": (96, 2, 6, 2, 160, 300, 10000.0, False),
    "gqa6x2-tied-theta500k": (96, 2, 6, 2, 160, 300, 500000.0, True),
    "mha4-tied": (64, 2, 4, 4, 128, 257, 10000.0, True),
    "mha4-untied-theta500k": (64, 1, 4, 4, 176, 200, 500000.0, False),
    "gqa8x2-3layers-untied": (128, 3, 8, 2, 344, 512, 10000.0, False),
    "mqa4x1-tied": (32, 2, 4, 1, 64, 97, 500000.0, True),
}
BACKENDS = ["eager", "sdpa"]


def make_pair(shape_id: str, backend: str, seed: int = 0):
    hidden, layers, heads, kv, inter, vocab, theta, tied = SHAPES[shape_id]
    shape = LlamaShape(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv,
                       intermediate_size=inter, vocab_size=vocab, max_seq_len=128, rope_theta=theta,
                       tie_word_embeddings=tied, norm_eps=1e-5, attention=backend, init_std=0.05)
    torch.manual_seed(seed)
    ours = LlamaForCausalLM(shape).eval()
    with torch.no_grad():  # non-trivial norm gains, so a missing/misplaced norm weight cannot hide
        for name, p in ours.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.uniform_(0.5, 1.5)
    hf = make_hf(shape)
    sd = ours.state_dict()
    if "lm_head.weight" not in hf.state_dict():  # some HF versions drop the tied head from the state dict
        assert tied
        sd = {k: v for k, v in sd.items() if k != "lm_head.weight"}
    hf.load_state_dict(sd, strict=True)
    return ours, hf


def make_hf(shape: LlamaShape, rope_theta: float | None = None):
    cfg = transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads, head_dim=shape.head_dim, hidden_act="silu",
        max_position_embeddings=shape.max_seq_len, rms_norm_eps=shape.norm_eps,
        rope_theta=shape.rope_theta if rope_theta is None else rope_theta,
        tie_word_embeddings=shape.tie_word_embeddings, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    hf = transformers.LlamaForCausalLM(cfg).eval()
    # Make sure HF really uses the theta we asked for (its config layout changed between versions).
    rope = getattr(hf.config, "rope_parameters", None) or {}
    assert rope.get("rope_theta", getattr(hf.config, "rope_theta", None)) == (rope_theta or shape.rope_theta)
    return hf


def ids_for(vocab: int, batch: int = 2, t: int = 23, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, t), generator=g)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_id", sorted(SHAPES))
def test_logits_match_hf(shape_id, backend):
    ours, hf = make_pair(shape_id, backend)
    tied = SHAPES[shape_id][-1]
    emb, head = ours.model.embed_tokens.weight, ours.lm_head.weight
    assert (emb.data_ptr() == head.data_ptr()) == tied
    assert torch.equal(hf.lm_head.weight, head) and torch.equal(hf.model.embed_tokens.weight, emb)
    ids = ids_for(ours.shape.vocab_size)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (*ids.shape, ours.shape.vocab_size)
    assert got.dtype == torch.float32
    assert ref.abs().max() > 0.1, "logits too small for the comparison to mean anything"
    diff = (got - ref).abs().max().item()
    assert diff <= TOL, f"max |dlogits| = {diff:.3g}"


def test_comparison_is_sensitive_to_rope_theta():
    """The parity check must be able to fail: HF with another rope_theta gives clearly different logits."""
    ours, _ = make_pair("gqa6x2-untied", "eager")
    hf = make_hf(ours.shape, rope_theta=500000.0)
    hf.load_state_dict(ours.state_dict(), strict=True)
    ids = ids_for(ours.shape.vocab_size)
    with torch.no_grad():
        assert (hf(input_ids=ids).logits - ours(ids)).abs().max() > 1e-3


def test_state_dict_keys_equal_hf():
    for shape_id in SHAPES:
        ours, hf = make_pair(shape_id, "eager")
        assert set(ours.state_dict()) == set(hf.state_dict()), shape_id
        for k, v in hf.state_dict().items():
            assert ours.state_dict()[k].shape == v.shape, k


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_id", ["gqa6x2-untied", "mha4-tied"])
def test_loss_equals_cross_entropy_of_hf_logits(shape_id, backend):
    ours, hf = make_pair(shape_id, backend)
    v = ours.shape.vocab_size
    ids = ids_for(v, seed=3)
    targets = ids_for(v, seed=4)
    targets[0, :5] = IGNORE_INDEX  # e.g. padding / prompt tokens carry no loss
    targets[1, -1] = IGNORE_INDEX
    with torch.no_grad():
        loss = ours(ids, targets)
        ref = F.cross_entropy(hf(input_ids=ids).logits.view(-1, v), targets.view(-1), ignore_index=IGNORE_INDEX)
        unmasked = F.cross_entropy(hf(input_ids=ids).logits.view(-1, v), ids_for(v, seed=4).view(-1))
    assert loss.ndim == 0
    assert abs(loss.item() - ref.item()) <= TOL, (loss.item(), ref.item())
    assert abs(loss.item() - unmasked.item()) > 1e-4  # the ignored positions really were left out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape_id", ["gqa6x2-tied-theta500k", "mha4-untied-theta500k", "mqa4x1-tied"])
def test_kv_cached_decoding_matches_full_forward(shape_id, backend):
    ours, hf = make_pair(shape_id, backend)
    ids = ids_for(ours.shape.vocab_size, t=21, seed=5)
    with torch.no_grad():
        full = ours(ids)
        assert (full - hf(input_ids=ids).logits).abs().max() <= TOL
        caches = ours.new_caches()
        # A prompt, then a multi-token chunk on top of the cache (query block offset into the keys),
        # then single tokens one at a time.
        pieces, pos = [(0, 7), (7, 11)] + [(p, p + 1) for p in range(11, 21)], 0
        for start, end in pieces:
            assert start == pos
            step = ours(ids[:, start:end], caches=caches, start_pos=start)
            diff = (step - full[:, start:end]).abs().max().item()
            assert diff <= TOL, f"positions {start}..{end - 1}: max |dlogits| = {diff:.3g}"
            pos = end
        assert all(c[2] == 21 and c[0].shape[2] >= 21 for c in caches)  # 21 positions held
        # The last token's logits, the thing generation uses.
        assert (step[:, -1] - full[:, -1]).abs().max() <= TOL


def test_backends_agree_with_each_other():
    eager, _ = make_pair("gqa8x2-3layers-untied", "eager", seed=7)
    sdpa, _ = make_pair("gqa8x2-3layers-untied", "sdpa", seed=7)
    ids = ids_for(eager.shape.vocab_size, t=40, seed=8)
    with torch.no_grad():
        assert (eager(ids) - sdpa(ids)).abs().max() <= TOL


def test_kv_cache_buffers_grow_and_hold_every_position():
    """extend_cache against torch.cat of everything appended: chunks that cross the doubling points (64, 128...)."""
    from scaletrain.model.llama import extend_cache

    torch.manual_seed(0)
    cache, ks, vs = [], [], []
    for t in [7, 57, 1, 70, 1, 1, 120]:
        k, v = torch.randn(2, 3, t, 8), torch.randn(2, 3, t, 8)
        ks.append(k)
        vs.append(v)
        got_k, got_v = extend_cache(cache, k, v)
        assert torch.equal(got_k, torch.cat(ks, dim=2)) and torch.equal(got_v, torch.cat(vs, dim=2))
    assert cache[2] == 257 and cache[0].shape[2] >= 257
    capped: list = []
    extend_cache(capped, torch.randn(1, 1, 100, 8), torch.randn(1, 1, 100, 8), limit=128)
    assert capped[0].shape[2] == 128  # never more positions than the context holds
