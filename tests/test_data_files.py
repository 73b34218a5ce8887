"""Reading source files: one document per text file, jsonl/json/parquet rows, and rows that are no text."""

from __future__ import annotations

import json
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
    assert len(resolve_source(str(d)).files) == 4
    one = resolve_source(str(d / "x.md"))
    assert [t for _, t in iter_documents(one)] == ["# markdown counts as text\n"]


def test_text_files_are_read_by_datasets_one_document_each(tmp_path, monkeypatch):
    """Every .txt/.md of a source in one `datasets` call (text builder, sample_by=document): one document per
    file in path order, empty files skipped, Windows line ends read as \\n (text mode)."""
    import datasets

    d = tmp_path / "t"
    d.mkdir()
    (d / "a.txt").write_bytes(b"first line\r\nsecond line\r\n")
    (d / "b.txt").write_bytes(b"")
    (d / "c.md").write_text("# third\n\n\nparagraphs stay in one document\n")
    calls = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((a, k)) or real(*a, **k))
    docs = list(iter_documents(resolve_source(str(d))))
    assert [Path(i).name for i, _ in docs] == ["a.txt", "c.md"]
    assert [t for _, t in docs] == ["first line\nsecond line\n", "# third\n\n\nparagraphs stay in one document\n"]
    assert len(calls) == 1 and calls[0][0] == ("text",) and calls[0][1]["sample_by"] == "document"
    assert [Path(f).name for f in calls[0][1]["data_files"]] == ["a.txt", "b.txt", "c.md"]


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
