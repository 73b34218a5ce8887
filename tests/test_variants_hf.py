"""Each switch combination against the transformers architecture that computes the same function (the oracle):
export (our state dict -> their names -> their model) gives the same logits in fp32 (<= 1e-5), import maps
back to the same config and tensors; the comparison can fail (a wrong window / ALiBi / norm would show); combos
without such an architecture refuse with one line; a real `export-hf` of a variant checkpoint loads with
AutoModelForCausalLM."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from hf_fixtures import VOCAB, corpus, hf_root, sp_model, write_checkpoint_dir  # noqa: E402,F401

from scaletrain.config import ModelConfig  # noqa: E402
from scaletrain.errors import UserError  # noqa: E402
from scaletrain.hf.arch_map import export_plan, hf_config, import_plan  # noqa: E402
from scaletrain.model.classify import build_model  # noqa: E402
from scaletrain.model.llama import LlamaShape  # noqa: E402

TOL = 1e-5
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
# id: (switches, expected transformers class)
COMBOS = {
    "llama": ({}, "LlamaForCausalLM"),
    "llama-bias": (dict(bias=True), "LlamaForCausalLM"),
    "llama-rope-linear": (dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), "LlamaForCausalLM"),
    "llama-rope-llama3": (dict(rope_scaling=LLAMA3), "LlamaForCausalLM"),
    "mistral-window": (dict(attention_window=8), "MistralForCausalLM"),
    "qwen3-qknorm": (dict(qk_norm=True), "Qwen3ForCausalLM"),
    "qwen3-qknorm-window": (dict(qk_norm=True, attention_window=8), "Qwen3ForCausalLM"),
    "arcee-gelu": (dict(ffn="gelu"), "ArceeForCausalLM"),
    "arcee-relu2-bias": (dict(ffn="relu2", bias=True), "ArceeForCausalLM"),
    "starcoder2-ln-gelu": (dict(norm="layernorm", ffn="gelu"), "Starcoder2ForCausalLM"),
    "starcoder2-ln-gelu-bias-window": (dict(norm="layernorm", ffn="gelu", bias=True, attention_window=8), "Starcoder2ForCausalLM"),
    "starcoder2-ln-relu2-bias": (dict(norm="layernorm", ffn="relu2", bias=True), "Starcoder2ForCausalLM"),
    "stablelm-ln-swiglu": (dict(norm="layernorm"), "StableLmForCausalLM"),
    "stablelm-parallel-qknorm": (dict(norm="layernorm", parallel_block=True, qk_norm=True), "StableLmForCausalLM"),
    "mpt-alibi": (dict(norm="layernorm", ffn="gelu", position="alibi", num_kv_heads=6, intermediate_size=192), "MptForCausalLM"),
    "smollm3-nope": (dict(position="none"), "SmolLM3ForCausalLM"),
    "smollm3-nope-bias-window": (dict(position="none", bias=True, attention_window=8), "SmolLM3ForCausalLM"),
    "smollm3-rope-bias-window": (dict(bias=True, attention_window=8), "SmolLM3ForCausalLM"),
    "phi-nope-odd-head": (dict(norm="layernorm", ffn="gelu", parallel_block=True, position="none", hidden_size=45,
                               num_heads=5, num_kv_heads=1), "PhiForCausalLM"),
    "persimmon-nope": (dict(norm="layernorm", ffn="gelu", position="none", bias=True, num_kv_heads=6), "PersimmonForCausalLM"),
    "stablelm-nope-parallel-qknorm": (dict(norm="layernorm", position="none", parallel_block=True, qk_norm=True), "StableLmForCausalLM"),
    "phi-gelu-parallel": (dict(norm="layernorm", ffn="gelu", parallel_block=True), "PhiForCausalLM"),
    "phi-relu2-bias-qknorm": (dict(norm="layernorm", ffn="relu2", parallel_block=True, bias=True, qk_norm=True), "PhiForCausalLM"),
    "phi-tied-rope-linear": (dict(norm="layernorm", ffn="gelu", parallel_block=True, tie_word_embeddings=True,
                                  rope_scaling={"rope_type": "linear", "factor": 4.0}), "PhiForCausalLM"),
    "persimmon-relu2-qknorm": (dict(norm="layernorm", ffn="relu2", qk_norm=True, num_kv_heads=6), "PersimmonForCausalLM"),
    "persimmon-gelu-qknorm-bias": (dict(norm="layernorm", ffn="gelu", qk_norm=True, bias=True, num_kv_heads=6), "PersimmonForCausalLM"),
    **{f"{fam.lower()}-classifier": (dict(num_labels=3, **switches), f"{fam}ForSequenceClassification") for fam, switches in {
        "Llama": {}, "Mistral": dict(attention_window=8), "Qwen3": dict(qk_norm=True), "Arcee": dict(ffn="relu2", bias=True),
        "Starcoder2": dict(norm="layernorm", ffn="gelu", bias=True),
        "StableLm": dict(norm="layernorm", parallel_block=True, qk_norm=True),
        "Mpt": dict(norm="layernorm", ffn="gelu", position="alibi", num_kv_heads=6, intermediate_size=192),
        "SmolLM3": dict(position="none", bias=True), "Phi": dict(norm="layernorm", ffn="gelu", parallel_block=True, bias=True),
        "Persimmon": dict(norm="layernorm", ffn="relu2", qk_norm=True, num_kv_heads=6)}.items()},
}


pytestmark = pytest.mark.usefixtures("one_thread")


def config(**switches) -> ModelConfig:
    base = dict(hidden_size=48, num_layers=2, num_heads=6, num_kv_heads=2, intermediate_size=80, vocab_size=101,
                max_seq_len=64, attention="eager", init_std=0.08, tie_word_embeddings=False)
    return ModelConfig(**{**base, **switches})


def ours_for(m: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(LlamaShape.from_config(m)).eval()
    with torch.no_grad():  # non-trivial gains and biases: a wrong or missing mapping shows in the logits
        for n, p in model.named_parameters():
            if "norm" in n and n.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.1)
    return model


def hf_for(m: ModelConfig, tmp_path, **config_edits):
    plan = export_plan(m)
    cfg = {**hf_config(plan, m, 1, 2, "float32", 2 if m.num_labels else None), **config_edits}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    hc = transformers.AutoConfig.from_pretrained(tmp_path)
    hc._attn_implementation = "eager"
    return plan, cfg, getattr(transformers, plan.architecture(m))(hc).eval()


def input_ids(m: ModelConfig) -> torch.Tensor:
    x = torch.randint(3, m.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    if m.num_labels:
        x[0, 30:] = 2  # right padding: the classifier reads the last non-pad token
    return x


@pytest.mark.parametrize("combo", sorted(COMBOS))
def test_export_import_match_transformers(combo, tmp_path):
    switches, arch = COMBOS[combo]
    m = config(**switches)
    ours = ours_for(m)
    plan, cfg, hf = hf_for(m, tmp_path)
    assert plan.architecture(m) == arch
    sd = dict(plan.adapter.tensors(ours.state_dict().items()))
    if "lm_head.weight" not in hf.state_dict():
        sd.pop("lm_head.weight", None)
    hf.load_state_dict(sd, strict=True)  # every name and shape matches theirs
    x = input_ids(m)
    with torch.no_grad():
        a, b = ours(x), hf(input_ids=x).logits
    assert a.abs().max() > 0.1
    diff = (a - b).abs().max().item()
    print(f"{combo}: {arch} max |dlogits| = {diff:.2e}")
    assert diff <= TOL
    # and back: their config + tensors -> our config + state dict, same function
    theirs = hf.state_dict()
    m2, adapter = import_plan(cfg, "hf", lambda n: bool(theirs[n].abs().max() > 0) if n in theirs else None)
    assert m2.model_dump(exclude={"attention", "init_std"}) == m.model_dump(exclude={"attention", "init_std"})
    back = build_model(LlamaShape.from_config(m2.model_copy(update={"attention": "eager"}))).eval()
    back.load_state_dict(dict(adapter.tensors(theirs.items())), strict=True)
    with torch.no_grad():
        assert torch.equal(back(x), a)


@pytest.mark.parametrize("combo,edit", [
    ("mistral-window", {"sliding_window": 16}),
    ("arcee-gelu", {"hidden_act": "relu2"}),
    ("starcoder2-ln-gelu", {"hidden_act": "gelu_pytorch_tanh"}),
    ("llama-rope-llama3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_scaling": None}),
    ("smollm3-nope", {"no_rope_layers": [1, 1]}),
    ("smollm3-nope-bias-window", {"layer_types": ["full_attention"] * 2}),
    ("phi-gelu-parallel", {"hidden_act": "gelu_new"}),
    ("persimmon-nope", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                        "partial_rotary_factor": 0.5}),
    ("persimmon-relu2-qknorm", {"partial_rotary_factor": 0.5,
                                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
])
def test_the_comparison_can_fail(combo, edit, tmp_path):
    """The oracle with one setting changed (even gelu -> tanh-gelu) is 10x outside the tolerance: not vacuous."""
    m = config(**COMBOS[combo][0])
    ours = ours_for(m)
    plan, _, hf = hf_for(m, tmp_path, **edit)
    sd = dict(plan.adapter.tensors(ours.state_dict().items()))
    hf.load_state_dict(sd, strict=True)
    x = input_ids(m)
    with torch.no_grad():
        assert (ours(x) - hf(input_ids=x).logits).abs().max() > 10 * TOL


@pytest.mark.parametrize("switches,word", [
    (dict(position="none", ffn="gelu"), "SmolLM3"),
    (dict(position="none", hidden_size=45, num_heads=5, num_kv_heads=1), "even head size"),
    (dict(position="none", norm="layernorm", ffn="gelu"), "Persimmon"),  # GQA
    (dict(position="none", norm="layernorm", attention_window=8), "sliding window"),
    (dict(parallel_block=True), "RMSNorm"),
    (dict(qk_norm=True, bias=True), "bias"),
    (dict(norm="layernorm", bias=True), "StableLM"),
    (dict(norm="layernorm", ffn="gelu", qk_norm=True), "Persimmon"),  # GQA: Persimmon is MHA only
    (dict(norm="layernorm", ffn="gelu", parallel_block=True, attention_window=8), "Phi"),
    (dict(position="alibi"), "MPT"),
])
def test_refusals_are_one_line(switches, word):
    with pytest.raises(UserError) as e:
        export_plan(config(**switches))
    assert word in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("combo,edit,word", [
    ("smollm3-nope", {"no_rope_layers": [1, 0]}, "mixes RoPE and NoPE"),
    ("smollm3-nope-bias-window", {"layer_types": ["sliding_attention", "full_attention"]}, "only some layers"),
    ("phi-gelu-parallel", {"hidden_act": "gelu_new"}, "gelu_new"),
    ("phi-gelu-parallel", {"partial_rotary_factor": None, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
     "partial_rotary_factor 0.5)"),  # PhiConfig's default when config.json does not say
    ("persimmon-relu2-qknorm", {"lm_head.bias": 1.0}, "lm_head.bias is not zero"),
    ("phi-gelu-parallel", {"model.layers.1.mlp.fc2.bias": 1.0}, "model.bias=true"),
    ("llama-classifier", {"num_labels": 1, "id2label": {"0": "score"}, "label2id": {"score": 0}}, "regression or reward"),
    ("llama-classifier", {"num_labels": 3, "problem_type": "multi_label_classification"}, "problem_type=multi_label"),
])
def test_import_refuses_what_we_cannot_hold(combo, edit, word, tmp_path):
    m = config(**COMBOS[combo][0])
    plan, cfg, hf = hf_for(m, tmp_path)
    theirs = dict(plan.adapter.tensors(ours_for(m).state_dict().items()))
    cfg.update({k: v for k, v in edit.items() if "." not in k})
    for k in (k for k in edit if "." in k):
        theirs[k] = theirs.get(k, torch.zeros(m.vocab_size)).clone().fill_(edit[k])
    with pytest.raises(UserError) as e:
        _, adapter = import_plan(cfg, "hf")
        dict(adapter.tensors(theirs.items()))
    assert word in str(e.value) and "\n" not in str(e.value), str(e.value)


CARD_CASES = {  # id: (switches, class, what the card must say, what it must not)
    "starcoder2": (dict(norm="layernorm", ffn="gelu", bias=True, attention_window=8), "Starcoder2ForCausalLM",
                   ["LayerNorm, eps 1e-05", "exact (erf) GELU, width 80", "sliding window of 8 tokens", "RoPE, theta 10000"],
                   ["SwiGLU", "RMSNorm"]),
    "phi-tied": (dict(norm="layernorm", ffn="relu2", parallel_block=True, qk_norm=True, tie_word_embeddings=True),
                 "PhiForCausalLM", ["squared ReLU", "parallel", "LayerNorm over each head (8)", "| biases | none |"],
                 ["SwiGLU", "RMSNorm", "sliding"]),
    "persimmon": (dict(norm="layernorm", ffn="gelu", qk_norm=True, bias=True, num_kv_heads=6), "PersimmonForCausalLM",
                  ["GELU", "on every linear layer and LayerNorm"], ["SwiGLU", "RMSNorm"]),
    "smollm3-nope": (dict(position="none", bias=True), "SmolLM3ForCausalLM",
                     ["NoPE", "SwiGLU (gated, SiLU), width 80", "RMSNorm, eps"], ["RoPE", "LayerNorm"]),
}


@pytest.mark.parametrize("case", sorted(CARD_CASES))
def test_export_hf_of_a_variant_checkpoint_loads_with_auto_class(case, tmp_path, sp_model):
    """The real export path (streaming writer, config.json, tokenizer, card) for non-Llama families; the card
    describes the architecture as it is (a GELU + LayerNorm export says so, not SwiGLU / RMSNorm)."""
    from scaletrain.hf.export_hf import export_hf

    switches, arch, says, never = CARD_CASES[case]
    m = config(**{"vocab_size": VOCAB, "tie_word_embeddings": True, **switches})
    ours = ours_for(m)
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", ours, m, sp_model)
    export_hf(str(ckpt), str(tmp_path / "hf"), progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert type(hf).__name__ == arch
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"`transformers.{arch}`" in card
    for text in says:
        assert text in card, f"{text!r} missing from the card:\n{card}"
    for text in never:
        assert text not in card.split("## Training")[0], f"{text!r} in the architecture part of the card:\n{card}"
    x = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() <= TOL


@pytest.mark.parametrize("family, tied", [("Starcoder2", True), ("SmolLM3", True), ("Llama", False)])
def test_config_without_tie_flag_takes_the_family_default(family, tied):
    """transformers leaves a value equal to its config class's default out of config.json (4.x): a Starcoder2 or
    SmolLM3 file without tie_word_embeddings is tied, as transformers would load it."""
    import transformers

    from scaletrain.hf.arch_config import model_values

    cls = getattr(transformers, f"{family}Config")
    cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, **({"hidden_act": "gelu"} if family == "Starcoder2" else {})).to_dict()
    cfg.pop("tie_word_embeddings")
    assert cls.from_dict(cfg).tie_word_embeddings is tied
    assert model_values(family, cfg, "config.json", lambda name: True)["tie_word_embeddings"] is tied


@pytest.mark.parametrize("combo", ["llama-bias", "starcoder2-ln-gelu", "phi-gelu-parallel"])
def test_grow_reads_an_hf_parent_only_in_llama_layout(combo, tmp_path):
    """`scaletrain grow` streams tensors by our names from the parent's files: a dir of another architecture
    (renamed, fused or permuted tensors) is refused in one line pointing at import-hf, not a KeyError later."""
    from scaletrain.errors import UserError
    from scaletrain.growth.parent import open_parent

    hf = hf_for(config(**COMBOS[combo][0]), tmp_path)[2]
    hf.save_pretrained(tmp_path / "hf")
    if combo.startswith("llama"):
        assert open_parent(tmp_path / "hf").src.kind == "hf"
    else:
        with pytest.raises(UserError, match="import it first .*scaletrain import-hf"):
            open_parent(tmp_path / "hf")


def test_per_head_norms_are_collapsed_in_any_order(tmp_path):
    """safetensors lists tensor names as text (norms.10 before norms.2): with 11 or more heads the last head
    arrived before heads 2-9, and StableLM's import failed with a KeyError."""
    m = config(norm="layernorm", parallel_block=True, qk_norm=True, hidden_size=96, num_heads=12, num_kv_heads=12)
    ours = ours_for(m).state_dict()
    plan, cfg, _ = hf_for(m, tmp_path)
    theirs = dict(sorted(plan.adapter.tensors(ours.items())))  # the order safe_open().keys() gives
    assert list(theirs).index("model.layers.0.self_attn.q_layernorm.norms.11.weight") < \
        list(theirs).index("model.layers.0.self_attn.q_layernorm.norms.2.weight")
    m2, adapter = import_plan(cfg, "hf", lambda n: bool(theirs[n].abs().max() > 0) if n in theirs else None)
    specs = adapter.specs([(n, tuple(t.shape), t.dtype) for n, t in theirs.items()])
    back = dict(adapter.tensors(theirs.items()))
    assert [(n, s) for n, s, _ in specs] == [(n, tuple(t.shape)) for n, t in back.items()]
    assert back.keys() == ours.keys() and all(torch.equal(back[k], v) for k, v in ours.items())
