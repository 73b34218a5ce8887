"""import-hf refuses what it would get wrong, in one line, and accepts what transformers itself accepts: a tied
config whose weights store a different head, a classifier that reads the EOS its tokenizer appends, a llama3
RoPE config without original_max_position_embeddings. Tiny random HF models saved here; transformers is the
oracle."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

TOKS = ["<unk>", "<s>", "</s>"] + list("abcdefghijklm")  # 16 ids


def small_llama(cls: str = "LlamaForCausalLM", **kw):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=len(TOKS), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                   initializer_range=0.2, **kw)
    torch.manual_seed(0)
    return getattr(transformers, cls)(cfg).eval()


def save_word_tokenizer(d: Path, append_eos: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>" if append_eos else "<s> $A",
                                                       special_tokens=[("<s>", 1), ("</s>", 2)])
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(d)


def one_line_error(rc: int, stderr: str, needle: str) -> bool:
    return rc == 2 and needle in stderr and len(stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("pad", [None, 0, 2], ids=["pad-none", "pad-unk", "pad-eos"])
def test_a_classifier_reading_its_appended_eos_is_refused(cli, tmp_path, pad):
    """HF pools at the rightmost non-pad token: the appended EOS unless pad is EOS. Ours read the last text token:
    an import (and its export) changed the predictions (logits [-0.71, -0.18] -> [0.30, -0.52])."""
    hf = tmp_path / "hf"
    small_llama("LlamaForSequenceClassification", num_labels=2, pad_token_id=pad).save_pretrained(hf)
    save_word_tokenizer(hf, append_eos=True)
    rc, _, stderr = cli("import-hf", str(hf), "--out", str(tmp_path / "ck"))
    if pad == 2:
        assert rc == 0, stderr
    else:
        assert one_line_error(rc, stderr, "reads the EOS its tokenizer appends"), stderr
        assert not (tmp_path / "ck").exists()


def test_a_classifier_whose_tokenizer_appends_nothing_imports_with_any_pad(cli, tmp_path):
    hf = tmp_path / "hf"
    small_llama("LlamaForSequenceClassification", num_labels=2, pad_token_id=0).save_pretrained(hf)
    save_word_tokenizer(hf, append_eos=False)
    rc, _, stderr = cli("import-hf", str(hf), "--out", str(tmp_path / "ck"))
    assert rc == 0, stderr


@pytest.mark.parametrize("head", ["different", "equal"])
def test_a_tied_config_with_a_stored_head(cli, tmp_path, head):
    """The stored lm_head.weight was dropped without a look: 11 off in the logits when it differed."""
    from safetensors.torch import load_file, save_file

    hf = tmp_path / "hf"
    small_llama(tie_word_embeddings=True).save_pretrained(hf)
    weights = load_file(hf / "model.safetensors")
    embed = weights["model.embed_tokens.weight"]
    weights["lm_head.weight"] = embed + 1 if head == "different" else embed.clone()
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    rc, _, stderr = cli("import-hf", str(hf), "--out", str(tmp_path / "ck"))
    if head == "equal":
        assert rc == 0, stderr
    else:
        assert one_line_error(rc, stderr, "different lm_head.weight"), stderr


def test_llama3_rope_without_its_original_context_defaults_as_transformers_does(cli, tmp_path):
    from transformers import AutoModelForCausalLM

    from scaletrain.generate import load_model

    hf = tmp_path / "hf"
    small_llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 16}).save_pretrained(hf)
    cfg = json.loads((hf / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(cfg.get(key), dict):
            cfg[key].pop("original_max_position_embeddings", None)
    (hf / "config.json").write_text(json.dumps(cfg))
    rc, _, stderr = cli("import-hf", str(hf), "--out", str(tmp_path / "ck"))
    assert rc == 0, stderr
    ours, _, _ = load_model(str(tmp_path / "ck"), need_tokenizer=False)
    x = torch.randint(0, len(TOKS), (1, 60), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(hf).eval()(x).logits
        assert (ours(x) - want).abs().max().item() < 1e-5
