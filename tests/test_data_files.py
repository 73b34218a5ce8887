"""Reading source files: one document per text file, jsonl/json/parquet rows, and rows that are no text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scaletrain.data.classification import iter_labelled
from scaletrain.data.examples import iter_examples
from scaletrain.data.sources import iter_documents, resolve_source
from scaletrain.errors import UserError
from test_data import TOP_LEVEL, copy_corpus

PAIRS = [{"prompt": "2+2=", "completion": "4"}, {"prompt": "héllo", "completion": " wörld 🐍"}]


def test_glob_and_single_file_sources(tmp_path):
    d = copy_corpus(tmp_path / "g", TOP_LEVEL[:3])
    (d / "x.md").write_text("# markdown counts as text\n")
    assert len(resolve_source(str(d / "*.txt")).files) == 3
    assert len(resolve_source(str(d)).files) == 4 and resolve_source(str(d)).skipped_note() is None
    for name in ("rows.csv", "more.csv", "dump.jsonl.gz", ".DS_Store"):
        (d / name).write_text("x")
    note = resolve_source(str(d)).skipped_note()  # printed once, when the cache is built
    assert note.startswith("note: data.source: 3 file(s) of other types not read (.csv x2, .gz x1)"), note
    one = resolve_source(str(d / "x.md"))
    assert [t for _, t in iter_documents(one)] == ["# markdown counts as text\n"]


def test_files_are_read_without_copies_in_the_datasets_cache(tmp_path, monkeypatch):
    """One document per .txt/.md file in path order, empty files skipped, Windows and old-Mac line ends read as \\n;
    jsonl rows whose *other* fields change type midway (mixed metadata in scraped corpora) and parquet rows are
    read too, and nothing lands in the Hugging Face datasets cache (an Arrow copy of a 50 GB corpus would)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    hf_cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(hf_cache))
    d = tmp_path / "t"
    d.mkdir()
    (d / "a.txt").write_bytes(b"first line\r\nsecond line\rthird\n")
    (d / "b.txt").write_bytes(b"")
    (d / "c.md").write_text("# third\n\n\nparagraphs stay in one document\n")
    (d / "d.jsonl").write_text(json.dumps({"text": "row one", "id": 1}) + "\n" + json.dumps({"text": "row two", "id": "x-2"}) + "\n")
    pq.write_table(pa.table({"text": ["p1", None, "p3"], "n": [1, 2, 3]}), d / "e.parquet")
    docs = list(iter_documents(resolve_source(str(d))))
    assert [Path(i.partition("#")[0]).name for i, _ in docs] == ["a.txt", "c.md", "d.jsonl", "d.jsonl", "e.parquet", "e.parquet"]
    assert [t for _, t in docs] == ["first line\nsecond line\nthird\n", "# third\n\n\nparagraphs stay in one document\n",
                                    "row one", "row two", "p1", "p3"]
    assert not hf_cache.exists() or not any(hf_cache.rglob("*"))
    with pytest.raises(UserError, match=r"e.parquet has no 'body' column \(columns: text, n\); set data.text_field"):
        list(iter_documents(resolve_source(str(d / "e.parquet"), "body")))


def test_text_field_changes_fingerprint(tmp_path):
    d = tmp_path / "j"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "x", "body": "y"}\n')
    assert resolve_source(str(d), "text").fingerprint() != resolve_source(str(d), "body").fingerprint()
    assert [t for _, t in iter_documents(resolve_source(str(d), "body"))] == ["y"]


def test_a_json_array_is_read_like_json_lines(tmp_path):
    """`.json` is accepted by name, so a pretty-printed array must be read as rows, not as broken lines."""
    (tmp_path / "lines.jsonl").write_text("".join(json.dumps(r) + "\n" for r in PAIRS))
    (tmp_path / "array.json").write_text("\ufeff  " + json.dumps(PAIRS, indent=2, ensure_ascii=False), encoding="utf-8")
    want = [(r["prompt"], r["completion"]) for r in PAIRS]
    assert list(iter_examples(resolve_source(str(tmp_path / "lines.jsonl")))) == want
    assert list(iter_examples(resolve_source(str(tmp_path / "array.json")))) == want
    (tmp_path / "cut.json").write_text(json.dumps(PAIRS)[:-5])
    with pytest.raises(UserError, match=r"cut\.json is not valid JSON"):
        list(iter_examples(resolve_source(str(tmp_path / "cut.json"))))


def test_half_a_surrogate_pair_is_a_one_line_error_naming_the_row(tmp_path):
    """JSON's \\ud83d escape (half an emoji, as cut-off scraped text has) decodes to a string no tokenizer takes."""
    f = tmp_path / "pc.jsonl"
    f.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "cut \\ud83d", "completion": "x"}\n')
    with pytest.raises(UserError, match=r"pc\.jsonl:2: 'prompt' holds '\\ud83d'"):
        list(iter_examples(resolve_source(str(f))))
    g = tmp_path / "cls.jsonl"
    g.write_text('{"text": "fine", "label": 0}\n{"text": "\\udc00 alone", "label": 1}\n')
    with pytest.raises(UserError, match=r"cls\.jsonl:2: 'text' holds"):
        list(iter_labelled(resolve_source(str(g))))


@pytest.mark.parametrize("reader", [iter_examples, iter_labelled])
def test_an_unreadable_parquet_file_is_a_one_line_error(tmp_path, reader):
    f = tmp_path / "train.parquet"
    f.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n")  # a Git LFS pointer
    with pytest.raises(UserError, match=r"could not read .*train\.parquet as parquet"):
        list(reader(resolve_source(str(f))))


def test_a_dataset_saved_with_save_to_disk_is_a_source(tmp_path):
    """`datasets`' save_to_disk directories, read in place: a Dataset of text rows for pre-training, and a
    DatasetDict's 'train' split of prompt/completion rows; a DatasetDict without 'train' is refused in one line."""
    import datasets

    texts = datasets.Dataset.from_dict({"text": ["alpha beta", "", "gamma"], "meta": [1, 2, 3]})
    texts.save_to_disk(str(tmp_path / "texts"))
    src = resolve_source(str(tmp_path / "texts"))
    assert [t for _, t in iter_documents(src)] == ["alpha beta", "gamma"]
    before = src.fingerprint()
    datasets.Dataset.from_dict({"text": ["other"], "meta": [0]}).save_to_disk(str(tmp_path / "texts2"))
    shutil.rmtree(tmp_path / "texts")
    shutil.move(tmp_path / "texts2", tmp_path / "texts")  # the same path, other content: another cache
    assert resolve_source(str(tmp_path / "texts")).fingerprint() != before
    pairs = datasets.Dataset.from_list(PAIRS)
    datasets.DatasetDict({"train": pairs, "test": pairs.select([0])}).save_to_disk(str(tmp_path / "pc"))
    assert list(iter_examples(resolve_source(str(tmp_path / "pc")))) == [(r["prompt"], r["completion"]) for r in PAIRS]
    datasets.DatasetDict({"test": pairs}).save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(UserError, match="DatasetDict without a 'train' split \\(splits: test\\)"):
        list(iter_examples(resolve_source(str(tmp_path / "no-train"))))
