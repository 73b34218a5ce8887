"""A Hugging Face tokenizer directory (AutoTokenizer, local files only) behind our `Tokenizer` interface.

Used when `data.tokenizer` is a directory, e.g. the `tokenizer/` of a checkpoint made by import-hf, so that
fine-tuning data is tokenised exactly as the imported model expects. `encode` is what
`AutoTokenizer.from_pretrained(dir)(text).input_ids` gives (BOS included when the tokenizer adds one), so
the ids used in training are the ids users get from the published tokenizer.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scaletrain.errors import UserError

# What a tokenizer *directory* is to us: these files only. An HF model dir given as the tokenizer also holds
# gigabytes of weights, which must never be hashed into a cache key or copied along with the tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")


def tokenizer_files(path: Path) -> list[Path]:
    """The files that make up the tokenizer at `path`: a sentencepiece file itself, or a directory's HF files."""
    if not path.is_dir():
        return [path]
    return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]


def copy_tokenizer_files(src_dir: Path, dest: Path) -> list[Path]:
    """An HF tokenizer directory's files (and nothing else) into the directory `dest`; returns the sources copied."""
    dest.mkdir(exist_ok=True)
    files = tokenizer_files(src_dir)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    return files


# Exercises whitespace runs, tabs, digits, bytes (emoji, CJK), and special-token strings.
PROBE = "def f(x):\n\tif x  >= 10_000:  # <s> </s> <unk>\n        return 'héllo wörld 你好 🙂'\n\n\n    return [1, 22, 333]\r\n"


def copy_tokenizer_dir(src_dir: Path, dest: Path) -> list[Path]:
    """An HF tokenizer into the directory `dest`, so that AutoTokenizer(dest) gives the ids AutoTokenizer(src_dir)
    gives; returns the files copied. In a model dir (config.json) transformers may take the tokenizer's class from
    the model type (a Mistral's tokenizer_config.json names LlamaTokenizer, yet it loads as TokenizersBackend,
    which tokenises the text after a special token differently): there the copy is checked, and where its ids
    differ the tokenizer is saved whole instead (save_pretrained records the class it loaded as)."""
    files = copy_tokenizer_files(src_dir, dest)
    if (src_dir / "config.json").is_file() and files:
        original = HFTokenizer(src_dir)
        if _ids(dest) != (original.encode(PROBE), original.encode_document(PROBE)):
            shutil.rmtree(dest)
            original.tok.save_pretrained(str(dest))
    return files


def _ids(tokenizer_dir: Path):
    """The probe's ids from the tokenizer in `tokenizer_dir`, None where the files alone do not load (their class
    named only in the config.json left behind)."""
    try:
        tok = HFTokenizer(tokenizer_dir)
    except UserError:
        return None
    return tok.encode(PROBE), tok.encode_document(PROBE)


class HFTokenizer:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # we fork workers; Rust threads and fork do not mix
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # "sequence longer than model_max_length": we window ourselves
        if self.path.is_dir() and not tokenizer_files(self.path):  # AutoTokenizer's own words trail off here
            raise UserError(f"{self.path} holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); give the "
                            "directory that has them, or a sentencepiece .model file")
        try:
            self.tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - OSError, ValueError, JSON errors, missing sentencepiece...
            msg = str(e).strip().splitlines()[0][:140] if str(e).strip() else type(e).__name__
            raise UserError(f"cannot load the tokenizer in {self.path} with transformers.AutoTokenizer ({msg})") from None
        if self.tok.eos_token_id is None:
            raise UserError(f"tokenizer {self.path} defines no eos_token; documents must end with one (set eos_token in tokenizer_config.json)")

    @property
    def vocab_size(self) -> int:
        return len(self.tok)

    @property
    def eos_id(self) -> int:
        return int(self.tok.eos_token_id)

    @property
    def bos_id(self) -> int:
        return -1 if self.tok.bos_token_id is None else int(self.tok.bos_token_id)

    def encode(self, text: str) -> list[int]:
        """Ids of a document start, with the tokenizer's own special tokens (e.g. BOS)."""
        return list(self.tok(text)["input_ids"])

    def encode_document(self, text: str) -> list[int]:
        """`encode` for running text of a corpus: a "</s>" or "<|endoftext|>" written in it (code, HTML, chat logs)
        stays text, not a control id; only the tokenizer's own BOS is special. (Prompt/completion rows keep
        HF's default: there, users write chat-template tokens on purpose.)"""
        return list(self.tok(text, split_special_tokens=True)["input_ids"])

    def encode_plain(self, text: str) -> list[int]:
        """Ids of a continuation (a completion after its prompt): no special tokens."""
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)
