"""The tokenizer: lossless on real and odd text, its special ids, a given sentencepiece model or HF model dir,
training on one-line documents, and a huge document encoded in pieces with the same ids."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from data_fixtures import STDLIB, TOP_LEVEL, VOCAB, cache, cfg_for, corpus, docs_of  # noqa: F401
from scaletrain.data import prepare as prepare_mod
from scaletrain.data.prepare import prepare_data
from scaletrain.data.sources import resolve_source
from scaletrain.errors import UserError


def real_texts() -> dict[str, str]:
    """Real stdlib files the tokenizer was not trained on: non-ASCII ones, and ones with tabs if the
    install has them (the email test data does)."""
    out = {}
    for p in TOP_LEVEL[30:]:
        text = p.read_text("utf-8")
        if any(ord(c) > 127 for c in text):
            out[p.name] = text
        if len(out) >= 5:
            break
    tabbed = 0
    for p in sorted((STDLIB / "test" / "test_email" / "data").glob("*.txt")):
        try:
            text = p.read_text("utf-8")
        except UnicodeDecodeError:
            continue
        if "\t" in text:
            out[p.name] = text
            tabbed += 1
        if tabbed >= 3:
            break
    return out


SYNTHETIC = {
    "tabs-crlf-spaces": "def f(x):\r\n\treturn x\t# tab\r\n\n\n    \t  trailing   \n\t\t\n",
    "unicode": "naïve café — “quotes” 日本語 한국어 emoji 🐍🚀 math ∑∫≠ nbsp\u00a0zwsp\u200b end",
    "leading-space": "   leading spaces and a final newline\n",
    "control": "bell\x07 vt\x0b ff\x0c esc\x1b[0m",
    "empty": "",
}


def test_tokenizer_round_trip_real_files(cache):
    tok = cache.tokenizer()
    texts = real_texts()
    assert sum(any(ord(c) > 127 for c in t) for t in texts.values()) >= 3, "expected non-ASCII stdlib files"
    for name, text in {**texts, **SYNTHETIC}.items():
        ids = tok.encode(text)
        assert all(0 <= i < VOCAB for i in ids)
        assert tok.eos_id not in ids, f"{name}: EOS inside a document's encoding"
        assert tok.decode(ids) == text, f"{name}: decode(encode(x)) != x"


def test_tokenizer_special_ids(cache):
    tok = cache.tokenizer()
    assert (tok.sp.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == VOCAB == cache.meta["tokenizer_vocab"]
    assert cache.meta["eos_id"] == 2 and cache.meta["dtype"] == "uint16"


def test_tokenizer_round_trip_on_training_docs(cache, corpus):
    tok = cache.tokenizer()
    for text in docs_of(corpus):
        assert tok.decode(tok.encode(text)) == text


def test_existing_sentencepiece_model_is_used(cache, corpus, data_cache_dir, tmp_path):
    model = tmp_path / "my.model"
    shutil.copyfile(cache.tokenizer_path, model)
    c = prepare_data(cfg_for(corpus, data_cache_dir, f"data.tokenizer={model}"), progress=False)
    assert c.dir != cache.dir  # the fingerprint includes the tokenizer
    assert c.tokenizer_path.read_bytes() == model.read_bytes()
    # Same tokenizer, same documents, same split: the very same token streams.
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(c.tokens(split)), np.asarray(cache.tokens(split)))
    # A model bigger than the model's vocab is refused, naming the key.
    with pytest.raises(UserError, match="vocab_size"):
        prepare_data(cfg_for(corpus, data_cache_dir, f"data.tokenizer={model}", "model.vocab_size=256"), progress=False)


def test_a_model_dir_as_tokenizer_contributes_only_its_tokenizer_files(tmp_path, corpus, data_cache_dir):
    """data.tokenizer (or init.from) may name an HF *model* dir: its weights are neither hashed into the cache key
    nor copied into the cache or the run dir, only the tokenizer files are."""
    from scaletrain.data.hf_tokenizer import copy_tokenizer_files, tokenizer_files

    hf = tmp_path / "hf-model"
    hf.mkdir()
    (hf / "tokenizer.json").write_text('{"version": "1.0"}')
    (hf / "tokenizer_config.json").write_text("{}")
    (hf / "config.json").write_text("{}")
    (hf / "model.safetensors").write_bytes(b"weights" * 1000)
    assert [f.name for f in tokenizer_files(hf)] == ["tokenizer.json", "tokenizer_config.json"]
    cfg = cfg_for(corpus, data_cache_dir, f"data.tokenizer={hf}")
    src = resolve_source(str(corpus))
    before = prepare_mod.cache_fingerprint(cfg, src)
    (hf / "model.safetensors").write_bytes(b"other weights")
    assert prepare_mod.cache_fingerprint(cfg, src) == before
    (hf / "tokenizer.json").write_text('{"version": "1.1"}')
    assert prepare_mod.cache_fingerprint(cfg, src) != before
    copy_tokenizer_files(hf, tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]


def test_tokenizer_trains_on_one_line_documents_and_names_the_fix(tmp_path):
    """Documents that are one long line each (minified code, jsonl text without newlines): sentencepiece drops
    lines over 16 KiB, so without cutting them it had no sentences and failed with an empty reason."""
    from scaletrain.data.tokenizer import Tokenizer, train_tokenizer

    words = [w for p in TOP_LEVEL[:20] for w in p.read_text().split()]
    docs = [" ".join(words[i : i + 4000]) for i in range(0, 40_000, 4000)]
    assert min(len(d) for d in docs) > 16384 and not any("\n" in d for d in docs)
    train_tokenizer(docs, 512, tmp_path / "t.model", sample_lines=1000)
    tok = Tokenizer(tmp_path / "t.model")
    assert tok.vocab_size == 512 and tok.sp.decode(tok.encode(docs[0][:500])) == docs[0][:500]
    with pytest.raises(UserError, match=r"more distinct characters than model.vocab_size allows; raise model.vocab_size above \d+"):
        train_tokenizer(["".join(chr(0x4E00 + i) for i in range(400))], 300, tmp_path / "u.model", sample_lines=10)


def test_a_huge_one_file_document_is_encoded_in_pieces_with_the_same_ids(cache, monkeypatch, tmp_path):
    """A whole book or dump in one .txt is one document; one encode call's Python list cost ~50 bytes a character
    (a 1 GB file: ~50 GB in a tokenising worker). Ours is encoded in newline-cut pieces, and the ids must be the
    ones a single call gives; a tokenizer with a dummy prefix (Llama-2's) is never cut."""
    import sentencepiece as spm

    from scaletrain.data.tokenizer import Tokenizer

    tok = cache.tokenizer()
    text = "".join(p.read_text() for p in TOP_LEVEL[:12])
    monkeypatch.setattr(Tokenizer, "PIECE_CHARS", 5000)
    calls = []
    real = tok.sp.encode
    monkeypatch.setattr(tok.sp, "encode", lambda t, *a, **k: calls.append(len(t)) or real(t, *a, **k))
    pieces = tok.encode_document(text)
    assert len(calls) > 10 and max(calls) < 5000 + 2000
    assert list(pieces) == real(text)
    # `scaletrain eval --data` of such a file reads the same ids (an array, not a list, came back: a traceback)
    from scaletrain.evaluate import file_batches

    book = tmp_path / "book.txt"
    book.write_text(text)
    monkeypatch.setattr(tok.sp, "encode", real)
    windows = [x[0].tolist() + [y[0, -1].item()] for x, y in file_batches(book, tok, len(real(text)) + 1, 1, "text")]
    assert windows == [real(text) + [tok.eos_id]]
    # a dummy-prefix model: encoding pieces apart would add a "▁" at each cut, so it is encoded whole
    proto = tok.sp.serialized_model_proto()
    from sentencepiece import sentencepiece_model_pb2 as pb

    m = pb.ModelProto()
    m.ParseFromString(proto)
    m.normalizer_spec.add_dummy_prefix = True
    other = Tokenizer.__new__(Tokenizer)
    other.sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    assert not other._splits_at_newlines() and tok._splits_at_newlines()
