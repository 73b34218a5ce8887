"""More of the bad-input matrix (tests/test_bad_input_cli.py has the config/data/run-dir/CLI basics): damaged
checkpoints, hostile checkpoints through every loading path (resume, init.from, grow, export-hf, eval,
generate, import-hf), hostfiles, CLI misuse and configs that cannot fit. Same contract, same harness:
exit code 2, exactly one `error:` line naming the problem, no traceback, and a snapshot of everything under
the case's directory (run dir included) identical before and after.

Checkpoint cases start from one real checkpointed run (1 rank, 1 step) made once and copied per case.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch

from bad_input_harness import check_refusal, run_cases
from launch_utils import run_cli
from malicious import fix_manifest, self_check, write_classic, write_dotted
from test_bad_input_cli import TINY_YAML, _good_data, _write, prep, train

TAG = Path("checkpoints") / "global_step1"
MODEL_FILE, OPTIM_FILE = "mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _run(tmp: Path, base: Path) -> Path:
    """A copy of the good run as work/run (the case's own run.dir)."""
    shutil.copytree(base / "run", tmp / "run")
    return tmp / "run" / TAG


# ---- checkpoints: each case resumes `train` on a damaged copy ------------------------------------------

def c_ckpt_truncated(tmp, base):
    tag = _run(tmp, base)
    f = tag / MODEL_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    fix_manifest(tag)  # the manifest agrees: only reading the file shows it is cut short
    return train(tmp), (MODEL_FILE, "truncated")


def c_ckpt_tampered_checksum(tmp, base):
    tag = _run(tmp, base)
    f = tag / OPTIM_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return train(tmp), (OPTIM_FILE, "sha256")


def c_export_tampered_tag_named_directly(tmp, base):
    """A tag given by its path gets the same sha256 check as a run dir's newest tag (it used to export
    whatever the damaged file held)."""
    tag = _run(tmp, base)
    f = tag / OPTIM_FILE
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    return ["export-hf", str(tag), "--out", str(tmp / "hf")], (str(tag), "sha256", "give its run dir")


def c_ckpt_missing_shard(tmp, base):
    (_run(tmp, base) / OPTIM_FILE).unlink()
    return train(tmp), (OPTIM_FILE, "missing")


def c_ckpt_wrong_shapes(tmp, base):
    tag = _run(tmp, base)
    states = torch.load(tag / MODEL_FILE, weights_only=False)  # (trusted: the test wrote it)
    states["param_shapes"][0]["model.embed_tokens.weight"] = torch.Size([512, 32])
    torch.save(states, tag / MODEL_FILE)
    fix_manifest(tag)
    return train(tmp), ("does not match the model config", "model.embed_tokens.weight")


def c_ckpt_wrong_version(tmp, base):
    tag = _run(tmp, base)
    m = json.loads((tag / "manifest.json").read_text())
    m["format"] = 99
    (tag / "manifest.json").write_text(json.dumps(m))
    return train(tmp), ("format 99", "upgrade scaletrain")


def c_ckpt_bad_manifest(tmp, base):
    _write(_run(tmp, base) / "manifest.json", "{not json")
    return train(tmp), ("manifest", "none passes verification")


def c_ckpt_manifest_entry_without_size(tmp, base):
    tag = _run(tmp, base)
    m = json.loads((tag / "manifest.json").read_text())
    del next(iter(m["files"].values()))["bytes"]
    (tag / "manifest.json").write_text(json.dumps(m))
    return train(tmp), ("manifest", "none passes verification")


def c_ckpt_other_global_batch(tmp, base):
    """Refused before config.yaml is rewritten (the snapshot would show it) or DeepSpeed starts."""
    _run(tmp, base)
    return train(tmp, "train.micro_batch_size=2"), ("1 sequences per step", "this run has 2", "micro_batch_size x grad_accum")


def c_ckpt_run_config_not_text(tmp, base):
    _run(tmp, base)
    _write(tmp / "run" / "config.yaml", b"\xff\xfe\x00binary")
    return train(tmp), ("config.yaml is damaged", "not UTF-8")


def c_ckpt_malicious_pickle(tmp, base):
    """The optimizer shard runs `touch MARKER` when unpickled; the marker would show in the snapshot."""
    tag = _run(tmp, base)
    write_classic(tag / OPTIM_FILE, tmp / "PWNED")
    fix_manifest(tag)
    return train(tmp), (OPTIM_FILE, "posix.system", "refusing")


# ---- untrusted checkpoints through every loading path (the marker file would show in the snapshot) -------

def _hostile_run(tmp, base, dotted: bool = False) -> Path:
    """A copy of the good run whose model-state pickle runs `touch PWNED`, its manifest re-hashed."""
    tag = _run(tmp, base)
    (write_dotted if dotted else write_classic)(tag / MODEL_FILE, tmp / "PWNED")
    fix_manifest(tag)
    return tmp / "run"


def c_untrusted_resume_dotted_name(tmp, base):
    _hostile_run(tmp, base, dotted=True)  # 'deepspeed.runtime.engine' + 'os.system': a prefix allow-list would pass it
    return train(tmp), (MODEL_FILE, "deepspeed.runtime.engine.os.system", "refusing")


def c_untrusted_init_from(tmp, base):
    src = _hostile_run(tmp, base)
    return train(tmp, f"init.from={src}", f"run.dir={tmp / 'new'}"), (MODEL_FILE, "posix.system")


def c_untrusted_grow(tmp, base):
    src = _hostile_run(tmp, base)
    return ["grow", str(src), "--out", str(tmp / "child"), "--set", "model.num_layers=2"], (MODEL_FILE, "posix.system")


def c_untrusted_export_hf(tmp, base):
    return ["export-hf", str(_hostile_run(tmp, base)), "--out", str(tmp / "hf")], (MODEL_FILE, "posix.system")


def c_untrusted_eval(tmp, base):
    src = _hostile_run(tmp, base)
    return ["eval", str(src), "--data", str(_good_data(tmp))], (MODEL_FILE, "posix.system")


def c_untrusted_generate(tmp, base):
    return ["generate", str(_hostile_run(tmp, base)), "--prompt", "def"], (MODEL_FILE, "posix.system")


def c_untrusted_import_hf_bin(tmp, base):
    """A Hugging Face dir whose pytorch_model.bin runs code: torch.load(weights_only=True) refuses it."""
    hf = tmp / "hf"
    _write(hf / "config.json", json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
        "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}))
    write_classic(hf / "pytorch_model.bin", tmp / "PWNED")
    return ["import-hf", str(hf), "--out", str(tmp / "ckpt")], ("pytorch_model.bin", "safely")


# ---- CLI misuse -----------------------------------------------------------------------------------------

def c_export_existing_out(tmp, base):
    _write(tmp / "out" / "keep.txt", "precious")
    return ["export-hf", str(base / "run"), "--out", str(tmp / "out")], ("--out", "already exists")


def c_export_missing_out(tmp, base):
    return ["export-hf", str(base / "run")], "--out"


def c_prompt_completion_without_tokenizer(tmp, base):
    """Examples are no running text to learn a vocabulary from (it said: no 'text' field)."""
    _write(tmp / "pc.jsonl", '{"prompt": "2+2=", "completion": "4"}\n' * 20)
    return prep(tmp, f"data.source={tmp / 'pc.jsonl'}", "data.format=prompt_completion"), \
        ("data.format=prompt_completion needs a tokenizer", "data.tokenizer")


def c_deepspeed_passthrough_typo(tmp, base):
    """DeepSpeed's own config classes refused it inside deepspeed.initialize: a traceback on every rank."""
    return train(tmp, "deepspeed.zero_optimization.overlap_com=true"), ("overlap_com", "deepspeed:")


def c_deepspeed_top_level_scalar_text(tmp, base):
    """DeepSpeed takes top-level scalars unchecked: steps_per_print=abc died at step 1 (a traceback)."""
    return train(tmp, "deepspeed.steps_per_print=abc"), ("steps_per_print", "must be a number")


def c_deepspeed_steps_per_print_zero(tmp, base):
    """A ZeroDivisionError at step 1."""
    return train(tmp, "deepspeed.steps_per_print=0"), ("steps_per_print", "at least 1")


def c_config_key_twice(tmp, base):
    """YAML keeps the last of two equal keys: a second model: section replaced the first whole, silently."""
    _write(tmp / "twice.yaml", "model:\n  hidden_size: 128\ntrain:\n  max_steps: 2\nmodel:\n  num_layers: 3\n")
    return ["plan", "--config", str(tmp / "twice.yaml")], ("'model' appears twice", "line 1")


def c_grow_parent_after_set(tmp, base):
    """`--set` takes every word after it, the parent dir too: the message said PARENT was missing."""
    return ["grow", "--set", "model.num_layers=4", str(tmp / "run"), "--out", str(tmp / "child")], \
        ("PARENT", "before --set")


def c_eval_data_without_its_field(tmp, base):
    """The data code's message said "set data.text_field", which eval does not take (unrecognized arguments)."""
    _run(tmp, base)
    _write(tmp / "rows.jsonl", '{"content": "some text here"}\n')
    return ["eval", str(tmp / "run"), "--data", str(tmp / "rows.jsonl")], ("no 'text' field", "set --text-field")


def c_rope_scaling_without_its_type(tmp, base):
    """It said "type '?' is not supported"."""
    return ["plan", "--config", TINY_YAML, "--set", "model.rope_scaling={factor: 2}"], ("needs rope_type", "llama3")


def c_lineage_of_a_missing_path(tmp, base):
    """It said the path had no lineage.json."""
    return ["lineage", str(tmp / "nowhere")], ("does not exist",)


def c_tokenizer_dir_without_files(tmp, base):
    """AutoTokenizer's message trailed off ("Couldn't instantiate the backend tokenizer from one of: ")."""
    (tmp / "empty").mkdir()
    return ["prepare-data", "--config", TINY_YAML, "--set", f"data.tokenizer={tmp / 'empty'}",
            f"data.cache_dir={tmp / 'cache'}"], ("holds no tokenizer files",)


def c_plan_gpus_zero(tmp, base):
    return ["plan", "--config", TINY_YAML, "--gpus", "0"], ("--gpus", "at least 1")


def c_eval_batch_size_zero(tmp, base):
    return ["eval", str(tmp / "run"), "--batch-size", "0"], ("--batch-size", "at least 1")


def c_generate_temperature_nan(tmp, base):
    return ["generate", str(tmp / "run"), "--prompt", "x", "--temperature", "nan"], ("--temperature >= 0",)


def c_generate_seed_out_of_range(tmp, base):
    """torch.Generator raised "Overflow when unpacking long long" after the model had loaded."""
    return ["generate", str(tmp / "run"), "--prompt", "x", "--seed", str(2**64)], ("--seed", "out of range")


def c_generate_prompt_not_utf8(tmp, base):
    """Latin-1 bytes in argv reach Python as lone surrogates, which the tokenizer cannot take."""
    return ["generate", str(tmp / "run"), "--prompt", "caf\udce9"], ("--prompt", "UTF-8")


def c_grow_negative_check_windows(tmp, base):
    return ["grow", str(tmp / "run"), "--out", str(tmp / "child"), "--set", "model.num_layers=2",
            "--check-windows", "-1"], ("--check-windows", "at least 0")


def c_export_grow_out_under_a_file(tmp, base):
    _write(tmp / "parent.log", "a log, not a directory")
    return ["grow", str(base / "run"), "--out", str(tmp / "parent.log" / "child"), "--set", "model.num_layers=2"], \
        ("--out", "parent.log is a file")


def c_export_grow_out_cannot_be_created(tmp, base):
    return ["grow", str(base / "run"), "--out", "/proc/scaletrain-child", "--set", "model.num_layers=2"], \
        ("--out", "/proc/scaletrain-child")


def c_export_grow_child_context_below_the_runs_seq_len(tmp, base):
    """The child's config would not validate: its context is shorter than the parent run's train.seq_len."""
    return ["grow", str(base / "run"), "--out", str(tmp / "child"), "--set", "model.num_layers=4", "model.max_seq_len=16"], \
        ("seq_len", "max_seq_len")


def c_lineage_damaged(tmp, base):
    _write(tmp / "ckpt" / "lineage.json", '{"kind": "grow", "id": ')
    return ["lineage", str(tmp / "ckpt")], ("lineage.json is damaged",)


def c_lineage_missing(tmp, base):
    (tmp / "ckpt").mkdir()
    return ["lineage", str(tmp / "ckpt")], ("has no lineage.json",)


def c_weights_dir_as_run_dir(tmp, base):
    """`init.from=X run.dir=X` would have rewritten the checkpoint's config.yaml and lineage.json."""
    ckpt = tmp / "ckpt"
    _write(ckpt / "config.yaml", "model:\n  hidden_size: 64\n")
    _write(ckpt / "model.safetensors", b"weights")
    return train(tmp, f"run.dir={ckpt}"), ("run.dir", "holds a model's weights", f"init.from={ckpt}")


def c_init_from_missing(tmp, base):
    return train(tmp, f"init.from={tmp / 'nowhere'}"), ("init.from", "does not exist", "run dir")


def c_set_without_value(tmp, base):
    return ["train", "--config", TINY_YAML, "--set"], "--set"


# ---- configs ------------------------------------------------------------------------------------------

def c_config_cannot_fit(tmp, base):
    huge = ["model.hidden_size=8192", "model.num_layers=64", "model.num_heads=64", "model.num_kv_heads=8",
            "model.intermediate_size=22016"]
    return train(tmp, *huge), ("per rank", "no ZeRO setting fits", "train.memory_check=false")


def c_keep_every_negative(tmp, base):
    return train(tmp, "train.keep_every=-5"), "train.keep_every"


def c_max_skipped_zero(tmp, base):
    return train(tmp, "train.max_skipped=0"), "train.max_skipped"


def c_plan_unknown_key(tmp, base):
    return ["plan", "--config", TINY_YAML, "--set", "zero.stag=3"], ("'zero.stag'", "'zero.stage'")


CASES: dict[str, Callable] = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """One good run with one checkpoint, made with the same settings the train cases use."""
    b = tmp_path_factory.mktemp("good")
    (b / "cache").mkdir()
    rc, out, err = run_cli(*train(b), cwd=b, timeout=300)
    assert rc == 0 and (b / "run" / TAG / "manifest.json").is_file(), out[-2000:] + err[-3000:]
    return b


def _uses_base(name: str) -> bool:
    """Cases that read `base` (the good run) are named ckpt_*, untrusted_*, export_* or eval_*; the others get None."""
    return name.startswith(("ckpt", "untrusted", "export", "eval"))


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict:
    """Runs the cases this session selected (all, or those picked with -k), four at a time; the good run
    (`base`, a DeepSpeed start) is made only when a selected case copies it."""
    picked = {item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    names = sorted(picked or CASES)
    base = request.getfixturevalue("base") if any(map(_uses_base, names)) else None
    roots = {name: tmp_path_factory.mktemp(name) for name in names}
    return run_cases(CASES, roots, base, first=lambda n: n.startswith(("ckpt", "untrusted")))  # (DeepSpeed start-ups)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, results):
    check_refusal(results[case].result())


def test_payloads_are_live(tmp_path):
    """The hostile files above really run code under an unrestricted load (else those cases prove nothing)."""
    self_check(tmp_path)


def test_matrix_size():
    """The issue asks for at least 30 cases across the files."""
    import test_bad_input_cli
    import test_bad_input_flags

    assert len(CASES) + len(test_bad_input_cli.CASES) + len(test_bad_input_flags.CASES) >= 30
