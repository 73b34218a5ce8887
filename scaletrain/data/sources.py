"""Where documents come from: the embedded stdlib corpus, local text/jsonl/parquet files, or a dataset saved
with `datasets`' save_to_disk.

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
from collections import Counter
from dataclasses import dataclass, field
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
    skipped: tuple[Path, ...] = field(default=(), compare=False)  # a directory's files of other types

    def skipped_note(self) -> str | None:
        """A line for the log when a directory source held files that are not read (.csv, .gz, ...)."""
        if not self.skipped:
            return None
        kinds = Counter(p.suffix or p.name for p in self.skipped)
        listed = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))[:5])
        return (f"note: data.source: {len(self.skipped)} file(s) of other types not read ({listed}); convert them to "
                ".txt/.jsonl/.parquet to include them")

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{self.kind}:{self.text_field}".encode())
        for f in self.files:  # a saved HF dataset is a directory: its files count
            for g in sorted(q for q in f.rglob("*") if q.is_file()) if f.is_dir() else [f]:
                st = g.stat()
                h.update(f"{g}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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
    if is_saved_dataset(p):
        return Source((p,), "local", text_field)
    skipped: list[Path] = []
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file())
        matches = [q for q in files if q.suffix in SUPPORTED]
        skipped = [q for q in files if q.suffix not in SUPPORTED  # not .DS_Store, .git/objects/..., .cache/...
                   and not any(part.startswith(".") for part in q.relative_to(p).parts)]
    elif p.is_file():  # a name with [ or * in it is that file, not a pattern
        matches = [p]
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
    return Source(tuple(matches), "local", text_field, tuple(skipped))


def _read_text_file(path: Path) -> str:
    """A text file as one document, newlines made universal ("\r\n" and "\r" become "\n", as text mode reads
    them). Read directly, not through datasets, which would keep an Arrow copy of every file in its cache."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read data file {path} ({e.strerror or e}); fix its permissions or remove it") from None
    if b"\0" in raw:
        raise UserError(f"data file {path} looks binary (NUL bytes); remove it from data.source")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 (byte {e.start}); convert it with iconv or remove it") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _field_texts(path: Path, field: str) -> Iterator[str]:
    """The `field` of every row of a .jsonl / .json / .parquet file, checked row by row (a bad row gets its line
    number; other fields are never parsed into a table, so their types may change from row to row)."""
    if is_saved_dataset(path):
        rows = _saved_dataset_rows(path, [field])
    else:
        rows = _parquet_rows(path, [field]) if path.suffix in PARQUET_SUFFIXES else iter_rows(path)
    for where, row in rows:
        if not isinstance(row, dict) or field not in row:
            raise UserError(f"{where} has no '{field}' field; set data.text_field to the field holding the text")
        text = row[field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise UserError(f"{where} field '{field}' is not a string")
        if text:
            yield utf8_text(text, where, field)


def is_saved_dataset(path: Path) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return path.is_dir() and ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file())


def is_row_file(path: Path) -> bool:
    """A source of rows (prompt/completion, text/label): .jsonl/.json/.parquet or a saved HF dataset."""
    return path.suffix in JSON_SUFFIXES | PARQUET_SUFFIXES or is_saved_dataset(path)


def _saved_dataset_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) of a save_to_disk directory, read in place (memory-mapped Arrow files); of a DatasetDict,
    the 'train' split (scaletrain draws its own validation split)."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError, pyarrow errors...
        raise UserError(f"could not read {path} with datasets.load_from_disk ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path} is a DatasetDict without a 'train' split (splits: {', '.join(ds)}); point data.source at "
                            "the split's own directory")
        path, ds = path / "train", ds["train"]
    ds = ds.with_format(None)  # saved after set_format("numpy"/"torch"): rows of Python values, as files give
    _require_columns(path, ds.column_names, columns)
    i = 0
    for batch in (ds.select_columns(columns) if columns else ds).iter(batch_size=256):
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            yield f"{path} row {i}", row
            i += 1


def iter_documents(src: Source) -> Iterator[tuple[str, str]]:
    """(doc_id, text) in a fixed order; empty documents are skipped."""
    for path in src.files:
        if src.kind == "stdlib":
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue  # a few stdlib test fixtures are deliberately not UTF-8
            if text:
                yield str(path), text
        elif path.suffix in TEXT_SUFFIXES:
            text = _read_text_file(path)
            if text:
                yield str(path), text
        else:
            for i, text in enumerate(_field_texts(path, src.text_field)):
                yield f"{path}#{i}", text


def _require_columns(path: Path, names: list[str], columns: list[str] | None) -> None:
    missing = [c for c in columns or [] if c not in names]
    if missing:
        raise UserError(f"{path} has no '{missing[0]}' column (columns: {', '.join(names)}); set data.text_field")


def _parquet_rows(path: Path, columns: list[str] | None = None) -> Iterator[tuple[str, dict]]:
    """(where, row) of a parquet file, a batch at a time (pyarrow, memory-mapped: no copy in any cache)."""
    import pyarrow.parquet as pq

    def unreadable(e: Exception) -> UserError:  # pyarrow raises many types (a Git LFS pointer, a truncated file)
        return UserError(f"could not read {path} as parquet ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''})")

    try:
        pf = pq.ParquetFile(path, memory_map=True)
    except Exception as e:  # noqa: BLE001
        raise unreadable(e) from None
    _require_columns(path, pf.schema_arrow.names, columns)
    i = 0
    try:
        for batch in pf.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                yield f"{path} row {i}", row
                i += 1
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001
        raise unreadable(e) from None


def iter_rows(path: Path) -> Iterator[tuple[str, object]]:
    """(where, row) for each row of a .jsonl (one JSON value per line), a .json array or a .parquet file; `where`
    ("file:line", "file item i" or "file row i") is for messages. Unreadable input is a one-line UserError."""
    try:
        yield from _rows(path)
    except OSError as e:  # EIO, EACCES (a file chmod 000 for anyone but root)
        raise UserError(f"cannot read data file {path} ({e.strerror or e}); fix its permissions or remove it") from None
    except RecursionError:  # JSON nested thousands deep
        raise UserError(f"{path} nests JSON too deeply to read; it is not a data file of rows") from None


def _rows(path: Path) -> Iterator[tuple[str, object]]:
    if is_saved_dataset(path):
        yield from _saved_dataset_rows(path)
        return
    if path.suffix in PARQUET_SUFFIXES:
        yield from _parquet_rows(path)
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
