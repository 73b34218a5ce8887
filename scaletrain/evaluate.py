"""`scaletrain eval`: token-weighted loss / perplexity of a model on a file or on its run's val split.

Text is tokenised as in training (each document + EOS, packed) and cut into consecutive windows of
`seq_len` predictions (the last one shorter), so every token after the first is predicted exactly once.
prompt/completion jsonl counts completion tokens only (one example per window, as in training).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from scaletrain.errors import UserError, in_flag_words
from scaletrain.model.loss import IGNORE_INDEX


def _is_prompt_completion(src) -> bool:
    """Rows with prompt and completion (judged by the first file's first row): jsonl, json or parquet, one file or
    a dir / glob of them, as training reads data.format=prompt_completion."""
    from scaletrain.data.sources import is_row_file, iter_rows

    if not src.files or not all(is_row_file(f) for f in src.files):
        return False
    try:
        row = next((r for _, r in iter_rows(src.files[0])), None)
    except UserError:
        return False  # read as text below, which says what is wrong with it
    return isinstance(row, dict) and "prompt" in row and "completion" in row


def _text_windows(tokens: np.ndarray, seq_len: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    starts = list(range(0, max(len(tokens) - 1, 0), seq_len))
    for i in range(0, len(starts), batch):
        rows = [np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in starts[i : i + batch]]
        width = max(len(r) for r in rows) - 1
        x = torch.zeros(len(rows), width, dtype=torch.long)
        y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for j, r in enumerate(rows):
            x[j, : len(r) - 1] = torch.from_numpy(r[:-1])
            y[j, : len(r) - 1] = torch.from_numpy(r[1:])
        yield x, y


def _stream_windows(stream, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    ids = np.arange(stream.num_windows)
    for i in range(0, len(ids), batch):
        yield stream.batch(ids[i : i + batch])


def file_batches(path: Path, tok, seq_len: int, batch: int, text_field: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows of `--data`: its errors name eval's flags (the data code names training's config keys, which
    `scaletrain eval` does not take: "set data.text_field" led to "unrecognized arguments")."""
    try:
        yield from _file_batches(path, tok, seq_len, batch, text_field)
    except UserError as e:
        raise in_flag_words(e, {"data.text_field": "--text-field", "data.source": "--data"}) from None


def _file_batches(path: Path, tok, seq_len: int, batch: int, text_field: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    from scaletrain.data.sources import iter_documents, resolve_source

    src = resolve_source(str(path), text_field)
    if _is_prompt_completion(src):
        from scaletrain.data.examples import ExampleStream, iter_examples

        rows, toks = [], []
        for prompt, completion in iter_examples(src):
            p, c = tok.encode(prompt), tok.encode_plain(completion) + [tok.eos_id]
            rows.append((sum(len(t) for t in toks), len(p) + len(c), len(p)))
            toks.append(np.asarray(p + c, dtype=np.int64))
        if not rows:
            raise UserError(f"{path} holds no examples")
        stream = ExampleStream(np.concatenate(toks), np.asarray(rows, dtype=np.int64), seq_len, 0, tok.eos_id, "eval")
        if stream.fit_note():
            print(stream.fit_note(), file=sys.stderr)  # stdout may be the JSON
        yield from _stream_windows(stream, batch)
        return
    docs: list[np.ndarray] = []
    for _, text in iter_documents(src):
        doc = np.asarray(tok.encode_document(text), dtype=np.int64)  # a list, or an array (a huge document)
        docs.append(doc if len(doc) and doc[-1] == tok.eos_id else np.append(doc, tok.eos_id))
    ids = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    if len(ids) < 2:
        raise UserError(f"{path} has too little text to evaluate (needs at least 2 tokens)")
    yield from _text_windows(ids, seq_len, batch)


def training_cache(src):
    """The data cache the source was trained on (its val split, and the EOS id its documents end with)."""
    from scaletrain.data.cache import find_cache, open_cache
    from scaletrain.data.prepare import tokenizer_digest

    if src.config is None:
        raise UserError(f"{src.path} has no training config; pass --data FILE")
    if (src.lineage or {}).get("kind") == "import-hf":  # its config.yaml is a fine-tuning template, not its past
        raise UserError(f"{src.path} holds imported weights (import-hf): it has no val split of its own; pass --data FILE")
    # the cache it was trained on, by the name its lineage records: a newer scaletrain may key the same data
    # otherwise, and the sources need not be there any more
    recorded = ((src.lineage or {}).get("data") or {}).get("fingerprint")
    root = Path(src.config.data.cache_dir).expanduser()
    if isinstance(recorded, str) and recorded.replace("-", "").isalnum() and (root / recorded).is_dir():
        path = root / recorded
    else:
        path = find_cache(src.config)
    cache = open_cache(path)
    if cache is None:
        raise UserError(f"no val split for {src.path}: its training data cache is not in {src.config.data.cache_dir}; pass --data FILE")
    if src.tokenizer is not None and tokenizer_digest(src.tokenizer) != tokenizer_digest(cache.tokenizer_path):
        raise UserError(f"no val split for {src.path}: the data cache its config names ({cache.dir}) was built with "
                        "another tokenizer than the model's; pass --data FILE")
    return cache


def _val_stream(src, seq_len: int):
    stream = training_cache(src).stream("val", seq_len, src.config.train.seed, required=False)
    if stream is None:
        what = (f"fewer than {seq_len + 1} tokens" if src.config.data.format == "text"
                else f"no example that fits in {seq_len} tokens")
        raise UserError(f"{src.path}: the val split has {what}; pass --data FILE or another --seq-len")
    return stream


def val_batches(src, seq_len: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The val split of the data the source was trained on (from its config's data cache)."""
    return _stream_windows(_val_stream(src, seq_len), batch)


def val_parts(src, seq_len: int, batch: int) -> Optional[list[tuple[str, float, Iterator]]]:
    """A model trained on a data.mix: (name, weight, batches) of each source's val split, scored apart as
    training scores them (val/<name>/loss); None for one data.source."""
    if src.config is None or not src.config.data.mix:
        return None
    parts = getattr(_val_stream(src, seq_len), "parts", [])
    return [(name, weight, _stream_windows(stream, batch)) for name, weight, stream in parts]


EVAL_ROWS = 1024  # positions whose logits exist at once in `evaluate`


@torch.no_grad()
def evaluate(model, batches, doc_eos: Optional[int] = None) -> dict:
    """{"loss": mean CE over counted tokens, "ppl": exp(loss), "tokens": counted tokens}. `doc_eos`: the EOS id
    of a model trained with data.doc_mask, whose tokens then attend within their own document, as in training."""
    from scaletrain.generate import model_device
    from scaletrain.model.docmask import document_ids

    total, count, dev = 0.0, 0, model_device(model)
    for x, y in batches:
        x, y = x.to(dev), y.to(dev)
        h = model.hidden_states(x, doc_ids=None if doc_eos is None else document_ids(x, doc_eos))
        h, y = h.reshape(-1, h.shape[-1]), y.reshape(-1)
        for i in range(0, len(h), EVAL_ROWS):  # never [B*T, V] logits at once (4 x 2048 x 128k in fp32: 4 GB, twice)
            logits = model.lm_head(h[i : i + EVAL_ROWS]).float()
            total += F.cross_entropy(logits, y[i : i + EVAL_ROWS], ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
    if count == 0:
        raise UserError("nothing to evaluate: no target tokens")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def evaluate_classifier(model, batches, num_labels: int) -> dict:
    """{"accuracy", "f1" (macro), "loss" (mean CE), "examples"} of a sequence classifier on (ids, labels) batches."""
    from scaletrain.generate import model_device
    from scaletrain.train.finetune import classification_metrics, confusion_update

    conf = torch.zeros(num_labels, num_labels, dtype=torch.float64)
    total, dev = 0.0, model_device(model)
    for x, y in batches:
        logits = model(x.to(dev)).float().cpu()
        total += F.cross_entropy(logits, y, reduction="sum").item()
        confusion_update(conf, logits, y)
    n = int(conf.sum())
    if n == 0:
        raise UserError("nothing to evaluate: no labelled examples")
    return {**classification_metrics(conf), "loss": total / n, "examples": n}
