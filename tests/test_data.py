"""Data pipeline: packed EOS-separated stream, deterministic content-hash split, honest cache reuse, local
txt/jsonl/parquet sources, and the window sampler's world-size invariance (the tokenizer: test_tokenizer.py)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from scaletrain.config import load_config
from scaletrain.data import prepare as prepare_mod
from scaletrain.data.prepare import prepare_data
from scaletrain.data.split import is_val, split_key
from scaletrain.data.sources import iter_documents, resolve_source
from scaletrain.errors import UserError
from data_fixtures import TOP_LEVEL, VAL, cache, cfg_for, copy_corpus, corpus, decoded_docs, docs_of, file_state  # noqa: F401 (fixtures)
from test_tokenizer import SYNTHETIC, real_texts


# ---- packed stream and split --------------------------------------------------------------------------

def test_stream_is_eos_separated_docs_in_order(cache, corpus):
    tok = cache.tokenizer()
    docs = docs_of(corpus)
    assert len(docs) == 30
    val_docs = [t for t in docs if is_val(t, VAL)]
    train_docs = [t for t in docs if not is_val(t, VAL)]
    assert val_docs and train_docs, "pick a corpus with both splits non-empty"
    for split, expected in (("train", train_docs), ("val", val_docs)):
        want = np.concatenate([np.asarray(tok.encode(t) + [tok.eos_id]) for t in expected])
        got = np.asarray(cache.tokens(split), dtype=np.int64)
        assert np.array_equal(got, want), f"{split}.bin is not encode(doc)+[EOS] for each {split} doc in order"
        assert int((got == tok.eos_id).sum()) == len(expected) == cache.meta["docs"][split]
        assert len(got) == cache.meta["tokens"][split]
        assert decoded_docs(cache, split) == expected


def test_split_is_deterministic_by_content():
    texts = [p.read_text("utf-8") for p in TOP_LEVEL[:40]]
    first = [is_val(t, 0.3) for t in texts]
    assert first == [is_val(t, 0.3) for t in texts]
    assert all(0.0 <= split_key(t) < 1.0 for t in texts)
    assert 0 < sum(first) < len(texts)
    # Monotone in the fraction; nothing is val at 0.
    assert all(is_val(t, 0.6) for t, v in zip(texts, first) if v)
    assert not any(is_val(t, 0.0) for t in texts)


def test_split_independent_of_file_names_and_order(cache, corpus, tmp_path, data_cache_dir):
    """Same contents under reversed-order names (and nested differently): same val set, by content."""
    files = sorted(corpus.glob("*.txt"))
    other = tmp_path / "reordered"
    other.mkdir()
    for i, p in enumerate(files):
        sub = other / ("b" if i % 2 else "a")
        sub.mkdir(exist_ok=True)
        shutil.copyfile(p, sub / f"{len(files) - i:03d}_{p.name}")
    assert [p.read_text() for p in sorted(other.rglob("*.txt"))] != [p.read_text() for p in files]
    again = prepare_data(cfg_for(other, data_cache_dir, f"data.tokenizer={cache.tokenizer_path}"), progress=False)
    assert again.dir != cache.dir
    for split in ("train", "val"):
        assert sorted(decoded_docs(again, split)) == sorted(decoded_docs(cache, split))
    assert again.meta["docs"] == cache.meta["docs"] and again.meta["tokens"] == cache.meta["tokens"]


def test_tiny_val_fraction_still_gets_one_val_doc(cache, corpus, data_cache_dir):
    docs = docs_of(corpus)
    assert not any(is_val(t, 1e-9) for t in docs)
    c = prepare_data(cfg_for(corpus, data_cache_dir, "data.val_fraction=1e-9", f"data.tokenizer={cache.tokenizer_path}"),
                     progress=False)
    nearest = min(docs, key=split_key)
    assert decoded_docs(c, "val") == [nearest]
    assert decoded_docs(c, "train") == [t for t in docs if t != nearest]
    assert c.meta["docs"] == {"train": 29, "val": 1}


def test_val_fraction_zero_has_empty_val(cache, corpus, data_cache_dir):
    c = prepare_data(cfg_for(corpus, data_cache_dir, "data.val_fraction=0", f"data.tokenizer={cache.tokenizer_path}"),
                     progress=False)
    assert len(c.tokens("val")) == 0 and c.meta["docs"]["val"] == 0
    assert decoded_docs(c, "train") == docs_of(corpus)


# ---- cache reuse -----------------------------------------------------------------------------------------

def test_cache_is_reused_without_rebuilding(cache, corpus, data_cache_dir, monkeypatch):
    before = file_state(cache.dir)

    def no_rebuild(*a, **k):
        raise AssertionError("prepare_data rebuilt a cache that already existed")

    monkeypatch.setattr(prepare_mod, "_build", no_rebuild)
    again = prepare_data(cfg_for(corpus, data_cache_dir), progress=False)
    assert again.dir == cache.dir and again.meta == cache.meta
    assert file_state(cache.dir) == before  # nothing rewritten (mtimes, sizes, bytes)
    assert not [p for p in data_cache_dir.iterdir() if ".tmp" in p.name], "temp dirs left behind"


def test_a_damaged_cache_is_a_one_line_error_not_a_silent_reuse(corpus, tmp_path):
    """A cache whose train.bin was cut short (a crash before it reached the disk, a full disk) is refused with
    the fix, and so is a cache dir without meta.json; a concurrent build's temp dir is left alone."""
    cfg = cfg_for(corpus, tmp_path / "cache")
    cache = prepare_data(cfg, progress=False)
    other_job = cache.dir.with_name(f".{cache.dir.name}.tmp-otherhost-{os.getpid()}-abcd")
    other_job.mkdir()
    bin_ = cache.dir / "train.bin"
    with open(bin_, "r+b") as f:
        f.truncate(bin_.stat().st_size // 2)
    with pytest.raises(UserError, match=r"is damaged: train.bin holds .* delete that directory"):
        prepare_data(cfg, progress=False)
    (cache.dir / "meta.json").unlink()
    with pytest.raises(UserError, match="has no meta.json"):
        prepare_data(cfg, progress=False)
    assert other_job.is_dir(), "another build's temp dir was deleted"


def test_different_vocab_gets_its_own_cache(cache, corpus, data_cache_dir):
    before = file_state(cache.dir)
    other = prepare_data(cfg_for(corpus, data_cache_dir, "model.vocab_size=384"), progress=False)
    assert other.dir != cache.dir and other.dir.parent == cache.dir.parent
    assert other.meta["tokenizer_vocab"] == 384 and other.tokenizer().vocab_size == 384
    assert int(np.asarray(other.tokens("train")).max()) < 384
    assert file_state(cache.dir) == before


def test_changed_source_gets_new_cache(tmp_path, data_cache_dir, cache):
    src = copy_corpus(tmp_path / "c", TOP_LEVEL[:12])
    tokenizer = f"data.tokenizer={cache.tokenizer_path}"
    first = prepare_data(cfg_for(src, data_cache_dir, tokenizer), progress=False)
    before = file_state(first.dir)
    with open(src / TOP_LEVEL[0].with_suffix(".txt").name, "a") as f:
        f.write("\n# appended line\n")
    second = prepare_data(cfg_for(src, data_cache_dir, tokenizer), progress=False)
    assert second.dir != first.dir
    assert file_state(first.dir) == before
    assert any("# appended line" in d for d in decoded_docs(second, "train") + decoded_docs(second, "val"))


# ---- sources ---------------------------------------------------------------------------------------------

def test_local_txt_jsonl_parquet_sources(tmp_path, data_cache_dir, cache):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [p.read_text("utf-8") for p in TOP_LEVEL[30:45]]
    d = tmp_path / "local"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text(texts[0] + "\ttab and ünïcödé\n")
    with open(d / "b.jsonl", "w") as f:
        for i, t in enumerate(texts[1:8]):
            f.write(json.dumps({"id": i, "body": t}) + "\n")
        f.write("\n")                                      # blank lines are skipped
        f.write(json.dumps({"id": 99, "body": ""}) + "\n")  # so are empty documents
    pq.write_table(pa.table({"body": texts[8:], "n": list(range(len(texts) - 8))}), d / "sub" / "c.parquet")
    (d / "README.rst").write_text("not a supported type: ignored when data.source is a directory")
    src = resolve_source(str(d), "body")
    assert [p.relative_to(d).as_posix() for p in src.files] == ["a.txt", "b.jsonl", "sub/c.parquet"]
    expected = [texts[0] + "\ttab and ünïcödé\n", *texts[1:8], *texts[8:]]
    assert [t for _, t in iter_documents(src)] == expected
    c = prepare_data(cfg_for(d, data_cache_dir, "data.text_field=body", "data.val_fraction=0",
                             f"data.tokenizer={cache.tokenizer_path}"), progress=False)
    assert decoded_docs(c, "train") == expected
    assert c.meta["docs"] == {"train": len(expected), "val": 0}


def test_bad_sources_are_user_errors(tmp_path, data_cache_dir):
    (tmp_path / "notes.docx").write_text("hello")
    with pytest.raises(UserError, match=r"\.docx"):
        resolve_source(str(tmp_path / "notes.docx"))
    with pytest.raises(UserError, match="matches no files"):
        resolve_source(str(tmp_path / "nothing" / "*.txt"))
    good = copy_corpus(tmp_path / "ok", TOP_LEVEL[:1])
    with pytest.raises(UserError, match="nope.model"):
        prepare_data(cfg_for(good, data_cache_dir, f"data.tokenizer={tmp_path / 'nope.model'}"), progress=False)


def test_stdlib_source_end_to_end(data_cache_dir):
    """The default source, fully: every readable stdlib module is one EOS-terminated document."""
    src = resolve_source("stdlib")
    assert src.kind == "stdlib" and len(src.files) > 500
    assert not any(part in ("site-packages", "dist-packages") for f in src.files for part in f.parts)
    n_docs = sum(1 for _ in iter_documents(src))
    c = prepare_data(load_config(None, [f"data.cache_dir={data_cache_dir}", "model.vocab_size=512",
                                        "data.tokenizer_sample_lines=20000"]), progress=False)
    m = c.meta
    assert m["docs"]["train"] + m["docs"]["val"] == n_docs
    assert m["docs"]["val"] > 0 and m["tokens"]["val"] > 0
    tok = c.tokenizer()
    for split in ("train", "val"):
        toks = np.asarray(c.tokens(split))
        assert int(toks.max()) < 512
        assert int((toks == tok.eos_id).sum()) == m["docs"][split]
    for name, text in {**real_texts(), **SYNTHETIC}.items():
        assert tok.decode(tok.encode(text)) == text, name


def test_forced_val_doc_is_not_the_bulk_of_the_corpus_nor_a_copy_of_train(cache, tmp_path):
    """When no document hashes into val, the one moved there must not be a huge file that leaves training a few
    KB (a 42 MB + 5 KB corpus used to train on the 5 KB), and its exact copies go with it (no val text in train)."""
    d = tmp_path / "skewed"
    d.mkdir()
    big, small = TOP_LEVEL[0].read_text() * 40, "def f():\n    return 1\n"
    (d / "big.txt").write_text(big)
    for i in range(3):
        (d / f"copy{i}.txt").write_text(small)
    (d / "other.txt").write_text("x = [i for i in range(10)]\n")
    assert not any(is_val(t, 0.02) for t in (big, small))
    c = prepare_data(cfg_for(d, tmp_path / "cache", "data.val_fraction=1e-9", f"data.tokenizer={cache.tokenizer_path}"),
                     progress=False)
    assert c.meta["tokens"]["train"] > 10 * c.meta["tokens"]["val"] > 0
    assert sum(doc == small for doc in decoded_docs(c, "val")) in (0, 3)
    assert sum(doc == small for doc in decoded_docs(c, "train")) in (0, 3)
    # the rule itself: nearest key within budget, else the shortest; duplicates (same key) together; one kept for train
    from scaletrain.data.prepare import _pick_for_val

    assert _pick_for_val([(0.5, 0, 900), (0.6, 900, 50), (0.6, 950, 50), (0.7, 1000, 10)], 1010, 0.01) == [(900, 50), (950, 50)]
    assert _pick_for_val([(0.5, 0, 500), (0.6, 500, 400)], 900, 0.01) == [(500, 400)]
    assert _pick_for_val([(0.5, 0, 100), (0.5, 100, 100)], 200, 0.01) == [(0, 100)]
    # nine copies of the nearest document are 82 % of the tokens: the other one goes instead
    copies = [(0.5, 100 * i, 100) for i in range(9)]
    assert _pick_for_val(copies + [(0.6, 900, 100)], 1000, 0.01) == [(900, 100)]


def test_a_killed_build_leaves_no_temp_dir_behind_the_next_one(cache, corpus, tmp_path):
    """A prepare killed midway (SIGKILL at the end of a preempted job's grace) left its temp dir, up to a corpus of
    tokens, forever. The next build clears this host's dead writers' temps and leaves a live writer's alone."""
    import socket
    import subprocess

    from scaletrain.data.prepare import find_cache

    cfg = cfg_for(corpus, tmp_path / "c", f"data.tokenizer={cache.tokenizer_path}")
    final, _ = find_cache(cfg)
    final.parent.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    host = socket.gethostname()
    name = lambda who, pid: final.with_name(f".{final.name}.tmp-{who}-{pid}-0a1b2c3d")  # noqa: E731
    stale, live = name(host, dead.pid), name(host, os.getpid())
    # another host's, one whose name only starts with ours (node / node-4000: "4000" is no pid of ours), and a
    # dead pid's that is still being written (another container with our hostname and pids of its own)
    other_host, longer_name, recent = name("elsewhere", dead.pid), name(f"{host}-4000", dead.pid), name(host, 999_999_999)
    for d in (stale, live, other_host, longer_name, recent):
        d.mkdir()
        (d / "train.bin").write_bytes(b"\0" * 64)
        if d != recent:
            for q in (d / "train.bin", d):
                os.utime(q, (0, 0))  # an hour and more untouched
    prepare_data(cfg, progress=False)
    assert not stale.exists() and all(d.exists() for d in (live, other_host, longer_name, recent))
    # A preempted job's restart rebuilds the cache before the killed build's temp has been quiet an hour, and
    # never builds it again: the sweep also runs whenever the finished cache is used.
    stale.mkdir()
    (stale / "train.bin").write_bytes(b"\0" * 64)
    for q in (stale / "train.bin", stale):
        os.utime(q, (0, 0))
    prepare_data(cfg, progress=False)
    assert not stale.exists() and live.exists()
