"""Where documents come from: the embedded stdlib corpus, or local text/jsonl/parquet files via `datasets`.

A source yields (doc_id, text) pairs in a deterministic order and has a fingerprint that changes
whenever its content could have changed (paths, sizes, mtimes), so caches keyed by it stay honest.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from scaletrain.errors import UserError

TEXT_SUFFIXES = {".txt", ".md", ".text"}
JSON_SUFFIXES = {".jsonl", ".json"}
PARQUET_SUFFIXES = {".parquet"}
SUPPORTED = TEXT_SUFFIXES | JSON_SUFFIXES | PARQUET_SUFFIXES


@dataclass(frozen=True)
class Source:
    files: tuple[Path, ...]
    kind: str  # "stdlib" | "local"
    text_field: str = "text"

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.text_field}".encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def describe(self) -> str:
        return f"{self.kind}: {len(self.files)} files"


def stdlib_files() -> list[Path]:
    """The running Python's own standard-library .py files: real text on every machine, no download."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Installed third-party packages differ between machines; the stdlib itself does not.
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(Path(dirpath) / n for n in sorted(filenames) if n.endswith(".py"))
    return files


def write_stdlib_sample(dest: Path, n_files: int = 40) -> Path:
    """The first `n_files` top-level stdlib modules copied into `dest` as .txt (once): a small real corpus for
    smoke runs and tests, tokenised in about a second."""
    if not dest.exists():
        dest.mkdir(parents=True)
        for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:n_files]:
            shutil.copyfile(p, dest / (p.stem + ".txt"))
    return dest


def resolve_source(source: str, text_field: str = "text") -> Source:
    if source == "stdlib":
        files = stdlib_files()
        if not files:
            raise UserError("data.source=stdlib found no .py files in this Python's stdlib; point data.source at local text files")
        return Source(tuple(files), "stdlib", text_field)
    pattern = os.path.expanduser(source)
    p = Path(pattern)
    if p.is_dir():
        matches = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in SUPPORTED)
    else:
        matches = sorted(Path(m) for m in glob.glob(pattern, recursive=True) if Path(m).is_file())
    if not matches:
        raise UserError(f"data.source '{source}' matches no files; give a directory, file or glob of .txt/.jsonl/.parquet files, or 'stdlib'")
    bad = [m for m in matches if m.suffix not in SUPPORTED]
    if bad:
        raise UserError(f"data file {bad[0]} has unsupported type '{bad[0].suffix}'; use .txt, .jsonl or .parquet")
    empty = [m for m in matches if m.stat().st_size == 0]
    if len(empty) == len(matches):
        raise UserError(f"data.source '{source}' holds only empty files; add text to them")
    return Source(tuple(matches), "local", text_field)


def _check_text_file(path: Path) -> None:
    """A one-line error for what datasets' text reader would fail on with a trace (or read as garbage)."""
    raw = path.read_bytes()
    if b"\0" in raw:
        raise UserError(f"data file {path} looks binary (NUL bytes); remove it from data.source")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 (byte {e.start}); convert it with iconv or remove it") from None


def _read_text_files(paths: list[Path]):
    """Each text file as one document, read by datasets' `text` builder in one call (one row per file, in
    order; universal newlines become \n). One call, not one per file: each call costs ~50 ms of set-up.
    Returns the Arrow-backed (memory-mapped) dataset; rows are read as they are needed."""
    import datasets

    for path in paths:
        _check_text_file(path)
    datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("text", data_files=[str(p) for p in paths], sample_by="document", split="train")
    except Exception as e:
        raise UserError(f"could not read the .txt files of data.source with datasets ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None
    if len(ds) != len(paths):  # the builder's contract (one row per file); checked, as everything rests on it
        raise RuntimeError(f"datasets read {len(ds)} documents from {len(paths)} text files")
    return ds


def _check_jsonl(path: Path, field: str) -> None:
    """Validate line by line first, so a bad line gets a line number rather than a pyarrow trace."""
    for where, row in iter_rows(path):
        if not isinstance(row, dict) or field not in row:
            raise UserError(f"{where} has no '{field}' field; set data.text_field to the field holding the text")
        if not isinstance(row[field], str):
            raise UserError(f"{where} field '{field}' is not a string")


def _read_with_datasets(path: Path, field: str) -> Iterator[str]:
    import datasets

    datasets.disable_progress_bars()
    builder = "parquet" if path.suffix in PARQUET_SUFFIXES else "json"
    if path.suffix == ".jsonl":  # a .json file may be one array: leave it to datasets
        _check_jsonl(path, field)
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # pyarrow raises many types; the user needs the file name, not the trace
        raise UserError(f"could not read {path} with datasets ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if field not in ds.column_names:
        raise UserError(f"{path} has no '{field}' column (columns: {', '.join(ds.column_names)}); set data.text_field")
    for text in ds[field]:
        if isinstance(text, str) and text:
            yield text


def iter_documents(src: Source) -> Iterator[tuple[str, str]]:
    """(doc_id, text) in a fixed order; empty documents are skipped."""
    local_text = [p for p in src.files if p.suffix in TEXT_SUFFIXES] if src.kind == "local" else []
    text_rows = iter(_read_text_files(local_text)) if local_text else iter(())  # one row per file, in src.files order
    for path in src.files:
        if src.kind == "stdlib":
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few stdlib test fixtures are deliberately not UTF-8
            if text:
                yield str(path), text
        elif path.suffix in TEXT_SUFFIXES:
            text = next(text_rows)["text"]
            if text:
                yield str(path), text
        else:
            for i, text in enumerate(_read_with_datasets(path, src.text_field)):
                yield f"{path}#{i}", text


def iter_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a .jsonl (one JSON value per line), a .json array or a .parquet file; `where`
    ("file:line", "file item i" or "file row i") is for messages. Unreadable input is a one-line UserError."""
    if path.suffix in PARQUET_SUFFIXES:
        import datasets

        datasets.disable_progress_bars()
        try:
            rows = datasets.load_dataset("parquet", data_files=str(path), split="train")
        except Exception as e:  # pyarrow raises many types (a Git LFS pointer, a truncated file)
            raise UserError(f"could not read {path} as parquet ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
        return
    if path.suffix == ".json" and _is_json_array(path):
        try:
            rows = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{path} is not valid JSON ({e}); fix it, or write one JSON object per line (.jsonl)") from None
        for i, row in enumerate(rows):
            yield f"{path} item {i}", row
        return
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UserError(f"{path}:{lineno} is not valid JSON; fix or delete that line") from None
            yield f"{path}:{lineno}", row


def _is_json_array(path: Path) -> bool:
    """A .json file holding one array (pretty-printed or not) rather than JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def utf8_text(text: str, where: str, field: str) -> str:
    """`text`, refused when it holds a lone surrogate: JSON's \\ud83d escapes allow half an emoji (cut-off scraped
    text), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{where}: '{field}' holds {text[e.start:e.end]!a}, half of a UTF-16 surrogate pair, which is no "
                        "text; fix or delete that row") from None
    return text
