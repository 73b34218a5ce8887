"""`data.format: prompt_completion`: jsonl/parquet rows {prompt, completion}, loss on completion tokens only.

Cache layout (next to the text format's files): `{split}.bin` holds each example's tokens back to back
(prompt ids, completion ids, EOS) and `{split}.idx.npy` one row per example: (start, length, prompt_len).
That index is the loss mask in compact form: token j of an example is a loss target iff j >= prompt_len.
Training uses one example per window, padded (or truncated) to seq_len, so examples never see each
other and the padding is never a target.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from scaletrain.data.sampler import WindowStream, seq_len_name
from scaletrain.data.sources import Source, is_row_file, iter_rows, utf8_text
from scaletrain.data.split import split_key
from scaletrain.data.worker_pool import worker_pool
from scaletrain.errors import UserError

FIELDS = ("prompt", "completion")
IGNORE_INDEX = -100  # same as the model's loss (kept here so the data package does not import the model)


def _check_row(row, where: str) -> tuple[str, str]:
    if not isinstance(row, dict) or any(f not in row for f in FIELDS):
        raise UserError(f"{where} needs string fields 'prompt' and 'completion' for data.format=prompt_completion")
    if not all(isinstance(row[f], str) for f in FIELDS):
        raise UserError(f"{where}: 'prompt' and 'completion' must be strings")
    return utf8_text(row["prompt"], where, "prompt"), utf8_text(row["completion"], where, "completion")


def iter_examples(src: Source) -> Iterator[tuple[str, str]]:
    """(prompt, completion) pairs in file order."""
    for path in src.files:
        if not is_row_file(path):
            raise UserError(f"data file {path} is not .jsonl/.parquet or a saved HF dataset; data.format=prompt_completion reads prompt/completion rows")
        for where, row in iter_rows(path):
            yield _check_row(row, where)


_tok = None


def _init(tok_path: str) -> None:
    global _tok
    from scaletrain.data.tokenizer import load_tokenizer

    _tok = load_tokenizer(tok_path)


def _encode(pair: tuple[str, str]) -> tuple[np.ndarray, int, float]:
    prompt, completion = pair
    p = _tok.encode(prompt)
    c = _tok.encode_plain(completion) + [_tok.eos_id]
    return np.asarray(p + c, dtype=np.uint32), len(p), split_key(prompt + "\0" + completion)


def build_examples(src: Source, tok_path: Path, out: Path, dtype: str, val_fraction: float, workers: int, progress: bool) -> dict:
    """Tokenise every example into out/{train,val}.bin + .idx.npy; returns {split: [examples, tokens]}."""
    rows: dict[str, list] = {"train": [], "val": []}
    sizes = {"train": 0, "val": 0}
    nearest = (2.0, -1)  # (split key, row) of the train example closest to the val side
    bar = tqdm(desc="tokenize", unit="example", disable=None if progress else True)
    with open(out / "train.bin", "wb") as f_train, open(out / "val.bin", "wb") as f_val:
        with worker_pool(workers, _init, (str(tok_path),)) as pool:
            for ids, prompt_len, key in pool.imap(_encode, iter_examples(src), chunksize=16):
                split = "val" if key < val_fraction else "train"
                if split == "train" and key < nearest[0]:
                    nearest = (key, len(rows["train"]))
                (f_val if split == "val" else f_train).write(ids.astype(dtype).data)  # (tofile's errors carry no errno)
                rows[split].append((sizes[split], len(ids), prompt_len))
                sizes[split] += len(ids)
                bar.update(1)
    bar.close()
    if val_fraction > 0 and not rows["val"] and len(rows["train"]) > 1:
        # a small set may hash nothing into val: move the nearest example (its tokens stay unused in train.bin)
        start, length, plen = rows["train"].pop(nearest[1])
        (out / "val.bin").write_bytes(np.fromfile(out / "train.bin", dtype=dtype, count=length,
                                                  offset=start * np.dtype(dtype).itemsize).tobytes())
        rows["val"].append((0, length, plen))
    if not rows["train"]:
        raise UserError(f"data.source {src.files[0].parent} produced no training examples; add rows or lower data.val_fraction")
    for split, r in rows.items():
        np.save(out / f"{split}.idx.npy", np.asarray(r, dtype=np.int64).reshape(-1, 3))
    return {split: [len(r), int(sum(x[1] for x in r))] for split, r in rows.items()}


class ExampleStream(WindowStream):
    """One example per window: inputs padded with `pad_id`, targets IGNORE_INDEX on prompt and padding.
    Same shuffling / window-id interface as WindowStream (exact resume and rank-count independence)."""

    def __init__(self, tokens: np.ndarray, index: np.ndarray, seq_len: int, seed: int, pad_id: int, split: str = "train"):
        usable = self.usable(index, seq_len)
        self.index = index[usable]
        self.dropped = int((~usable).sum())
        self.truncated = int((index[usable, 1] > seq_len + 1).sum())
        self.split, self.total = split, len(index)
        if len(self.index) == 0:
            raise UserError(f"the {split} split has no example whose completion starts within {seq_len_name(split)}={seq_len} tokens; raise {seq_len_name(split)}")
        self.tokens, self.seq_len, self.seed, self.pad_id = tokens, seq_len, seed, pad_id
        self.num_windows = len(self.index)
        self._perm_epoch, self._perm = -1, None

    def fit_note(self) -> str | None:
        """A line for the log when examples do not fit the window: skipped (the prompt fills it) or cut short."""
        if not (self.dropped or self.truncated):
            return None
        name = seq_len_name(self.split)
        return (f"note: {self.split} split: {self.dropped} of {self.total} examples skipped (the prompt fills {name}="
                f"{self.seq_len}), {self.truncated} cut short (completion past the window); raise {name} to keep them")

    @staticmethod
    def usable(index: np.ndarray, seq_len: int) -> np.ndarray:
        """Which examples have a target within the window: one whose prompt fills it would make a NaN loss."""
        return index[:, 2] < np.minimum(index[:, 1], seq_len + 1)

    def batch(self, window_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.seq_len
        x = np.full((len(window_ids), t), self.pad_id, dtype=np.int64)
        y = np.full((len(window_ids), t), IGNORE_INDEX, dtype=np.int64)
        for row, w in enumerate(window_ids):
            start, length, prompt_len = self.index[w]
            n = min(int(length), t + 1)
            ids = np.asarray(self.tokens[start : start + n], dtype=np.int64)
            x[row, : n - 1] = ids[:-1]
            target = ids[1:].copy()
            target[: max(int(prompt_len) - 1, 0)] = IGNORE_INDEX  # position j predicts token j+1
            y[row, : n - 1] = target
        return torch.from_numpy(x), torch.from_numpy(y)
