"""Each architecture switch against our eager reference: sdpa (and flex, forward) agree with eager in fp32,
KV-cached decoding equals the full forward, parameter counts are right, and the config refuses what does not
go together with one line. (The transformers reference for each switch: test_variants_hf.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.errors import UserError
from scaletrain.model.blocks import alibi_slopes
from scaletrain.model.docmask import document_ids
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape

TOL = 1e-5
SWITCHES = {
    "layernorm": dict(norm="layernorm"),
    "layernorm-bias": dict(norm="layernorm", bias=True),
    "gelu": dict(ffn="gelu"),
    "relu2": dict(ffn="relu2"),
    "qk_norm": dict(qk_norm=True),
    "qk_norm-layernorm": dict(qk_norm=True, norm="layernorm", bias=True),
    "window": dict(attention_window=5),
    "alibi": dict(position="alibi"),
    "alibi-window": dict(position="alibi", attention_window=6),
    "nope": dict(position="none"),
    "rope-linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope-llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "parallel": dict(parallel_block=True),
    "bias": dict(bias=True),
    "everything": dict(norm="layernorm", ffn="relu2", qk_norm=True, attention_window=9, parallel_block=True, bias=True),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def model(backend: str = "eager", seed: int = 0, **switches) -> LlamaForCausalLM:
    kw = dict(hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80, vocab_size=101,
              max_seq_len=64, attention=backend, init_std=0.1, tie_word_embeddings=False)
    s = LlamaShape(**{**kw, **switches})
    torch.manual_seed(seed)
    m = LlamaForCausalLM(s)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)
    return m.eval()


def with_backend(m: LlamaForCausalLM, backend: str) -> LlamaForCausalLM:
    other = LlamaForCausalLM(dataclasses.replace(m.shape, attention=backend))
    other.load_state_dict(m.state_dict())
    return other.eval()


def ids(t: int = 29, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 101, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", sorted(SWITCHES))
def test_param_count_and_sdpa_matches_eager(name):
    eager = model(**SWITCHES[name])
    assert eager.shape.num_params() == sum(p.numel() for p in eager.parameters())
    sdpa = with_backend(eager, "sdpa")
    x = ids()
    x[1, 10] = 2  # an EOS: document masking below splits row 1 there
    docs = document_ids(x, 2)
    with torch.no_grad():
        for doc in (None, docs):
            ref = eager(x, doc_ids=doc)
            assert ref.abs().max() > 0.1
            assert (sdpa(x, doc_ids=doc) - ref).abs().max().item() <= TOL
    # gradients agree too (the training path)
    y = ids(seed=2)
    eager.train()(x, y).backward()
    sdpa.train()(x, y).backward()
    for (n, a), b in zip(eager.named_parameters(), sdpa.parameters()):
        assert (a.grad - b.grad).abs().max().item() <= 1e-5, n


@pytest.mark.parametrize("name", ["window", "alibi-window", "qk_norm-layernorm", "parallel", "everything", "nope"])
@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_kv_cached_decoding_matches_full_forward(name, backend):
    m = with_backend(model(**SWITCHES[name]), backend)
    x = ids(t=23)
    with torch.no_grad():
        full = m(x)
        caches = m.new_caches()
        for start, end in [(0, 7), (7, 12)] + [(p, p + 1) for p in range(12, 23)]:
            step = m(x[:, start:end], caches=caches, start_pos=start)
            assert (step - full[:, start:end]).abs().max().item() <= TOL, (start, end)


def test_window_and_alibi_change_the_function_as_specified():
    """A token's output depends on exactly the window-1 tokens before it; ALiBi slopes are the paper's."""
    m = model(attention_window=4, num_layers=1)
    x = ids(t=20)
    y = x.clone()
    y[:, 5] = (y[:, 5] + 1) % 101  # visible to positions 5..8 only (one layer)
    with torch.no_grad():
        a, b = m(x), m(y)
    changed = ((a - b).abs().amax(-1) > 1e-6).any(0).nonzero().flatten().tolist()
    assert changed == [5, 6, 7, 8]
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    assert torch.allclose(alibi_slopes(6), torch.tensor([2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]))


@pytest.mark.parametrize("name", ["window", "everything"])
def test_flex_forward_matches_eager_on_cpu(name):
    """flex's BlockMask carries the window (CPU flex has no backward: forward only, as elsewhere)."""
    eager = model(**SWITCHES[name])
    flex = with_backend(eager, "flex")
    x = ids(t=40)
    x[0, 17] = 2
    with torch.no_grad():
        for doc in (None, document_ids(x, 2)):
            assert (flex(x, doc_ids=doc) - eager(x, doc_ids=doc)).abs().max().item() <= TOL


@pytest.mark.parametrize("overrides,word", [
    (["model.position=alibi", "model.attention=flex"], "alibi"),
    (["model.rope_scaling={rope_type: yarn, factor: 2}"], "yarn"),
    (["model.rope_scaling={rope_type: llama3, factor: 8}"], "low_freq_factor"),
    (["model.position=none", "model.rope_scaling={rope_type: linear, factor: 2}"], "position=rope"),
    (["model.attention_window=0"], "attention_window"),
    (["model.ffn=geglu"], "model.ffn"),
    (["model.num_labels=3"], "train.task=classify"),
    (["train.task=classify"], "data.format=classification"),
    (["train.freeze=[layers.9]"], "layers run 0..3"),
    (["train.freeze=[encoder]"], "not one of"),
    (["train.freeze=[head]"], "'head' is the embedding matrix"),  # tied (tiny.yaml): freezing it froze nothing
])
def test_bad_combinations_are_one_line(overrides, word):
    with pytest.raises(UserError) as e:
        load_config("configs/tiny.yaml", overrides)
    msg = str(e.value)
    assert word in msg and "\n" not in msg, msg


def test_odd_head_dim_is_fine_without_rope():
    cfg = load_config("configs/tiny.yaml", ["model.hidden_size=252", "model.num_heads=4", "model.num_kv_heads=4",
                                            "model.position=alibi"])
    assert cfg.model.head_dim == 63
    with pytest.raises(UserError, match="even"):
        load_config("configs/tiny.yaml", ["model.hidden_size=252", "model.num_heads=4", "model.num_kv_heads=4"])


@pytest.mark.parametrize("overrides,words", [
    (["model.attention_window=8"], ["model.attention_window needs the flash-attn package", "model.attention=sdpa or flex"]),
    (["model.position=alibi"], ["model.position=alibi needs the flash-attn package", "model.attention=sdpa"]),
    (["model.position=alibi", "model.attention_window=8"], ["model.attention_window and model.position=alibi"]),
])
def test_flash_with_window_or_alibi_refused_at_start_up_without_flash_attn(overrides, words, monkeypatch):
    """The config itself is valid (the training machine may have flash-attn); check_backend, which the trainer
    runs before building the engine, refuses it in one line instead of the first forward."""
    import scaletrain.model.attention as attn
    from scaletrain.model.masks import attention_mask

    monkeypatch.setattr(attn, "has_flash_attn", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))  # an H100, as far as asked
    cfg = load_config("configs/tiny.yaml", ["model.attention=flash", *overrides])
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    for shape in (cfg.model, LlamaShape.from_config(cfg.model)):
        with pytest.raises(UserError) as e:
            attn.check_backend("flash", cuda, training=True, shape=shape)
        msg = str(e.value)
        assert all(w in msg for w in words) and "install flash-attn" in msg and "\n" not in msg, msg
    with pytest.raises(UserError) as e:  # the forward's own check (never reached after check_backend) says the same
        attention_mask(LlamaShape.from_config(cfg.model), None, 8, 0, "cpu", torch.float32)
    assert str(e.value) == msg
    plain = LlamaShape.from_config(load_config("configs/tiny.yaml", ["model.attention=flash"]).model)
    attn.check_backend("flash", cuda, training=True, shape=plain)  # plain causal flash needs no package
    monkeypatch.setattr(attn, "has_flash_attn", lambda: True)
    attn.check_backend("flash", cuda, training=True, shape=cfg.model)
    with pytest.raises(UserError, match="NVIDIA GPU"):  # on CPU the device reason comes first
        attn.check_backend("flash", torch.device("cpu"), training=True, shape=cfg.model)
    # the kernels' own limits, at start-up rather than as a traceback at the first forward
    with pytest.raises(UserError, match="bf16 or fp16 only"):
        attn.check_backend("flash", cuda, training=True, shape=plain, precision="fp32")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # a T4
    with pytest.raises(UserError, match="Ampere or newer GPU .* sm75"):
        attn.check_backend("flash", cuda, training=True, shape=plain, precision="fp16")
