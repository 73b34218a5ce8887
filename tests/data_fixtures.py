"""The data tests' shared corpus, cache and helpers (tests/test_data.py, tests/test_tokenizer.py): 30 real stdlib
modules as .txt files and the cache prepared from them."""

from __future__ import annotations

import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from scaletrain.config import load_config
from scaletrain.data.prepare import prepare_data
from scaletrain.data.sources import iter_documents, resolve_source

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TOP_LEVEL = sorted(STDLIB.glob("*.py"))
VOCAB = 512
VAL = 0.2


def cfg_for(source, cache_dir, *extra: str):
    return load_config(None, [f"data.source={source}", f"data.cache_dir={cache_dir}", f"model.vocab_size={VOCAB}",
                              f"data.val_fraction={VAL}", "data.num_workers=2", *extra])


def copy_corpus(dest: Path, files: list[Path], name=lambda i, p: p.stem + ".txt") -> Path:
    dest.mkdir(parents=True)
    for i, p in enumerate(files):
        shutil.copyfile(p, dest / name(i, p))
    return dest


def docs_of(source) -> list[str]:
    return [text for _, text in iter_documents(resolve_source(str(source)))]


def split_stream(tokens: np.ndarray, eos: int) -> list[list[int]]:
    """The packed stream cut at EOS; every document must end with one."""
    ids = np.asarray(tokens, dtype=np.int64).tolist()
    assert not ids or ids[-1] == eos, "stream does not end with EOS"
    out, cur = [], []
    for t in ids:
        if t == eos:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return out


def decoded_docs(cache, split: str) -> list[str]:
    tok = cache.tokenizer()
    return [tok.decode(piece) for piece in split_stream(cache.tokens(split), tok.eos_id)]


def file_state(d: Path) -> dict:
    return {str(p.relative_to(d)): (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes()) for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """30 real stdlib modules as .txt files."""
    return copy_corpus(tmp_path_factory.mktemp("corpus") / "c", TOP_LEVEL[:30])


@pytest.fixture(scope="module")
def cache(corpus, data_cache_dir):
    return prepare_data(cfg_for(corpus, data_cache_dir), progress=False)
