"""Tokenise a source once into a fingerprinted cache: tokenizer.model, train.bin, val.bin, meta.json.

The cache directory name is a hash of everything that determines its content (source files and their
sizes/mtimes, tokenizer settings, split). A matching cache is reused; a different one gets a different
directory, so nothing is ever silently overwritten. Building happens in a temp dir renamed at the end.
"""

from __future__ import annotations

import hashlib
import heapq
import json

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from tqdm import tqdm

from scaletrain.config import Config
from scaletrain.data.hf_tokenizer import copy_tokenizer_dir, tokenizer_files
from scaletrain.data.sampler import WindowStream
from scaletrain.data.sources import Source, iter_documents, resolve_source
from scaletrain.data.split import split_key
from scaletrain.data.tokenizer import Tokenizer, load_tokenizer, train_tokenizer
from scaletrain.data.worker_pool import worker_pool
from scaletrain.durable import abandoned_temps, missing_levels, publish_dir, remove_levels, temp_dir_beside
from scaletrain.errors import UserError

CACHE_FORMAT = 2


@dataclass
class DataCache:
    dir: Path
    meta: dict

    @property
    def tokenizer_path(self) -> Path:
        """tokenizer.model (sentencepiece), or tokenizer/ when data.tokenizer is an HF tokenizer dir."""
        hf = self.dir / "tokenizer"
        return hf if hf.is_dir() else self.dir / "tokenizer.model"

    def tokenizer(self):
        return load_tokenizer(self.tokenizer_path)

    def stream(self, split: str, seq_len: int, seed: int, required: bool = True):
        """The split's window stream (text: packed windows; prompt_completion: one example per window);
        None for an optional split too small for one window."""
        tokens = self.tokens(split)
        if self.meta.get("data_format") == "classification":
            from scaletrain.data.classification import ClassificationStream

            index = np.load(self.dir / f"{split}.idx.npy")
            if not required and len(index) == 0:
                return None
            return ClassificationStream(tokens, index, seq_len, seed, self.meta["eos_id"], split)
        if self.meta.get("data_format") == "prompt_completion":
            from scaletrain.data.examples import ExampleStream

            index = np.load(self.dir / f"{split}.idx.npy")
            if not required and not ExampleStream.usable(index, seq_len).any():  # none, or none that fits
                return None
            return ExampleStream(tokens, index, seq_len, seed, self.meta["eos_id"], split)
        if not required and len(tokens) <= seq_len:
            return None
        return WindowStream(tokens, seq_len, seed, split)

    def tokens(self, split: str) -> np.memmap:
        path = self.dir / f"{split}.bin"
        if path.stat().st_size == 0:
            return np.zeros(0, dtype=self.meta["dtype"])
        return np.memmap(path, dtype=self.meta["dtype"], mode="r")


TOKENIZER_SAMPLE_SEED = 1234


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size < 2**16 else "uint32"


def tokenizer_key(tokenizer: Optional[str]) -> Optional[str]:
    """What data.tokenizer contributes to a cache's name: a hash of its tokenizer files' names and bytes (a model
    dir's weights are not the tokenizer); None when unset (a tokenizer is trained)."""
    if not tokenizer:
        return None
    p = Path(os.path.expanduser(tokenizer))
    if not p.exists():
        raise UserError(f"data.tokenizer {p} does not exist; give a sentencepiece .model file, an HF tokenizer directory, or leave it unset to train one")
    files = sorted(tokenizer_files(p))
    return hashlib.sha256(b"".join(q.name.encode() + hashlib.sha256(q.read_bytes()).digest() for q in files)).hexdigest()


def cache_fingerprint(cfg: Config, src: Source) -> str:
    d = cfg.data
    tok = tokenizer_key(d.tokenizer)
    key = {
        "format": CACHE_FORMAT, "source": src.fingerprint(), "vocab_size": cfg.model.vocab_size,
        "tokenizer": tok, "val_fraction": d.val_fraction, "sample_lines": d.tokenizer_sample_lines,
    }
    if d.format != "text":  # only then: existing text caches keep their fingerprint
        key["data_format"] = d.format
    elif tok is not None and Path(os.path.expanduser(d.tokenizer)).is_dir():
        # HF tokenizers: special-token strings in documents are text since 2026-12-07 (encode_document); caches
        # made before read them as control ids, so they are rebuilt once rather than reused
        key["special_tokens_in_text"] = "text"
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def find_cache(cfg: Config) -> tuple[Path, Source]:
    """The cache dir one data.source tokenises into, and the source (a data.mix: scaletrain/data/cache.py)."""
    src = resolve_source(cfg.data.source, cfg.data.text_field)
    root = Path(os.path.expanduser(cfg.data.cache_dir))
    return root / cache_fingerprint(cfg, src), src


def read_meta(path: Path) -> Optional[dict]:
    """A cache dir's meta.json, checked against the dir's name and its tokenizer; None when there is none."""
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        dict(meta["tokens"]), np.dtype(meta["dtype"])
    except (ValueError, KeyError, TypeError):
        raise UserError(f"data cache {path} has a damaged meta.json; delete that directory to rebuild it") from None
    if meta.get("fingerprint") != path.name:
        raise UserError(f"data cache {path} holds fingerprint {meta.get('fingerprint')}, not {path.name}; delete that directory")
    tokenizer = DataCache(path, meta).tokenizer_path
    want = meta.get("tokenizer_sha256")  # caches built before 2026-12-07 have none
    if want is not None and tokenizer_digest(tokenizer) != want:  # trained on, then copied into runs
        raise UserError(f"data cache {path} is damaged: {tokenizer.name} is not the tokenizer it was built "
                        "with; delete that directory to rebuild it")
    return meta


def open_cache(path: Path, meta: Optional[dict] = None) -> Optional[DataCache]:
    """One source's cache (a data.mix's: scaletrain/data/cache.py), its token files checked against meta.json
    (`meta`: what `read_meta(path)` gave already)."""
    meta = meta if meta is not None else read_meta(path)
    if meta is None:
        return None
    if "mixture" in meta:
        raise UserError(f"data cache {path} is a data.mix's, not one source's; open it through scaletrain.data.cache")
    dtype = np.dtype(meta["dtype"])
    for split, tokens in dict(meta["tokens"]).items():  # a file cut short (disk full, a crash before it reached the disk)
        f = path / f"{split}.bin"
        size = f.stat().st_size if f.is_file() else -1
        if size < int(tokens) * dtype.itemsize:
            raise UserError(f"data cache {path} is damaged: {f.name} holds {max(size, 0):,} bytes, meta.json counts "
                            f"{int(tokens):,} tokens; delete that directory to rebuild it")
    return DataCache(path, meta)


def tokenizer_digest(path: Path) -> Optional[str]:
    """sha256 over the tokenizer's files (names and bytes); None when one cannot be read."""
    h = hashlib.sha256()
    try:
        for f in tokenizer_files(path):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    except OSError:
        return None
    return h.hexdigest()


# -- tokenisation workers ------------------------------------------------------------------------
_worker_tok: Optional[Tokenizer] = None


def _init_worker(model_path: str) -> None:
    global _worker_tok
    _worker_tok = load_tokenizer(model_path)


def _encode(text: str) -> tuple[np.ndarray, float]:
    ids = np.asarray(_worker_tok.encode_document(text), dtype=np.uint32)
    if not len(ids) or ids[-1] != _worker_tok.eos_id:  # an HF tokenizer may add EOS itself
        ids = np.append(ids, np.uint32(_worker_tok.eos_id))  # documents are separated by EOS in the packed stream
    return ids, split_key(text)


def sweep_abandoned(final: Path) -> None:
    for dead in abandoned_temps(final):  # (killed builds on this host, quiet for an hour: never live work)
        shutil.rmtree(dead, ignore_errors=True)


def prepare_data(cfg: Config, progress: bool = True) -> DataCache:
    """Build (or reuse) the token cache of one data.source for `cfg.model.vocab_size` (a data.mix's:
    scaletrain/data/cache.py)."""
    final, src = find_cache(cfg)
    return open_or_build(final, open_cache, lambda tmp: _build(cfg, src, tmp, progress))


def open_or_build(final: Path, open_dir: Callable[[Path, dict], DataCache], build: Callable[[Path], dict]) -> DataCache:
    """The cache in `final` (`open_dir(final, meta)`), built first when missing: `build(tmp)` fills a temp dir of
    this build's own beside `final` (another job building the same cache has another) and returns its meta; the
    dir is renamed into place once on disk. Another process that finished the same cache first wins; a failed
    build leaves nothing behind, nor the parent levels it made."""
    meta = read_meta(final)
    if meta is not None:  # a build of it killed midway (a preempted job that rebuilt it on its restart)
        sweep_abandoned(final)  # left up to a corpus of tokens beside it: swept whenever the cache is used
        return open_dir(final, meta)
    if final.exists():  # a cache appears only by renaming a finished build, meta.json included
        raise UserError(f"data cache {final} has no meta.json (damaged, or not ours); delete that directory to rebuild it")
    if final.parent.exists() and not final.parent.is_dir():
        raise UserError(f"data.cache_dir {final.parent} is a file; set data.cache_dir to a directory")
    made = missing_levels(final.parent)  # removed again (while empty) if this build fails
    final.parent.mkdir(parents=True, exist_ok=True)
    sweep_abandoned(final)
    tmp = temp_dir_beside(final)
    try:
        meta = build(tmp)
        meta["fingerprint"] = final.name
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:  # on disk before it counts: a power cut must not leave a short cache that looks complete
            publish_dir(tmp, final)
        except OSError:  # another process finished the same cache first: keep theirs
            if read_meta(final) is None:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_levels(made)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return open_dir(final, read_meta(final))


VAL_CANDIDATES = 64  # train documents nearest the val side, kept while tokenising in case val stays empty


def _pick_for_val(candidates: list[tuple[float, int, int]], train_tokens: int, val_fraction: float) -> list[tuple[int, int]]:
    """A small corpus may hash no document into val. Of the train documents nearest the threshold (key, offset,
    length), the nearest one that, with its exact duplicates (same key), is no larger than max(val_fraction, 10 %)
    of the train tokens goes there with them (else the smallest such group), so validation never takes the bulk of
    the corpus nor tests text that train holds. Deterministic: the same choice on every machine."""
    groups: dict[float, list[tuple[float, int, int]]] = {}
    for c in sorted(candidates):  # exact copies share a key
        groups.setdefault(c[0], []).append(c)
    budget = max(val_fraction, 0.1) * train_tokens
    size = lambda group: sum(c[2] for c in group)  # noqa: E731
    chosen = next((g for g in groups.values() if size(g) <= budget), min(groups.values(), key=lambda g: (size(g), g[0][0])))
    if size(chosen) >= train_tokens:  # every train document is a copy of it: keep one for training
        chosen = chosen[:-1]
    return sorted((c[1], c[2]) for c in chosen)


def _move_to_val(out: Path, dtype: str, segments: list[tuple[int, int]], counts: dict) -> None:
    """Move the (offset, length) token ranges of train.bin to val.bin, streaming (train.bin may be large)."""
    train = np.memmap(out / "train.bin", dtype=dtype, mode="r") if counts["train"][1] else np.zeros(0, dtype)
    with open(out / "val.bin", "wb") as f_val:
        for offset, length in segments:
            f_val.write(train[offset : offset + length].data)  # (not tofile: its errors carry no errno)
    keep, pos = [], 0
    for offset, length in segments:
        keep.append((pos, offset))
        pos = offset + length
    keep.append((pos, len(train)))
    with open(out / "train.bin.new", "wb") as f_train:
        for a, b in keep:
            for i in range(a, b, 1 << 24):  # 16M tokens a write
                f_train.write(train[i : min(b, i + (1 << 24))].data)
    del train
    os.replace(out / "train.bin.new", out / "train.bin")
    moved = sum(length for _, length in segments)
    counts["val"] = [len(segments), moved]
    counts["train"] = [counts["train"][0] - len(segments), counts["train"][1] - moved]


def _build(cfg: Config, src: Source, out: Path, progress: bool) -> dict:
    t0 = time.time()
    note = src.skipped_note()
    if note:  # said once, when the cache is built
        print(note, flush=True)
    vocab = cfg.model.vocab_size
    tok_path = out / "tokenizer.model"
    if cfg.data.tokenizer and Path(os.path.expanduser(cfg.data.tokenizer)).is_dir():  # an HF tokenizer, kept as is
        load_tokenizer(os.path.expanduser(cfg.data.tokenizer))  # a bad dir's error names it, not our temp copy
        tok_path = out / "tokenizer"
        copy_tokenizer_dir(Path(os.path.expanduser(cfg.data.tokenizer)), tok_path)
    elif cfg.data.tokenizer:
        Tokenizer(os.path.expanduser(cfg.data.tokenizer))  # a bad file's error names it, not our temp copy
        shutil.copyfile(os.path.expanduser(cfg.data.tokenizer), tok_path)
    elif cfg.data.format != "text":  # examples are not running text to learn a vocabulary from
        raise UserError(f"data.format={cfg.data.format} needs a tokenizer: set data.tokenizer (a sentencepiece .model "
                        "or an HF tokenizer dir) or init.from a model that has one")
    else:
        docs = (text for _, text in tqdm(iter_documents(src), desc="tokenizer sample", unit="doc", disable=None if progress else True, total=len(src.files) if src.kind == "stdlib" else None))
        # A fixed seed: the cache key does not hold train.seed, so the sample must not depend on it (1234 = its default)
        train_tokenizer(docs, vocab, tok_path, cfg.data.tokenizer_sample_lines, seed=TOKENIZER_SAMPLE_SEED)
    tok = load_tokenizer(tok_path)
    if tok.vocab_size > vocab:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but model.vocab_size is {vocab}; raise model.vocab_size")
    dtype = token_dtype(vocab)
    counts = {"train": [0, 0], "val": [0, 0]}  # [docs, tokens]
    workers = cfg.data.num_workers or max(1, min(8, os.cpu_count() or 1))
    if cfg.data.format == "classification":
        from scaletrain.data.classification import build_classification

        counts = build_classification(src, tok, out, dtype, cfg.data.val_fraction)
    elif cfg.data.format == "prompt_completion":
        from scaletrain.data.examples import build_examples

        counts = build_examples(src, tok_path, out, dtype, cfg.data.val_fraction, workers, progress)
    else:
        with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val:
            texts = (text for _, text in iter_documents(src))
            bar = tqdm(desc="tokenize", unit="doc", disable=None if progress else True)
            nearest_val: list[tuple[float, int, int]] = []  # heap of (-key, offset, length): train docs nearest val
            with worker_pool(workers, _init_worker, (str(tok_path),)) as pool:
                for ids, key in pool.imap(_encode, texts, chunksize=16):
                    val = key < cfg.data.val_fraction
                    split = "val" if val else "train"
                    if not val:
                        entry = (-key, counts["train"][1], len(ids))
                        (heapq.heappush if len(nearest_val) < VAL_CANDIDATES else heapq.heappushpop)(nearest_val, entry)
                    (f_val if val else f_train).write(ids.astype(dtype).data)  # (tofile's errors carry no errno)
                    counts[split][0] += 1
                    counts[split][1] += len(ids)
                    bar.update(1)
            bar.close()
        if cfg.data.val_fraction > 0 and counts["val"][0] == 0 and counts["train"][0] > 1:
            picked = _pick_for_val([(-k, o, n) for k, o, n in nearest_val], counts["train"][1], cfg.data.val_fraction)
            _move_to_val(out, dtype, picked, counts)
    if counts["train"][1] == 0:
        raise UserError(f"data.source {cfg.data.source} produced no training tokens; add documents or lower data.val_fraction")
    return {
        "source": cfg.data.source, "source_fingerprint": src.fingerprint(), "vocab_size": vocab,
        "tokenizer_vocab": tok.vocab_size, "eos_id": tok.eos_id, "dtype": dtype,
        "docs": {k: v[0] for k, v in counts.items()}, "tokens": {k: v[1] for k, v in counts.items()},
        "val_fraction": cfg.data.val_fraction, "seconds": round(time.time() - t0, 1), "format": CACHE_FORMAT,
        "data_format": cfg.data.format, "tokenizer_sha256": tokenizer_digest(tok_path),
    }
