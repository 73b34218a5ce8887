"""Task fine-tuning end to end: pre-train a tiny LM, fine-tune it as a classifier with 2 DeepSpeed ranks
(frozen embeddings, lower body lr), read val/accuracy and val/f1 back from TensorBoard, evaluate held-out
lines with `scaletrain eval`, export as transformers' LlamaForSequenceClassification with logits parity,
and follow lineage.json from the fine-tune to its parent. Plus the fine-tune path's units."""

from __future__ import annotations

import json
import random
import sysconfig
from pathlib import Path

import pytest
import torch

from launch_utils import run_cli
from launch_utils import TINY, run_training, small_corpus, tb_scalars

from scaletrain.config import load_config
from scaletrain.model.classify import build_model, last_token_index
from scaletrain.model.llama import LlamaShape
from scaletrain.train import finetune
from scaletrain.train.schedule import LrSchedule


def labelled_lines(files: list[Path], n: int, seed: int) -> list[dict]:
    """A rule a tiny model can pick up: label 1 for a source line that defines a function ('def '), 0 for any
    other code line; balanced, so chance is 50%."""
    pos, neg = [], []
    for f in files:
        for line in f.read_text(errors="replace").splitlines():
            text = line.strip()[:80]
            if len(text) < 8 or text.startswith("#"):
                continue
            (pos if "def " in text else neg).append(text)
    rng = random.Random(seed)
    rng.shuffle(pos)
    rng.shuffle(neg)
    k = min(n // 2, len(pos), len(neg))
    rows = [{"text": t, "label": 1} for t in pos[:k]] + [{"text": t, "label": 0} for t in neg[:k]]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("classify")
    stdlib = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = write_jsonl(root / "train" / "lines.jsonl", labelled_lines(stdlib[40:140], 3000, 0))
    test = write_jsonl(root / "test.jsonl", labelled_lines(stdlib[140:180], 400, 1))  # other files: held out
    corpus = small_corpus(root / "corpus")
    base = [*TINY, f"data.cache_dir={root / 'cache'}"]
    parent = root / "pretrain"
    run_training(1, [*base, f"data.source={corpus}", "train.max_steps=20", f"run.dir={parent}"])
    return {"root": root, "train": train, "test": test, "base": base, "parent": parent}


def classify_args(s: dict, run_dir: Path, *extra: str) -> list[str]:
    return [*s["base"], f"init.from={s['parent']}", f"data.source={s['train'].parent}", "data.format=classification",
            "train.task=classify", "model.num_labels=2", "data.val_fraction=0.1", "train.seq_len=32",
            "train.micro_batch_size=16", "train.eval_batches=4", "train.lr=3e-3", "train.min_lr=3e-4",
            "train.warmup_steps=5", "train.save_every=0", f"run.dir={run_dir}", *extra]


@pytest.mark.slow
def test_two_rank_classification_finetune_learns_evaluates_exports(setup, tmp_path):
    s = setup
    run = s["root"] / "finetune"
    run_training(2, classify_args(s, run, "train.max_steps=60", "train.eval_every=20", "zero.stage=2",
                                  "train.freeze=[embeddings]", "train.body_lr_scale=0.5"), timeout=600)
    acc, f1 = tb_scalars(run, "val/accuracy"), tb_scalars(run, "val/f1")
    assert sorted(acc) == [20, 40, 60] and sorted(f1) == [20, 40, 60]
    print(f"val accuracy by step: {acc}, macro-F1 {f1}")
    assert acc[60] >= 0.85 and f1[60] >= 0.85

    rc, out, err = run_cli("eval", str(run), "--data", str(s["test"]), "--json")
    assert rc == 0, err[-2000:]
    res = json.loads(out)  # stdout is the JSON alone
    print(f"held-out accuracy {res['accuracy']:.3f}, macro-F1 {res['f1']:.3f} on {res['examples']} lines")
    assert res["examples"] == 400 and res["accuracy"] >= 0.85  # chance: 0.5

    from scaletrain.weights import open_weights

    parent_emb = dict(open_weights(s["parent"]).tensors())["model.embed_tokens.weight"]
    child = dict(open_weights(run).tensors())
    assert torch.equal(child["model.embed_tokens.weight"], parent_emb), "frozen embeddings moved"
    assert "score.weight" in child and "lm_head.weight" not in child

    rec = json.loads((run / "lineage.json").read_text())
    parent_rec = json.loads((s["parent"] / "lineage.json").read_text())
    assert rec["kind"] == "fine-tune" and rec["parents"][0]["id"] == parent_rec["id"]
    rc, out, err = run_cli("lineage", str(run))
    assert rc == 0 and "fine-tune" in out and "pre-train" in out, out + err

    hf_dir = tmp_path / "hf"
    rc, out, err = run_cli("export-hf", str(run), "--out", str(hf_dir))
    assert rc == 0, err[-2000:]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from scaletrain.generate import load_model

    hf = AutoModelForSequenceClassification.from_pretrained(str(hf_dir)).eval()
    assert type(hf).__name__ == "LlamaForSequenceClassification" and hf.config.pad_token_id == 2
    ours, tok, _ = load_model(str(run))
    texts = ["def main(argv):", "    return x + 1", "import os"]
    ids = [tok.encode(t) for t in texts]
    width = max(map(len, ids))
    x = torch.tensor([i + [2] * (width - len(i)) for i in ids])  # right-padded with the pad id (EOS)
    hf_tok = AutoTokenizer.from_pretrained(str(hf_dir))
    assert hf_tok(texts[0])["input_ids"] == ids[0]
    assert hf_tok.pad_token_id == 2 and hf_tok(texts, padding=True)["input_ids"] == x.tolist()  # HF batches as we do
    with torch.no_grad():
        diff = (ours(x) - hf(input_ids=x).logits).abs().max().item()
    print(f"classifier export parity: max |dlogits| = {diff:.2e}")
    assert diff <= 1e-5


@pytest.mark.slow
def test_early_stopping_and_full_freeze(setup, tmp_path):
    """Nothing learns (the head frozen, the body at lr 0; freezing every parameter is refused): val loss cannot
    improve, so training stops `patience` evals after the first one, with status early_stopped, and the weights
    are the parent's bit for bit."""
    s = setup
    run = tmp_path / "frozen"
    args = classify_args(s, run, "train.max_steps=40", "train.eval_every=2", "train.early_stop_patience=2",
                         "train.early_stop_metric=val/loss", "train.precision=fp32",
                         "train.freeze=[head]", "train.body_lr_scale=0")
    proc = run_training(1, args)
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "early_stopped" and status["step"] == 6, status
    assert "early stop: val/loss did not improve" in proc.stdout
    # the same command again: the run is over, as a finished one is (it trained on before)
    files = sorted((p, p.stat().st_mtime_ns) for p in (run / "checkpoints").rglob("*"))
    proc = run_training(1, args)
    assert "stopped early at step 6" in proc.stdout, proc.stdout[-2000:]
    assert json.loads((run / "status.json").read_text()) == status
    assert sorted((p, p.stat().st_mtime_ns) for p in (run / "checkpoints").rglob("*")) == files
    from scaletrain.weights import open_weights

    before = dict(open_weights(s["parent"]).tensors())
    after = dict(open_weights(run).tensors())
    assert all(torch.equal(after[k], before[k]) for k in before if k != "lm_head.weight")
    # class names the run's config.yaml has but a tag's manifest lacks (written before manifests kept them):
    # the tag's model is that model, names included (they were dropped, and export-hf wrote LABEL_k)
    import yaml

    conf = yaml.safe_load((run / "config.yaml").read_text())
    names = [f"class{i}" for i in range(conf["model"]["num_labels"])]
    conf["model"]["label_names"] = names
    (run / "config.yaml").write_text(yaml.safe_dump(conf))
    assert open_weights(run).model.label_names == names


def test_param_groups_freeze_and_body_lr():
    cfg = load_config("configs/tiny.yaml", ["model.num_layers=3", "model.num_labels=3", "train.task=classify",
                                            "data.format=classification", "data.source=/x.jsonl",
                                            "train.freeze=[embeddings, layers.1]", "train.body_lr_scale=0.25"])
    model = build_model(LlamaShape.from_config(cfg.model))
    groups = finetune.param_groups(model, cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    flat = [names[id(p)] for g in groups for p in g["params"]]
    params = [n for n, p in model.named_parameters()]
    # matrices then vectors, each in parameter order (what the ZeRO-0 checkpoint readers assume)
    assert flat == [n for n in params if model.get_parameter(n).ndim >= 2] + [n for n in params if model.get_parameter(n).ndim < 2]
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["model.embed_tokens.weight"] == 0 and scale["model.layers.1.mlp.up_proj.weight"] == 0
    assert scale["model.layers.0.mlp.up_proj.weight"] == 0.25 and scale["model.norm.weight"] == 0.25
    assert scale["score.weight"] == 1.0
    opt = torch.optim.AdamW(groups, lr=1.0)
    LrSchedule(opt, 1e-3, 1e-4, 0, 10)
    assert sorted({g["lr"] for g in opt.param_groups}) == [0.0, 0.25e-3, 1e-3]


def test_classifier_pools_the_last_non_pad_token_and_metrics():
    x = torch.tensor([[5, 6, 7, 2, 2], [5, 6, 7, 8, 9], [2, 2, 2, 2, 2]])
    assert last_token_index(x, 2).tolist() == [2, 4, 0]
    conf = torch.zeros(3, 3, dtype=torch.float64)
    finetune.confusion_update(conf, torch.tensor([[9.0, 0, 0], [0, 9, 0], [0, 9, 0], [0, 0, 9]]), torch.tensor([0, 1, 2, 2]))
    m = finetune.classification_metrics(conf)
    assert m["accuracy"] == 0.75 and abs(m["f1"] - (1 + 2 / 3 + 2 / 3) / 3) < 1e-9
    stop = finetune.EarlyStop(load_config("configs/tiny.yaml", ["train.early_stop_patience=2"]))
    assert [stop.update({"val/loss": v}) for v in (3.0, 2.0, 2.5, 2.1, 1.0)] == [False, False, False, True, False]


def test_exported_classifier_tokenizer_pads_with_eos_when_copied_from_hf(tmp_path):
    """A classifier fine-tuned from an imported HF model ships that model's tokenizer files: the export adds
    pad_token = eos_token, also where they had a pad token of their own: the classifier trained on EOS-padded
    windows and config.json's pad_token_id is EOS, so a tokenizer padding with another token had HF's pooling
    read padded rows at a padding position."""
    import json

    from scaletrain.hf.tokenizer_files import write_hf_tokenizer

    src = tmp_path / "src"
    src.mkdir()
    for pad, want in [(None, "</s>"), ("<pad>", "</s>")]:
        (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "pad_token": pad}))
        out = tmp_path / f"out-{pad}"
        out.mkdir()
        write_hf_tokenizer(src, out, 128, pad_with_eos=True)
        assert json.loads((out / "tokenizer_config.json").read_text())["pad_token"] == want
    plain = tmp_path / "lm"
    plain.mkdir()
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    write_hf_tokenizer(src, plain, 128)  # a language model: its tokenizer as it was
    assert "pad_token" not in json.loads((plain / "tokenizer_config.json").read_text())


def test_eval_data_with_a_label_the_classifier_lacks_is_one_line(tmp_path):
    """`scaletrain eval --data` checks labels against model.num_labels (cross_entropy raised IndexError)."""
    from scaletrain.data.classification import file_stream
    from scaletrain.errors import UserError

    class Chars:
        eos_id = 2

        def encode(self, text):
            return [3 + ord(c) % 50 for c in text]

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in [("good", 1), ("bad", 0), ("odd", 5)]))
    assert file_stream(data, Chars(), 16).num_windows == 3  # (without a model to check against)
    with pytest.raises(UserError, match=r"label 5 is outside 0\.\.1 \(the model has model.num_labels=2\)"):
        file_stream(data, Chars(), 16, num_labels=2)
