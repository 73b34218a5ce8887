"""Offline Hugging Face fixtures: a sentencepiece model trained here, a random-weight HF Llama saved with
`save_pretrained` (with an HF tokenizer converted by transformers), and scaletrain checkpoint dirs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from launch_utils import run_cli
from launch_utils import small_corpus

VOCAB = 512


def train_sp(corpus: Path, out: Path) -> Path:
    from scaletrain.data.tokenizer import train_tokenizer

    docs = (p.read_text() for p in sorted(corpus.glob("*.txt")))
    train_tokenizer(docs, VOCAB, out, sample_lines=20_000, seed=0)
    return out


def hf_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                vocab_size=VOCAB, max_position_embeddings=256, rope_theta=500000.0, tie_word_embeddings=False,
                rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, initializer_range=0.15)
    return LlamaConfig(**{**base, **kw})


def save_hf_llama(out: Path, sp_model: Path, seed: int = 0, **kw) -> Path:
    """Random HF Llama (6 heads / 2 KV, rope_theta 5e5, untied by default) + transformers' own Llama
    tokenizer converted from our sentencepiece file, both written with save_pretrained."""
    from transformers import LlamaForCausalLM, LlamaTokenizer

    spdir = out.parent / f"{out.name}-sp"
    spdir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(sp_model, spdir / "tokenizer.model")
    LlamaTokenizer.from_pretrained(str(spdir)).save_pretrained(str(out))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hf_llama_config(**kw))
    with torch.no_grad():  # non-trivial norm gains, so a wrong norm mapping would show
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(out))
    return out


def write_checkpoint_dir(out: Path, model, model_cfg, sp_model: Path) -> Path:
    """Our model's weights as a scaletrain checkpoint dir (what growth or import-hf would write)."""
    from scaletrain.config import Config, TrainConfig
    from scaletrain.weights.writer import write_safetensors

    out.mkdir(parents=True)
    sd = {n: t for n, t in model.state_dict().items() if not (model_cfg.tie_word_embeddings and n == "lm_head.weight")}
    write_safetensors(out, [(n, tuple(t.shape), t.dtype) for n, t in sd.items()], sd.items(), 1 << 30, progress=False)
    (out / "config.yaml").write_text(yaml.safe_dump(Config(model=model_cfg, train=TrainConfig(seq_len=min(64, model_cfg.max_seq_len))).to_dict()))
    (out / "tokenizer").mkdir()
    shutil.copyfile(sp_model, out / "tokenizer" / "tokenizer.model")
    return out


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a dir (sharded or not)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def cli_ok(*args: str, timeout: float = 300) -> str:
    rc, out, err = run_cli(*args, timeout=timeout)
    assert rc == 0, f"scaletrain {' '.join(args)} failed rc={rc}\n{out[-2000:]}\n{err[-3000:]}"
    return out


@pytest.fixture(scope="session")
def hf_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf")


@pytest.fixture(scope="session")
def corpus(hf_root) -> Path:
    return small_corpus(hf_root / "corpus")


@pytest.fixture(scope="session")
def sp_model(hf_root, corpus) -> Path:
    return train_sp(corpus, hf_root / "sp.model")


@pytest.fixture(scope="session")
def hf_dir(hf_root, sp_model) -> Path:
    return save_hf_llama(hf_root / "hf-llama", sp_model)


@pytest.fixture(scope="session")
def imported(hf_root, hf_dir) -> Path:
    out = hf_root / "imported"
    cli_ok("import-hf", str(hf_dir), "--out", str(out))
    return out


def prompt_completion_file(path: Path, corpus: Path, n: int = 40) -> Path:
    with open(path, "w") as f:
        for p in sorted(corpus.glob("*.txt"))[:n]:
            f.write(json.dumps({"prompt": f"# module {p.stem}\n", "completion": p.read_text()[:300]}) + "\n")
    return path
