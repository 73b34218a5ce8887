"""`data.format: classification`: jsonl/parquet rows {text, label}, one example per window, label ids [B].

Cache layout (as prompt_completion's): `{split}.bin` holds each example's text tokens back to back (no EOS:
the classifier reads the last text token) and `{split}.idx.npy` one row per example: (start, length, label).
The split is by a hash of the text, so duplicate texts never straddle train and val.
Windows are right-padded with the pad id (EOS) and truncated to seq_len (the text's beginning is kept).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from scaletrain.data.sampler import WindowStream
from scaletrain.data.sources import Source, is_row_file, iter_rows, utf8_text
from scaletrain.data.split import split_key
from scaletrain.errors import UserError


def _check_row(row, where: str, text_field: str) -> tuple[str, int]:
    if not isinstance(row, dict) or text_field not in row or "label" not in row:
        raise UserError(f"{where} needs fields '{text_field}' and 'label' for data.format=classification")
    text, label = row[text_field], row["label"]
    if not isinstance(text, str):
        raise UserError(f"{where}: '{text_field}' must be a string")
    if isinstance(label, bool):
        label = int(label)
    if not isinstance(label, int) or label < 0:
        raise UserError(f"{where}: 'label' must be a class id 0, 1, ... (got {label!r})")
    return utf8_text(text, where, text_field), label


def iter_labelled(src: Source) -> Iterator[tuple[str, int]]:
    """(text, label) pairs in file order."""
    for path in src.files:
        if not is_row_file(path):
            raise UserError(f"data file {path} is not .jsonl/.parquet or a saved HF dataset; data.format=classification reads text/label rows")
        for where, row in iter_rows(path):
            yield _check_row(row, where, src.text_field)


def build_classification(src: Source, tok, out: Path, dtype: str, val_fraction: float) -> dict:
    """Tokenise every example into out/{train,val}.bin + .idx.npy; returns {split: [examples, tokens]}.
    Single process: labelled sets are small next to pre-training text."""
    rows: dict[str, list] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val:
        for text, label in iter_labelled(src):
            ids = tok.encode(text)
            if ids and ids[-1] == tok.eos_id:  # an HF tokenizer may append EOS; pad id must only pad
                ids = ids[:-1]
            if not ids:
                continue
            split = "val" if split_key(text) < val_fraction else "train"
            (f_val if split == "val" else f_train).write(np.asarray(ids, dtype=dtype).data)  # (tofile's errors carry no errno)
            rows[split].append((sizes[split], len(ids), label))
            sizes[split] += len(ids)
    if not rows["train"]:
        raise UserError(f"data.source {src.files[0].parent} produced no training examples; add rows or lower data.val_fraction")
    if val_fraction > 0 and not rows["val"]:
        raise UserError("the classification set hashed no example into val; raise data.val_fraction or add rows")
    for split, r in rows.items():
        np.save(out / f"{split}.idx.npy", np.asarray(r, dtype=np.int64).reshape(-1, 3))
    return {split: [len(r), int(sum(x[1] for x in r))] for split, r in rows.items()}


class ClassificationStream(WindowStream):
    """One example per window: (inputs [B, T] right-padded with `pad_id`, labels [B]). Same shuffling and
    window-id interface as WindowStream (exact resume, rank-count independent batches)."""

    def __init__(self, tokens: np.ndarray, index: np.ndarray, seq_len: int, seed: int, pad_id: int, split: str = "train"):
        if len(index) == 0:
            raise UserError(f"the {split} split has no classification examples")
        self.tokens, self.index, self.seq_len, self.seed, self.pad_id = tokens, index, seq_len, seed, pad_id
        self.num_windows = len(index)
        self.max_label = int(index[:, 2].max())
        self._perm_epoch, self._perm = -1, None

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.full((len(window_ids), self.seq_len), self.pad_id, dtype=np.int64)
        y = np.empty(len(window_ids), dtype=np.int64)
        for row, w in enumerate(window_ids):
            start, length, label = (int(v) for v in self.index[w])
            n = min(length, self.seq_len)
            x[row, :n] = self.tokens[start : start + n]
            y[row] = label
        return torch.from_numpy(x), torch.from_numpy(y)


def file_stream(path: Path, tok, seq_len: int, text_field: str = "text", num_labels: int = 0) -> ClassificationStream:
    """A jsonl/parquet file of text/label rows as one stream (for `scaletrain eval --data`); labels are checked
    against the classifier's `num_labels` when given."""
    from scaletrain.data.sources import resolve_source

    toks, rows, at = [], [], 0
    for text, label in iter_labelled(resolve_source(str(path), text_field)):
        if num_labels and not 0 <= label < num_labels:
            raise UserError(f"{path}: label {label} is outside 0..{num_labels - 1} (the model has model.num_labels="
                            f"{num_labels}); evaluate with data labelled as the model was trained")
        ids = [i for i in tok.encode(text) if i != tok.eos_id]
        if ids:
            toks.append(np.asarray(ids, dtype=np.int64))
            rows.append((at, len(ids), label))
            at += len(ids)
    if not rows:
        raise UserError(f"{path} holds no text/label examples")
    return ClassificationStream(np.concatenate(toks), np.asarray(rows, dtype=np.int64), seq_len, 0, tok.eos_id, "eval")
