"""`scaletrain import-hf HF_DIR --out CKPT_DIR`: a local Hugging Face Llama becomes a scaletrain checkpoint dir.

Everything is checked before anything is written (config, every shard present, every tensor's shape,
the tokenizer loads with AutoTokenizer); the weights are then streamed through unchanged (same dtype,
same bytes), so export-hf of the result reproduces the original tensors bit for bit.
"""

from __future__ import annotations

import sys
from pathlib import Path

from scaletrain import lineage
from scaletrain.config import Config, DataConfig, TrainConfig
from scaletrain.errors import UserError
from scaletrain.weights.checkpoint_dir import DEFAULT_SHARD, check_out, source_parent, staged, write_checkpoint_dir
from scaletrain.weights.sources import expected_shapes, open_weights, shape_problems, summarise
from scaletrain.weights.writer import parse_size

# data.source of an imported classifier's config.yaml: labelled rows are the one thing we cannot guess
CLASSIFY_SOURCE = "labelled.jsonl"


def finetune_defaults(model) -> Config:
    """config.yaml of an imported checkpoint: its model plus gentle fine-tuning settings (edit freely). A
    classifier (num_labels > 0) gets train.task=classify on classification rows: any other task is refused
    with its head (data.source names a file to replace)."""
    seq = min(512, model.max_seq_len)
    classify = model.num_labels > 0
    train = TrainConfig(lr=1e-4, min_lr=1e-5, warmup_steps=10, max_steps=200, seq_len=seq, eval_every=50, save_every=100,
                        task="classify" if classify else "lm")
    data = DataConfig(format="classification", source=CLASSIFY_SOURCE) if classify else DataConfig()
    return Config(model=model, train=train, data=data)


def _checked_tokenizer(hf_dir: Path, vocab_size: int):
    """The HF dir's tokenizer, once it loads and fits the vocabulary (else a one-line UserError naming the dir)."""
    from scaletrain.data.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(hf_dir)
    if tok.vocab_size > vocab_size:
        raise UserError(f"{hf_dir}: the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {vocab_size}")
    return tok


def _check_classifier_pooling(hf_dir: Path, tok) -> None:
    """HF's classifier reads the rightmost token that is not pad_token_id; ours read the last text token
    (examples right-padded with EOS, a trailing EOS dropped). The same token, unless the tokenizer appends EOS
    to every text and pad_token_id is another id (or none): that model reads its EOS, and imported it would
    predict something else."""
    from scaletrain.hf.arch_config import read_hf_config

    pad, ids = read_hf_config(hf_dir).get("pad_token_id"), tok.encode("a")
    if pad != tok.eos_id and ids and ids[-1] == tok.eos_id:
        raise UserError(f"{hf_dir}: this classifier reads the EOS its tokenizer appends to every text (pad_token_id "
                        f"{pad} is not EOS {tok.eos_id}); scaletrain's classifiers read the last text token, so its "
                        f"predictions would change. To fine-tune it anew anyway, set pad_token_id to {tok.eos_id} in "
                        "config.json")


def import_hf(hf_dir: str, out: str, max_shard_size: str = DEFAULT_SHARD, progress: bool = True) -> dict:
    src_dir, out_dir = Path(hf_dir).expanduser(), Path(out).expanduser()
    check_out(out_dir)
    max_bytes = parse_size(max_shard_size)
    src = open_weights(src_dir)
    if src.kind != "hf":
        raise UserError(f"{src_dir} is a scaletrain {src.kind} directory, not a Hugging Face model; use it directly (init.from) or export-hf")
    problems = shape_problems(src.specs(), expected_shapes(src.model))
    if problems:
        raise UserError(f"{src_dir}: weights do not match config.json: {summarise(problems)}")
    if src.tokenizer is not None:
        tok = _checked_tokenizer(src.tokenizer, src.model.vocab_size)
        if src.model.num_labels:
            _check_classifier_pooling(src_dir, tok)
    else:
        print(f"warning: {src_dir} has no tokenizer files; set data.tokenizer when training from this checkpoint", file=sys.stderr)
    cfg = finetune_defaults(src.model)
    if cfg.train.task == "classify":
        print(f"note: a classifier ({src.model.num_labels} labels): its config.yaml trains with train.task=classify; "
              f"set data.source (now {CLASSIFY_SOURCE}) to your text/label rows", file=sys.stderr)
    with staged(out_dir, seal=True) as tmp:
        rec = write_checkpoint_dir(tmp, out_dir, src, cfg, "import-hf", [], max_bytes, progress,
                                   source={"path": str(src_dir.resolve())})
        # The parent is the HF dir: its own lineage id when it is one of our exports, else its content id
        # (the bytes we just streamed through unchanged).
        rec["parents"] = [source_parent(src, rec["id"])]
        lineage.write(tmp, rec)
    return rec
