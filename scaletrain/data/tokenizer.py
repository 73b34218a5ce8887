"""Sentencepiece BPE: trained on a bounded sample of lines, lossless on source code (byte fallback,
no whitespace normalisation, no dummy prefix), with HF-Llama special ids: unk=0, bos=1, eos=2."""

from __future__ import annotations

import io
import random
import re
from pathlib import Path
from typing import Iterable

import numpy as np
import sentencepiece as spm

from scaletrain.errors import UserError

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_tokenizer(documents: Iterable[str], vocab_size: int, out_path: Path, sample_lines: int, seed: int = 0) -> None:
    """Train on at most `sample_lines` non-blank lines drawn uniformly (reservoir) from the documents,
    so memory stays bounded whatever the corpus size."""
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for doc in documents:
        for whole in doc.split("\n"):
            if not whole.strip():
                continue
            # sentencepiece drops lines over max_sentence_length (16 KiB): a corpus of one-line documents (minified
            # code, jsonl text without newlines) would leave it nothing, so long lines enter in 4,096-char pieces
            for line in (whole[i : i + 4096] for i in range(0, len(whole), 4096)):
                seen += 1
                if len(reservoir) < sample_lines:
                    reservoir.append(line)
                else:
                    j = rng.randrange(seen)
                    if j < sample_lines:
                        reservoir[j] = line
    if not reservoir:
        raise UserError("the data has no text to train a tokenizer on; check data.source")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(reservoir), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
            normalization_rule_name="identity", unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=16384,
            character_coverage=0.9995, num_threads=2, minloglevel=2, input_sentence_size=0,
            hard_vocab_limit=True,
        )
    except RuntimeError as e:
        raise UserError(_training_failure(str(e).splitlines()[0] if str(e) else type(e).__name__)) from None
    out_path.write_bytes(buf.getvalue())


def _training_failure(raw: str) -> str:
    """sentencepiece's reason, with the fix that matches it."""
    reason = raw.rpartition("] ")[2].strip() or raw.strip()
    if "smaller than required_chars" in reason:  # more distinct characters than the vocab has room for
        need = re.search(r"vs (\d+)", reason)
        return (f"tokenizer training failed: the text has more distinct characters than model.vocab_size allows; raise "
                f"model.vocab_size{f' above {need.group(1)}' if need else ''}")
    if "too high" in reason:  # the corpus cannot fill the vocabulary
        return f"tokenizer training failed ({reason[:200]}); lower model.vocab_size or add data"
    return f"tokenizer training failed ({reason[:200]}); check data.source and model.vocab_size"


class Tokenizer:
    """Thin wrapper so the rest of the code never touches sentencepiece directly."""

    def __init__(self, model_path: str | Path):
        self.path = Path(model_path)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(str(self.path))
        except (OSError, RuntimeError):
            raise UserError(f"cannot read sentencepiece model {self.path}; give a valid .model file in data.tokenizer") from None

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    @property
    def eos_id(self) -> int:
        return self.sp.eos_id()

    @property
    def bos_id(self) -> int:
        return self.sp.bos_id()

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    # a document longer than this (a whole book or dump in one .txt) is encoded a piece at a time: one call's
    # Python list of ids costs ~50 bytes a character (a 1 GB file: ~50 GB in a worker)
    PIECE_CHARS = 1 << 20

    def encode_document(self, text: str) -> list[int] | np.ndarray:
        """Ids of a corpus document (sentencepiece never reads control ids like "</s>" out of text). A long one is
        encoded in pieces cut after a newline, with the same ids as in one call, where the model allows it."""
        if len(text) <= self.PIECE_CHARS or not self._splits_at_newlines():
            return self.sp.encode(text)
        parts, start = [], 0
        while start < len(text):
            end = text.find("\n", start + self.PIECE_CHARS) + 1 or len(text)  # after a newline, or the end
            parts.append(np.asarray(self.sp.encode(text[start:end]), dtype=np.uint32))
            start = end
        return np.concatenate(parts)

    def _splits_at_newlines(self) -> bool:
        """Whether encoding "a\n" and "b" apart gives the ids of "a\nb": no piece holds a newline (none can span
        one), and nothing is added or removed at the start of an input (dummy prefix, whitespace folding). Ours
        (train_tokenizer) qualifies; Llama-2's tokenizer.model (dummy prefix) does not."""
        if not hasattr(self, "_newline_safe"):
            from sentencepiece import sentencepiece_model_pb2 as pb

            m = pb.ModelProto()
            m.ParseFromString(self.sp.serialized_model_proto())
            ns = m.normalizer_spec
            self._newline_safe = (not ns.add_dummy_prefix and not ns.remove_extra_whitespaces
                                  and not any("\n" in piece.piece for piece in m.pieces))
        return self._newline_safe

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def encode_plain(self, text: str) -> list[int]:
        """Same as `encode`: sentencepiece adds no special tokens here (the HF wrapper differs)."""
        return self.sp.encode(text)


def load_tokenizer(path: str | Path):
    """`data.tokenizer` / a checkpoint's tokenizer: a sentencepiece .model file, or an HF tokenizer directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        from scaletrain.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(p)
    return Tokenizer(p)
