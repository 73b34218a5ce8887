"""Growth of architecture variants: duplication stays exact with LayerNorm, biases, GELU/relu2 FFNs, qk-norm,
parallel blocks, sliding windows and ALiBi (depth); what cannot be exact is refused with one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaletrain.errors import UserError
from scaletrain.growth.plan import GrowthPlan, GrowthSpec, grow_state_dict
from scaletrain.growth.optimizer_state import grow_moments
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape

VOCAB = 97
# id: switches of the parent (and child)
VARIANTS = {
    "layernorm-gelu-bias": dict(norm="layernorm", ffn="gelu", bias=True),
    "layernorm-relu2-parallel-qknorm": dict(norm="layernorm", ffn="relu2", parallel_block=True, qk_norm=True, bias=True),
    "rmsnorm-swiglu-bias-qknorm-window": dict(bias=True, qk_norm=True, attention_window=7),
    "layernorm-swiglu-nobias-scaled-rope": dict(norm="layernorm", rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def shape(hidden, heads, kv, inter, layers, tied=True, **switches) -> LlamaShape:
    return LlamaShape(hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv, intermediate_size=inter,
                      vocab_size=VOCAB, max_seq_len=64, tie_word_embeddings=tied, attention="eager", init_std=0.08, **switches)


def parent_model(s: LlamaShape, seed: int = 0) -> LlamaForCausalLM:
    """Random norm gains and non-zero biases/shifts, so a wrong map of either shows in the logits."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(s)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.2)
    return m.eval()


def logits_diff(p: LlamaShape, c: LlamaShape, spec: GrowthSpec = GrowthSpec(), seed: int = 0) -> float:
    parent = parent_model(p, seed)
    sd = grow_state_dict(parent.state_dict(), p, c, spec)
    child = LlamaForCausalLM(c)
    child.load_state_dict(sd, strict=True)
    x = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = parent(x), child.eval()(x)
    assert a.abs().max() > 1.0
    return (a - b).abs().max().item()


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("tied", [True, False])
def test_width_x2_and_identity_depth_are_exact(variant, tied):
    sw = VARIANTS[variant]
    p = shape(64, 4, 2, 96, 2, tied, **sw)
    c = shape(128, 8, 4, 192, 4, tied, **sw)
    assert logits_diff(p, c, GrowthSpec(noise_std=0.1, insert="interleave")) < 1e-4


def test_non_integer_width_with_biases_and_qk_norm_is_exact():
    """RMSNorm models grow by any factor (zero-expanded residual); writer biases must stay 0 on new coordinates."""
    sw = dict(bias=True, qk_norm=True, ffn="relu2")
    p, c = shape(64, 4, 2, 96, 2, False, **sw), shape(96, 6, 3, 150, 3, False, **sw)
    assert logits_diff(p, c) < 1e-4


def test_alibi_grows_in_depth_and_ffn_only():
    sw = dict(norm="layernorm", ffn="gelu", position="alibi")
    p = shape(64, 4, 4, 256, 2, **sw)
    assert logits_diff(p, shape(64, 4, 4, 512, 4, **sw)) < 1e-4
    with pytest.raises(UserError, match="alibi"):
        GrowthPlan(p, shape(128, 8, 8, 512, 2, **sw))
    # More KV heads with the same query heads reorders the query heads, and each ALiBi slope sits on its index.
    gqa = shape(64, 8, 2, 256, 2, **sw)
    with pytest.raises(UserError, match="num_kv_heads"):
        GrowthPlan(gqa, shape(64, 8, 4, 256, 2, **sw))


def test_refusals_are_one_line():
    p = shape(64, 4, 2, 96, 2, norm="layernorm")
    with pytest.raises(UserError, match="integer hidden factor"):
        GrowthPlan(p, shape(96, 6, 3, 96, 2, norm="layernorm"))
    with pytest.raises(UserError, match="model.ffn"):
        GrowthPlan(p, dataclasses.replace(p, ffn="gelu", num_layers=4))
    with pytest.raises(UserError, match="classifier"):
        GrowthPlan(dataclasses.replace(p, num_labels=2), dataclasses.replace(p, num_labels=2, num_layers=4))


def test_moments_cover_every_variant_tensor():
    """Adam moments come out for every child parameter (biases, LayerNorm shifts, qk-norm gains), with its shape."""
    sw = VARIANTS["layernorm-relu2-parallel-qknorm"]
    p, c = shape(64, 4, 2, 96, 2, False, **sw), shape(128, 8, 4, 192, 3, False, **sw)
    sd = parent_model(p).state_dict()
    m, v = grow_moments(GrowthPlan(p, c), {k: t.abs() for k, t in sd.items()}, {k: t.pow(2) for k, t in sd.items()})
    child = LlamaForCausalLM(c).state_dict()
    assert set(m) == set(v) == set(child)
    assert all(m[k].shape == child[k].shape for k in child)
    assert float(m["model.layers.2.mlp.down_proj.bias"].abs().max()) == 0.0  # identity block: no history
