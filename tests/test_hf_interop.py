"""Hugging Face interop with transformers as the oracle: export parity (logits, tokenizer ids), import round trip
(bit-exact tensors), greedy generate == HF generate, eval loss == HF loss, and users' mistakes (one line, exit 2,
nothing written)."""

from __future__ import annotations

import json
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from launch_utils import run_cli
from hf_fixtures import (VOCAB, cli_ok, corpus, hf_dir, hf_root, imported, sp_model,  # noqa: F401
                         tensors_of, write_checkpoint_dir)

from scaletrain.config import ModelConfig


@pytest.fixture(autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors on a shared 2-core machine
    yield
    torch.set_num_threads(before)


def _our_model(cfg: ModelConfig, seed: int = 0):
    from scaletrain.model.llama import LlamaForCausalLM, LlamaShape

    torch.manual_seed(seed)
    m = LlamaForCausalLM(LlamaShape.from_config(cfg))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return m.eval()


# ---- export parity ---------------------------------------------------------------------------------------

SHAPES = {"mha": dict(hidden_size=64, num_heads=4, num_kv_heads=4), "gqa": dict(hidden_size=96, num_heads=6, num_kv_heads=2)}


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_export_logits_match_transformers(tmp_path, sp_model, arch, tied):
    from transformers import AutoModelForCausalLM

    from scaletrain.hf.export_hf import export_hf

    cfg = ModelConfig(**SHAPES[arch], num_layers=2, intermediate_size=176, vocab_size=VOCAB, max_seq_len=128,
                      rope_theta=500000.0 if arch == "gqa" else 10000.0, tie_word_embeddings=tied, init_std=0.1)
    ours = _our_model(cfg)
    ckpt = write_checkpoint_dir(tmp_path / "ckpt", ours, cfg, sp_model)
    export_hf(str(ckpt), str(tmp_path / "hf"), progress=False)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    assert ("lm_head.weight" in tensors_of(tmp_path / "hf")) == (not tied)
    ids = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = ours(ids), hf(ids).logits
    assert a.abs().max() > 1.0  # not vacuous
    diff = (a - b).abs().max().item()
    print(f"export parity {arch} {'tied' if tied else 'untied'}: max |dlogits| = {diff:.2e}")
    assert diff <= 1e-5


def test_exported_tokenizer_gives_training_ids_on_stdlib(tmp_path, sp_model):
    """AutoTokenizer on an export == sentencepiece (what training used), on real text, incl. "<s>" in text."""
    from transformers import AutoTokenizer

    from scaletrain.data.tokenizer import Tokenizer
    from scaletrain.hf.tokenizer_files import PROBE, write_hf_tokenizer

    write_hf_tokenizer(sp_model, tmp_path, 128)
    hf, sp = AutoTokenizer.from_pretrained(str(tmp_path)), Tokenizer(sp_model)
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:150]
    texts = [PROBE, "<s>x</s> <unk>", "  leading spaces\n\n\ttabs  ", "数字 12345 and émoji 🙂"] + [f.read_text(errors="replace") for f in files]
    bad = [i for i, t in enumerate(texts) if hf(t)["input_ids"] != sp.encode(t)]
    assert not bad, f"{len(bad)} of {len(texts)} texts tokenise differently, first: {texts[bad[0]][:80]!r}"
    assert hf.eos_token_id == sp.eos_id and hf.decode(sp.encode(texts[5])) == texts[5]


def test_exported_tokenizer_keeps_user_defined_symbols(tmp_path):
    """A sentencepiece model trained with user-defined symbols (always one token in text) exports them as added
    tokens, and the export's id check probes them: without that they came out as their characters' pieces."""
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from scaletrain.data.tokenizer import Tokenizer
    from scaletrain.hf.tokenizer_files import check_same_ids, write_hf_tokenizer

    lines = [f.read_text(errors="replace") for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter("\n".join(lines).splitlines()), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, user_defined_symbols=["<tool>", "<|end|>"], minloglevel=2)
    model = tmp_path / "sp.model"
    model.write_bytes(buf.getvalue())
    out = tmp_path / "hf"
    out.mkdir()
    write_hf_tokenizer(model, out, 128)
    sp, hf = Tokenizer(model), AutoTokenizer.from_pretrained(str(out))
    text = "call <tool> then x<|end|>y"
    assert sp.sp.piece_to_id("<tool>") in sp.encode(text)
    assert hf(text)["input_ids"] == sp.encode(text)
    check_same_ids(out, sp)


# ---- import round trip ----------------------------------------------------------------------------------


def test_import_export_round_trip_is_bit_exact(tmp_path, hf_dir, imported):
    cli_ok("export-hf", str(imported), "--out", str(tmp_path / "out"), "--max-shard-size", "300KB")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    a, b = tensors_of(hf_dir), tensors_of(tmp_path / "out")
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))  # the sharded export loads
    text = "def main(argv):\n    return 0\n"
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out"))(text)["input_ids"] == AutoTokenizer.from_pretrained(str(hf_dir))(text)["input_ids"]
    lineage = json.loads((tmp_path / "out" / "lineage.json").read_text())
    assert lineage["kind"] == "export" and lineage["parents"][0]["kind"] == "import-hf"


def test_import_sharded_pytorch_bin(tmp_path, hf_dir):
    """pytorch_model-*.bin shards + index (read with weights_only=True; zip and legacy format) import to the same
    tensors."""
    import shutil

    src = tmp_path / "bin"
    src.mkdir()
    for f in hf_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            shutil.copyfile(f, src / f.name)
    sd = tensors_of(hf_dir)
    names = sorted(sd)
    halves = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    for i, (fname, keys) in enumerate(halves.items()):  # the second in the legacy (pre-1.6, not zip) format
        torch.save({k: sd[k] for k in keys}, src / fname, _use_new_zipfile_serialization=i == 0)
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {k: f for f, ks in halves.items() for k in ks}}))
    cli_ok("import-hf", str(src), "--out", str(tmp_path / "ck"))
    got = tensors_of(tmp_path / "ck")
    assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def _hf(hf_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(hf_dir)).eval(), AutoTokenizer.from_pretrained(str(hf_dir))


def test_greedy_generate_matches_hf(hf_dir, imported):
    prompt = "def main(argv):\n    parser = "
    out = json.loads(cli_ok("generate", str(imported), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16", "--json"))
    model, tok = _hf(hf_dir)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    assert out["prompt_ids"] == ids[0].tolist()
    ref = model.generate(ids, max_new_tokens=16, do_sample=False)[0, ids.shape[1] :].tolist()
    assert out["ids"] == ref
    assert len(set(ref)) > 3  # a varied continuation, not one repeated token
    assert prompt + out["text"] == tok.decode(ids[0].tolist() + ref, skip_special_tokens=True)  # JSON = plain output


def test_eval_loss_matches_hf(tmp_path, hf_dir, imported):
    model, tok = _hf(hf_dir)
    text = Path(sysconfig.get_paths()["stdlib"], "heapq.py").read_text()
    while len(tok(text)["input_ids"]) >= 250:  # one window keeps the oracle simple
        text = text[: len(text) * 3 // 4]
    (tmp_path / "doc.txt").write_text(text)
    res = json.loads(cli_ok("eval", str(imported), "--data", str(tmp_path / "doc.txt"), "--json", "--seq-len", "250"))
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    with torch.no_grad():
        ref = model(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert res["tokens"] == len(ids) - 1
    assert abs(res["loss"] - ref) < 1e-4, (res, ref)


# ---- users' mistakes: one line, exit 2, nothing written -------------------------------------------------


def _bad_cases(tmp: Path, hf_dir: Path, imported: Path) -> dict:
    import shutil

    def copy(name: str) -> Path:
        d = tmp / name
        shutil.copytree(hf_dir, d)
        return d

    def edit_config(d: Path, **kw) -> Path:
        cfg = json.loads((d / "config.json").read_text())
        cfg.update(kw)
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    (tmp / "empty").mkdir()
    other = edit_config(copy("gpt2"), architectures=["GPT2LMHeadModel"], model_type="gpt2")
    missing = copy("missing")
    (missing / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    (missing / "model.safetensors").unlink()
    shapes = edit_config(copy("shapes"), intermediate_size=128)
    scaling = edit_config(copy("scaling"), rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
    bias = edit_config(copy("bias"), attention_bias=True)
    badtok = copy("badtok")
    (badtok / "tokenizer.json").write_text("{ not json")
    full = tmp / "full"
    full.mkdir()
    (full / "keep.txt").write_text("precious")
    return {
        "not a model": (["import-hf", str(tmp / "empty")], "config.json"),
        "other architecture": (["import-hf", str(other)], "GPT2LMHeadModel"),
        "missing shard": (["import-hf", str(missing)], "missing weight shard"),
        "mismatched shapes": (["import-hf", str(shapes)], "do not match"),
        "rope scaling": (["import-hf", str(scaling)], "llama3"),
        "attention bias": (["import-hf", str(bias)], "attention_bias"),
        "unreadable tokenizer": (["import-hf", str(badtok)], "tokenizer"),
        "existing out (import)": (["import-hf", str(hf_dir), "--out", str(full)], "not empty"),
        "existing out (export)": (["export-hf", str(imported), "--out", str(full)], "not empty"),
        "export of a non-model": (["export-hf", str(tmp / "empty")], "not a model"),
        "no lineage": (["lineage", str(tmp / "empty")], "lineage.json"),
    }


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, hf_dir, imported):
    cases = _bad_cases(tmp_path, hf_dir, imported)

    def one(item):
        name, (argv, word) = item
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        if "--out" not in argv:
            argv = [*argv, "--out", str(out)] if argv[0] != "lineage" else argv
        return name, word, out, run_cli(*argv)

    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(one, cases.items()))
    for name, word, out, (rc, stdout, stderr) in results:
        lines = [ln for ln in stderr.splitlines() if ln.strip() and "[WARNING]" not in ln and "warn(" not in ln]
        assert rc == 2, f"{name}: rc={rc}\n{stderr[-2000:]}"
        assert len(lines) == 1 and lines[0].startswith("error: "), f"{name}: {stderr!r}"
        assert word.lower() in lines[0].lower(), f"{name}: {lines[0]}"
        assert not out.exists(), f"{name}: {out} was created"
    # no temp dir left beside any output (staged outputs are hidden siblings named .<out>.tmp-...)
    assert not [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name], "temp dir left behind"
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == ["keep.txt"]  # --out that existed: untouched
    assert (tmp_path / "full" / "keep.txt").read_text() == "precious"


def test_init_from_shape_mismatch_is_a_one_line_diff(tmp_path, imported):
    rc, out, err = run_cli("train", "--config", "configs/tiny.yaml", "--set", f"init.from={imported}", f"run.dir={tmp_path / 'run'}",
                           "model.vocab_size=512", "model.num_heads=6", "model.num_kv_heads=2", "model.hidden_size=96")
    lines = [ln for ln in err.splitlines() if ln.startswith("error")]
    assert rc == 2 and len(lines) == 1, err[-2000:]
    assert "model.num_layers: checkpoint 3, config 4" in lines[0] and "model.intermediate_size: checkpoint 200, config 688" in lines[0]
    assert not (tmp_path / "run").exists()


def test_init_from_a_model_without_a_tokenizer_needs_data_tokenizer(tmp_path, hf_dir, imported, sp_model):
    """A new tokenizer (what a start without one trains) would feed the pretrained embeddings unrelated ids."""
    import shutil

    from scaletrain.config import load_config
    from scaletrain.errors import UserError
    from scaletrain.train.init_from import resolve

    bare = tmp_path / "weights-only"
    bare.mkdir()
    for f in hf_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copy(f, bare / f.name)
    args = [f"init.from={bare}", f"run.dir={tmp_path / 'run'}"]
    with pytest.raises(UserError, match="has no tokenizer.*set data.tokenizer"):
        resolve(load_config(str(imported / "config.yaml"), args))
    assert resolve(load_config(str(imported / "config.yaml"), [*args, f"data.tokenizer={sp_model}"])).data.tokenizer == str(sp_model)
    assert resolve(load_config(str(imported / "config.yaml"), [f"init.from={hf_dir}", args[1]])).data.tokenizer == str(hf_dir.resolve())


def test_hf_classifier_imports_and_exports_batches_the_way_it_trained(tmp_path, hf_dir):
    """import-hf of a *ForSequenceClassification failed on its own default config.yaml (a traceback). Its
    export kept the source tokenizer's own pad token while config.pad_token_id said EOS, so HF's pooling (the
    last token that is not pad_token_id) read every shorter row of a padded batch at a padding position."""
    import yaml
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification

    from hf_fixtures import hf_llama_config

    src = tmp_path / "cls"
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    tok.pad_token = tok.unk_token  # a pad token of its own, not EOS
    tok.save_pretrained(str(src))
    torch.manual_seed(0)
    names = ["negative", "neutral", "positive"]
    source = LlamaForSequenceClassification(hf_llama_config(
        num_labels=3, pad_token_id=tok.pad_token_id, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)})).eval()
    source.save_pretrained(str(src))
    cli_ok("import-hf", str(src), "--out", str(tmp_path / "ck"))
    cfg = yaml.safe_load((tmp_path / "ck" / "config.yaml").read_text())
    assert (cfg["model"]["num_labels"], cfg["train"]["task"], cfg["data"]["format"]) == (3, "classify", "classification")
    assert cfg["model"]["label_names"] == names
    # a fine-tune from it whose config does not name the classes keeps the source's names
    from scaletrain.config import build_config
    from scaletrain.train import init_from

    run_cfg = build_config({**cfg, "model": {**cfg["model"], "label_names": None}, "init": {"from": str(tmp_path / "ck")},
                            "run": {"dir": str(tmp_path / "run")}})
    assert init_from.resolve(run_cfg, warn=lambda m: None).model.label_names == names
    cli_ok("export-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"))
    hf = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf_tok.pad_token_id == hf.config.pad_token_id == tok.eos_token_id
    assert hf.config.id2label == dict(enumerate(names))
    texts = ["def main(argv):", "    return x + 1 if y else z", "import os"]
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    assert batch["input_ids"].shape[1] > min(len(tok(t)["input_ids"]) for t in texts)  # some rows are padded
    with torch.no_grad():
        batched = hf(**batch).logits
        alone = torch.cat([source(input_ids=tok(t, return_tensors="pt")["input_ids"]).logits for t in texts])
    assert (batched - alone).abs().max() <= 1e-5


def test_generation_settings_travel_from_import_to_export(tmp_path, hf_dir):
    """Stop tokens and sampling defaults of an HF model's generation_config.json survive import-hf, a run that
    starts from the import (found through init.from) and export-hf; the export used to write one eos and
    greedy decoding."""
    import shutil

    from scaletrain.hf import generation_config

    src = tmp_path / "chat"
    shutil.copytree(hf_dir, src)
    settings = {"bos_token_id": 1, "eos_token_id": [2, 7], "do_sample": True, "temperature": 0.6, "top_p": 0.9}
    (src / "generation_config.json").write_text(json.dumps(settings))
    cli_ok("import-hf", str(src), "--out", str(tmp_path / "ck"))
    cli_ok("export-hf", str(tmp_path / "ck"), "--out", str(tmp_path / "hf"))
    got = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert {k: got[k] for k in settings} == settings
    from transformers import GenerationConfig

    assert GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == [2, 7]
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == [2, 7]  # was 2 alone
    cli_ok("grow", str(tmp_path / "ck"), "--out", str(tmp_path / "grown"), "--set", "model.num_layers=4")
    assert generation_config.find(tmp_path / "grown") == settings  # a grown child keeps its parent's
    from scaletrain.errors import UserError
    from scaletrain.growth.offline import child_model_config
    from scaletrain.weights import open_weights

    with pytest.raises(UserError, match="label_names must name each"):  # one line, not an IndexError
        child_model_config(open_weights(tmp_path / "ck").model, {"label_names": ["a"]})
    # a run dir (and its tags) started from the import find it through init.from
    run = tmp_path / "run"
    (run / "checkpoints" / "global_step5").mkdir(parents=True)
    (run / "config.yaml").write_text(f"init:\n  from: {tmp_path / 'ck'}\n")
    assert generation_config.find(run) == generation_config.find(run / "checkpoints" / "global_step5") == settings
    (run / "config.yaml").write_text(f"init:\n  from: {run}\n")  # a loop ends, with nothing found
    assert generation_config.find(run) is None
    assert generation_config.for_export(None, 1, 2, "x")["eos_token_id"] == 2
    assert generation_config.for_export({"eos_token_id": 9}, 1, 2, "x")["eos_token_id"] == [2, 9]


def test_special_token_strings_in_corpus_text_stay_text(tmp_path, hf_dir):
    """Pre-training text prepared with an HF tokenizer: "</s>" or "<s>" written in a document (code, HTML) is
    text, not EOS/BOS; otherwise data.doc_mask would cut documents there and the model would learn to stop
    mid-document. The only EOS in the cache are the ones that end documents."""
    import numpy as np

    from scaletrain.config import load_config
    from scaletrain.data.prepare import prepare_data

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"d{i}.txt").write_text(f"print('</s>')  # end {i}\nhtml = '<s>bold</s> <unk>'\n" * 3)
    cfg = load_config(None, [f"data.source={docs}", f"data.cache_dir={tmp_path / 'cache'}", f"data.tokenizer={hf_dir}",
                             f"model.vocab_size={VOCAB}", "data.val_fraction=0", "data.num_workers=1"])
    cache = prepare_data(cfg, progress=False)
    ids = np.asarray(cache.tokens("train"))
    tok = cache.tokenizer()
    assert int((ids == tok.eos_id).sum()) == 6 and ids[-1] == tok.eos_id
    assert not (ids == tok.tok.unk_token_id).any()
    assert tok.decode([int(i) for i in ids[:-1]]).count("</s>") >= 6


def test_a_mistral_whose_tokenizer_class_comes_from_config_json_round_trips(tmp_path, hf_dir):
    """Real Mistral dirs name LlamaTokenizer (legacy) in tokenizer_config.json, but next to their config.json
    AutoTokenizer loads another class, which tokenises the text after a special token differently. The copies
    (import's tokenizer/, a data cache's) lacked config.json, so training ids differed from the model's own and
    export-hf refused its result."""
    import shutil

    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    from scaletrain.data.hf_tokenizer import PROBE
    from scaletrain.data.tokenizer import load_tokenizer

    src = tmp_path / "mistral"
    src.mkdir()
    for f in hf_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(f, src / f.name)
    tok_cfg = json.loads((src / "tokenizer_config.json").read_text())
    (src / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "LlamaTokenizer", "legacy": True}))
    torch.manual_seed(0)
    MistralForCausalLM(MistralConfig(hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                                     num_key_value_heads=2, head_dim=8, vocab_size=VOCAB, max_position_embeddings=128,
                                     sliding_window=None)).save_pretrained(str(src))
    text = PROBE + " hello <unk> world </s> again"
    want = AutoTokenizer.from_pretrained(str(src))(text)["input_ids"]
    cli_ok("import-hf", str(src), "--out", str(tmp_path / "ckpt"))
    assert load_tokenizer(tmp_path / "ckpt" / "tokenizer").encode(text) == want
    cli_ok("export-hf", str(tmp_path / "ckpt"), "--out", str(tmp_path / "back"))
    assert AutoTokenizer.from_pretrained(str(tmp_path / "back"))(text)["input_ids"] == want
    # init.from the HF dir itself: the data cache's copy of its tokenizer gives the model's ids too
    from scaletrain.data.hf_tokenizer import copy_tokenizer_dir

    copy_tokenizer_dir(src, tmp_path / "cache-copy")
    assert load_tokenizer(tmp_path / "cache-copy").encode(text) == want


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_a_model_loaded_for_inference_computes_what_was_saved(tmp_path, sp_model, tied):
    """eval/generate build the model on the meta device and fill it from the checkpoint (no initialisation to
    throw away): every weight and buffer must be the saved model's, and a tied head tied again (to_empty unties)."""
    from scaletrain.generate import load_model

    cfg = ModelConfig(**SHAPES["gqa"], num_layers=2, intermediate_size=128, vocab_size=VOCAB, max_seq_len=64,
                      tie_word_embeddings=tied)
    ours = _our_model(cfg, seed=3)
    loaded, _, _ = load_model(str(write_checkpoint_dir(tmp_path / "ck", ours, cfg, sp_model)))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tied
    x = torch.randint(3, VOCAB, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))
