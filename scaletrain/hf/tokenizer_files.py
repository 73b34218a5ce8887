"""Tokenizer files for a Hugging Face export, so `AutoTokenizer.from_pretrained(dir)` gives training's ids.

Our sentencepiece BPE (identity normalisation, no dummy prefix, byte fallback) becomes a `tokenizers` BPE:
the same vocab and ids, one merge (a, b) for every piece a+b whose halves are pieces, ranked by the piece's
score (sentencepiece's merge priority), ' ' -> '▁' as the only normalisation, no pre-tokenizer, no
BOS/EOS added. `split_special_tokens` keeps "<s>" in text as plain characters, as sentencepiece does.
Measured: ids identical to sentencepiece on every file of the Python stdlib (1,786 files, 9.8M tokens);
transformers' own LlamaTokenizer conversion also matches there except on text containing "<s>"/"</s>".
An HF tokenizer (from import-hf) is copied as is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from scaletrain.data.hf_tokenizer import PROBE, copy_tokenizer_files
from scaletrain.errors import UserError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6


def _proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    try:
        m.ParseFromString(model_file.read_bytes())
    except Exception:  # noqa: BLE001 - DecodeError
        raise UserError(f"cannot read sentencepiece model {model_file}") from None
    return m


def sentencepiece_tokenizer_json(model_file: Path) -> tuple[str, dict]:
    """(tokenizer.json text, names of unk/bos/eos) for one of our sentencepiece BPE models."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    m = _proto(model_file)
    n, t = m.normalizer_spec, m.trainer_spec
    if t.model_type != 2 or n.add_dummy_prefix or n.remove_extra_whitespaces or n.name not in ("identity", "") or n.precompiled_charsmap:
        raise UserError(f"{model_file}: only sentencepiece BPE models with identity normalisation and no dummy prefix "
                        "(as scaletrain trains them) can be exported; publish this tokenizer with its own HF files")
    vocab = {p.piece: i for i, p in enumerate(m.pieces)}
    kinds = [p.type for p in m.pieces]
    merges = []
    for piece, i in vocab.items():
        if kinds[i] != NORMAL:
            continue
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in vocab and b in vocab and kinds[vocab[a]] == NORMAL and kinds[vocab[b]] == NORMAL:
                merges.append((i, vocab[a], vocab[b], a, b))  # rank: the merged piece's id (= score order)
    merges.sort()
    special = {"unk": m.pieces[t.unk_id].piece if t.unk_id >= 0 else None,
               "bos": m.pieces[t.bos_id].piece if t.bos_id >= 0 else None,
               "eos": m.pieces[t.eos_id].piece if t.eos_id >= 0 else None}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=special["unk"],
                               fuse_unk=True, byte_fallback=bool(t.byte_fallback)))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False) for p in m.pieces if p.type in (CONTROL, UNKNOWN)])
    # sentencepiece's user-defined symbols are always one token wherever they appear in text: added tokens
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False) for p in m.pieces if p.type == USER_DEFINED])
    return tok.to_str(), special


def write_hf_tokenizer(tokenizer: Path, out: Path, max_len: int, pad_with_eos: bool = False) -> None:
    """Write the tokenizer files into `out` (the export dir): converted sentencepiece, or HF files copied.
    `pad_with_eos` (classifiers, which pool at the last non-pad token): the tokenizer pads with EOS, the model
    config's pad_token_id, so `tokenizer(texts, padding=True)` batches the way the model reads them."""
    if tokenizer.is_dir():
        if not copy_tokenizer_files(tokenizer, out):
            raise UserError(f"{tokenizer} holds no tokenizer files")
        if pad_with_eos:
            _pad_with_eos(out)
        return
    text, special = sentencepiece_tokenizer_json(tokenizer)
    (out / "tokenizer.json").write_text(text)
    shutil.copyfile(tokenizer, out / "tokenizer.model")
    if pad_with_eos:
        special["pad"] = special["eos"]
    names = {f"{k}_token": v for k, v in special.items() if v is not None}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **names, "add_bos_token": False, "add_eos_token": False,
              "split_special_tokens": True, "clean_up_tokenization_spaces": False, "model_max_length": max_len}
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2))


def _pad_with_eos(out: Path) -> None:
    """Copied HF files: pad with EOS, whatever pad token the source tokenizer had. The classifier trained on
    EOS-padded windows, and HF's pooling takes the last token that is not config.pad_token_id (EOS): a tokenizer
    padding with another token had every shorter row of a batch read at a padding position. EOS may be named
    in tokenizer_config.json or only in special_tokens_map.json."""
    files = [out / "tokenizer_config.json", out / "special_tokens_map.json"]
    settings = [json.loads(f.read_text()) if f.is_file() else None for f in files]
    eos = next((s["eos_token"] for s in settings if s and s.get("eos_token") is not None), None)
    if eos is None:
        return  # nothing names EOS: the exported config's pad_token_id stands alone
    for f, s in zip(files, settings):
        if s is not None or f.name == "tokenizer_config.json":
            f.write_text(json.dumps({**(s or {}), "pad_token": eos}, indent=2))


def check_same_ids(out: Path, ours) -> None:
    """AutoTokenizer on the export must reproduce the training tokenizer's ids (checked on PROBE)."""
    from scaletrain.data.hf_tokenizer import HFTokenizer

    theirs = HFTokenizer(out)
    sentencepiece = getattr(ours, "sp", None) is not None  # then its user-defined symbols go into the probe too
    symbols = [p.piece for p in _proto(ours.path).pieces if p.type == USER_DEFINED] if sentencepiece else []
    probe = PROBE + "".join(f" x{s}y" for s in symbols)
    a, b = ours.encode(probe), theirs.encode(probe)
    if a != b:
        first = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        raise UserError(f"the exported tokenizer does not reproduce the training tokenizer's ids (from token {first}: "
                        f"{a[first:first + 6]} vs {b[first:first + 6]}); the export was not written")
