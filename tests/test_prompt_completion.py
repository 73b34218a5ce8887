"""data.format=prompt_completion: one example per window, loss only on completion tokens (+ EOS), padding and
prompts never targets, examples never share a window; and the cache round trip through prepare_data."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scaletrain.config import load_config
from scaletrain.data.examples import IGNORE_INDEX, ExampleStream
from scaletrain.errors import UserError


def test_example_windows_mask_prompt_and_padding():
    # example 0: prompt [10, 11], completion [12, 13, 2]; example 1: prompt [20], completion [21, 2]
    tokens = np.array([10, 11, 12, 13, 2, 20, 21, 2], dtype=np.uint16)
    index = np.array([[0, 5, 2], [5, 3, 1]], dtype=np.int64)
    s = ExampleStream(tokens, index, seq_len=6, seed=0, pad_id=2)
    x, y = s.batch(np.array([0, 1]))
    assert x.tolist() == [[10, 11, 12, 13, 2, 2], [20, 21, 2, 2, 2, 2]]
    M = IGNORE_INDEX
    assert y.tolist() == [[M, 12, 13, 2, M, M], [21, 2, M, M, M, M]]


def test_truncation_and_examples_without_targets():
    tokens = np.array([1, 1, 1, 1, 1, 7, 8, 2, 30, 31, 2], dtype=np.uint16)
    index = np.array([[0, 8, 5], [8, 3, 1]], dtype=np.int64)  # example 0: prompt of 5, window of 4 -> no target
    s = ExampleStream(tokens, index, seq_len=3, seed=0, pad_id=2)
    assert s.num_windows == 1 and s.dropped == 1
    # said in the log (training and eval): skipped and cut-short examples were counted but never reported
    assert s.fit_note() == ("note: train split: 1 of 2 examples skipped (the prompt fills train.seq_len=3), 0 cut short "
                            "(completion past the window); raise train.seq_len to keep them")
    assert ExampleStream(tokens, index, seq_len=1, seed=0, pad_id=2).truncated == 1
    assert ExampleStream(tokens, index[1:], seq_len=8, seed=0, pad_id=2).fit_note() is None
    x, y = s.batch(np.array([0]))
    assert x.tolist() == [[30, 31, 2]] and y.tolist() == [[31, 2, IGNORE_INDEX]]
    with pytest.raises(UserError, match="raise train.seq_len"):
        ExampleStream(tokens, index[:1], seq_len=3, seed=0, pad_id=2)
    # `scaletrain eval` reads its windows with --seq-len: the message names the flag the user passed
    with pytest.raises(UserError, match="raise --seq-len"):
        ExampleStream(tokens, index[:1], seq_len=3, seed=0, pad_id=2, split="eval")


def test_prepare_prompt_completion_cache(tmp_path):
    from scaletrain.data.prepare import prepare_data

    rows = [{"prompt": f"Q{i}: what is {i} + {i}?\n", "completion": f"A: {2 * i}\n"} for i in range(60)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a tokenizer trained on the same rows (as text) keeps this test self-contained
    (tmp_path / "t.txt").write_text("".join(r["prompt"] + r["completion"] for r in rows) * 20)
    tok_cfg = load_config(None, [f"data.source={tmp_path / 't.txt'}", f"data.cache_dir={tmp_path / 'c'}", "model.vocab_size=290",
                                 "data.num_workers=1"])
    tok_path = prepare_data(tok_cfg, progress=False).tokenizer_path
    cfg = load_config(None, [f"data.source={tmp_path / 'd.jsonl'}", "data.format=prompt_completion", f"data.cache_dir={tmp_path / 'c'}",
                             f"data.tokenizer={tok_path}", "model.vocab_size=290", "data.num_workers=1", "data.val_fraction=0.1"])
    cache = prepare_data(cfg, progress=False)
    tok = cache.tokenizer()
    assert cache.meta["data_format"] == "prompt_completion"
    assert cache.meta["docs"]["train"] + cache.meta["docs"]["val"] == 60 and cache.meta["docs"]["val"] >= 1
    stream = cache.stream("train", 32, 0)
    x, y = stream.batch(np.arange(stream.num_windows))
    by_prompt = {r["prompt"]: r["completion"] for r in rows}
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        text = tok.decode([t for t in row_x if t != tok.eos_id])
        prompt = text[: text.index("\n") + 1]
        assert by_prompt[prompt] in text  # exactly one example in the window
        targets = [t for t in row_y if t != IGNORE_INDEX]
        assert targets[-1] == tok.eos_id and tok.decode(targets[:-1]) == by_prompt[prompt]  # completion only
    assert cache.stream("val", 32, 0, required=False).num_windows == cache.meta["docs"]["val"]
    # windows shorter than every prompt: the optional val split is left out (no validation), train is an error
    assert cache.stream("val", 3, 0, required=False) is None
    with pytest.raises(UserError, match="raise train.seq_len"):
        cache.stream("train", 3, 0)


@pytest.mark.slow
def test_how_the_batch_is_split_does_not_change_the_step(tmp_path, data_cache_dir):
    """Windows count different numbers of completion tokens. Weighted per token, one micro-batch of 2 windows and
    two micro-batches of 1 (grad_accum 2) take the same steps: same logged loss, the per-token mean (a mean of
    per-micro-batch means would differ at the first step already)."""
    import sysconfig
    from pathlib import Path

    from launch_utils import TINY, run_training, tb_scalars

    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:60]
    data = tmp_path / "pc.jsonl"
    with open(data, "w") as f:
        for i, p in enumerate(stdlib):  # completions of 8 to 150 characters: a few to ~40 tokens
            f.write(json.dumps({"prompt": f"# {p.stem}\n", "completion": p.read_text(errors="replace")[: 8 + (i * 37) % 143]}) + "\n")
    from launch_utils import small_corpus

    from scaletrain.data.prepare import prepare_data

    text = prepare_data(load_config("configs/tiny.yaml", [*TINY, f"data.source={small_corpus(tmp_path / 'corpus')}",
                                                          f"data.cache_dir={data_cache_dir}"]), progress=False)
    common = [*TINY, f"data.source={data}", "data.format=prompt_completion", f"data.cache_dir={data_cache_dir}",
              f"data.tokenizer={text.tokenizer_path}", "train.precision=fp32", "zero.stage=0", "train.max_steps=3",
              "train.save_every=0"]
    losses = []
    for name, mbs, accum in (("whole", 2, 1), ("split", 1, 2)):
        run_training(1, [*common, f"run.dir={tmp_path / name}", f"train.micro_batch_size={mbs}", f"train.grad_accum={accum}"])
        losses.append(tb_scalars(tmp_path / name, "train/loss"))
    whole, split = losses
    assert sorted(whole) == sorted(split) == [1, 2, 3]
    for step in whole:
        assert abs(whole[step] - split[step]) <= 1e-5 * abs(whole[step]), (step, whole, split)


class _ByteTok:
    eos_id = 2

    def encode(self, text):
        return [3 + b for b in text.encode()]

    encode_plain = encode


@pytest.mark.parametrize("layout", ["one file", "dir of jsonl", "parquet"])
def test_eval_data_scores_completions_in_every_layout_training_reads(tmp_path, layout):
    """`eval --data` took prompt/completion rows for plain text unless they were one .jsonl/.json file: a dir of
    them or a parquet file failed ("no 'text' field"), and --text-field prompt scored the prompts."""
    import json

    from scaletrain.evaluate import file_batches

    rows = [{"prompt": f"Q{i}: ", "completion": f"answer {i}"} for i in range(6)]
    data = tmp_path / "data"
    data.mkdir()
    if layout == "one file":
        (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif layout == "dir of jsonl":
        for k in range(2):
            (data / f"{k}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3 * k: 3 * k + 3]))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), data / "a.parquet")
    path = data / "a.jsonl" if layout == "one file" else data
    counted = sum(int((y != IGNORE_INDEX).sum()) for _, y in file_batches(path, _ByteTok(), 64, 4, "text"))
    assert counted == sum(len(r["completion"].encode()) + 1 for r in rows)  # completion + EOS, never the prompt
