"""Typed config: YAML + dotted overrides, one-line errors that name the key, and the generated ds_config."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from scaletrain.config import Config, build_config, load_config, parse_overrides, save_config
from scaletrain.ds_config import deepspeed_config
from scaletrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def error_of(overrides: list[str], path=None) -> str:
    with pytest.raises(UserError) as exc:
        load_config(path, overrides)
    msg = str(exc.value)
    assert msg and "\n" not in msg, f"error must be one non-empty line: {msg!r}"
    assert "Traceback" not in msg and "pydantic" not in msg.lower(), msg
    return msg


# ---- defaults and shipped files -------------------------------------------------------------------

def test_defaults_validate():
    cfg = load_config(None)
    assert cfg == Config()
    assert cfg.model.hidden_size % cfg.model.num_heads == 0
    assert cfg.train.seq_len <= cfg.model.max_seq_len
    # A dump of the resolved config validates back to the same config.
    assert build_config(cfg.to_dict()) == cfg


def test_configs_dir_is_not_empty():
    assert REPO / "configs" / "tiny.yaml" in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_loads(path):
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(path)
    # Every value written in the file is what the config holds (nothing silently dropped or renamed).
    for section, values in raw.items():
        if isinstance(values, dict) and section != "deepspeed":
            for key, value in values.items():
                got = cfg.to_dict()[section][key]
                assert got == value, f"{path.name}: {section}.{key} = {got!r}, file says {value!r}"


def test_save_config_round_trip(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", ["model.num_layers=3", "train.lr=1e-3"])
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg
    assert cfg.fingerprint() == load_config(tmp_path / "c.yaml").fingerprint()
    assert cfg.fingerprint() != load_config(REPO / "configs" / "tiny.yaml").fingerprint()


# ---- overrides ------------------------------------------------------------------------------------

def test_overrides_types():
    cfg = load_config(REPO / "configs" / "tiny.yaml", [
        "model.num_layers=8", "train.lr=3e-4", "train.min_lr=1.5e-5", "model.tie_word_embeddings=false",
        "zero.overlap_comm=true", "model.rope_theta=500000", "run.dir=/tmp/x y", "train.precision=fp32",
    ])
    assert cfg.model.num_layers == 8 and isinstance(cfg.model.num_layers, int)
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.min_lr == pytest.approx(1.5e-5)
    assert cfg.model.tie_word_embeddings is False
    assert cfg.zero.overlap_comm is True
    assert cfg.model.rope_theta == 500000.0
    assert cfg.run.dir == "/tmp/x y"
    assert cfg.train.precision == "fp32"
    # Untouched keys keep the file's values.
    assert cfg.model.hidden_size == 256 and cfg.model.num_kv_heads == 2


def test_overrides_win_over_file_and_later_wins(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  num_layers: 2\ntrain:\n  lr: 0.01\n  min_lr: 0.001\n")
    cfg = load_config(f, ["model.num_layers=5", "model.num_layers=6"])
    assert cfg.model.num_layers == 6
    assert cfg.train.lr == 0.01


def test_nested_override_into_deepspeed_mapping():
    tree = parse_overrides(["deepspeed.zero_optimization.stage=3", "deepspeed.steps_per_print=7", "model.num_layers=2"])
    assert tree == {"deepspeed": {"zero_optimization": {"stage": 3}, "steps_per_print": 7}, "model": {"num_layers": 2}}
    cfg = load_config(None, ["deepspeed.zero_optimization.round_robin_gradients=true", "deepspeed.flops_profiler.enabled=true"])
    assert cfg.deepspeed == {"zero_optimization": {"round_robin_gradients": True}, "flops_profiler": {"enabled": True}}
    # PyYAML (YAML 1.1) read 5e7 (no dot) as a string, which DeepSpeed's pydantic config refused deep inside initialize
    cfg = load_config(None, ["deepspeed.zero_optimization.stage3_prefetch_bucket_size=5e7", "deepspeed.x=[2.5e-1]"])
    assert cfg.deepspeed == {"zero_optimization": {"stage3_prefetch_bucket_size": 50_000_000}, "x": [0.25]}
    assert type(cfg.deepspeed["zero_optimization"]["stage3_prefetch_bucket_size"]) is int  # DeepSpeed hands some to C++
    with pytest.raises(UserError, match="deepspeed.prescale_gradients is the text 'off': write true or false"):
        load_config(None, ["deepspeed.prescale_gradients=off"])
    with pytest.raises(UserError, match="deepspeed.zero_optimization must be a mapping"):
        load_config(None, ["deepspeed.zero_optimization=3"])


@pytest.mark.parametrize("override,owned,ours", [
    ("deepspeed.zero_optimization.stage=1", "zero_optimization.stage", "zero.stage"),
    ("deepspeed.train_micro_batch_size_per_gpu=4", "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ("deepspeed.bf16.enabled=false", "bf16.enabled", "train.precision"),
    ("deepspeed.zero_optimization.offload_optimizer.device=cpu", "zero_optimization.offload_optimizer.device",
     "zero.offload_optimizer"),
    ("deepspeed.optimizer.type=Adam", "optimizer", "train.lr"),
    ("deepspeed.bfloat16.enabled=true", "bfloat16", "train.precision"),  # DeepSpeed's older spellings
    ("deepspeed.zero_optimization.cpu_offload=true", "zero_optimization.cpu_offload", "zero.offload_optimizer"),
])
def test_deepspeed_mapping_cannot_contradict_scaletrain_keys(override, owned, ours):
    """The manifest records zero.stage and resharding reads it: a ds_config saying otherwise is refused."""
    with pytest.raises(UserError) as exc:
        load_config(None, [override])
    msg = str(exc.value)
    assert "\n" not in msg and f"deepspeed.{owned} is set by scaletrain from {ours}" in msg


@pytest.mark.parametrize("bad", ["train.lr", "=3", "model..num_layers=2", ".x=1"])
def test_malformed_set(bad):
    with pytest.raises(UserError) as exc:
        parse_overrides([bad])
    assert "\n" not in str(exc.value) and bad in str(exc.value)


# ---- unknown keys and wrong types -------------------------------------------------------------------

def test_unknown_key_suggests_closest_full_name():
    msg = error_of(["model.hiden_size=64"])
    assert "'model.hiden_size'" in msg
    assert re.search(r"did you mean 'model\.hidden_size'", msg), msg


def test_unknown_section_suggests_closest():
    msg = error_of(["modle.hidden_size=64"])
    assert "'modle'" in msg and "did you mean 'model'" in msg, msg


def test_unknown_key_without_close_match_lists_valid_names():
    msg = error_of(["train.zzzzzzzzzz=1"])
    assert "train.zzzzzzzzzz" in msg and "seq_len" in msg, msg


def test_unknown_key_in_yaml_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("train:\n  learning_rate: 0.1\n")
    msg = error_of([], f)
    assert "train.learning_rate" in msg, msg


@pytest.mark.parametrize("override, key", [
    ("model.hidden_size=abc", "model.hidden_size"),
    ("model.hidden_size=1.5", "model.hidden_size"),
    ("train.lr=fast", "train.lr"),
    ("model.tie_word_embeddings=maybe", "model.tie_word_embeddings"),
    ("train.precision=fp8", "train.precision"),
    ("model.attention=magic", "model.attention"),
    ("zero.stage=4", "zero.stage"),
    ("model=3", "model"),
])
def test_wrong_type_names_key(override, key):
    msg = error_of([override])
    assert f"'{key}'" in msg, msg


# ---- impossible shapes and values -----------------------------------------------------------------

@pytest.mark.parametrize("overrides, key", [
    (["model.hidden_size=250", "model.num_heads=4"], "model.num_heads"),                       # not divisible
    (["model.num_heads=6", "model.num_kv_heads=4", "model.hidden_size=384"], "model.num_kv_heads"),  # 6 % 4
    (["train.seq_len=4096", "model.max_seq_len=2048"], "train.seq_len"),
    (["model.hidden_size=12", "model.num_heads=4", "model.num_kv_heads=4"], "model.num_heads"),   # head_dim 3: odd
    (["train.lr=1e-4", "train.min_lr=1e-3"], "train.min_lr"),
    (["train.lr=-3e-4"], "train.lr"),
    (["train.lr=0"], "train.lr"),
    (["train.seq_len=0"], "train.seq_len"),
    (["train.micro_batch_size=0"], "train.micro_batch_size"),
    (["model.num_layers=-1"], "model.num_layers"),
    (["model.vocab_size=8"], "model.vocab_size"),
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["zero.offload_param=cpu", "zero.stage=2"], "zero.offload_param"),
    (["zero.offload_optimizer=cpu", "zero.stage=0"], "zero.offload_optimizer"),
    (["growth.noise=.inf"], "growth.noise"),
    (["train.max_steps=50", "train.freeze=[layers.0-1]", "growth.schedule=[{at_step: 10, set: {model.num_layers: 8}}]"],
     "train.freeze layers.0-1"),
])
def test_impossible_values_give_one_line_naming_key(overrides, key):
    msg = error_of(overrides)
    assert key in msg, msg


def test_valid_edge_shapes_pass():
    cfg = load_config(None, ["model.hidden_size=384", "model.num_heads=6", "model.num_kv_heads=2",
                             "train.seq_len=2048", "model.max_seq_len=2048", "train.min_lr=3e-3", "train.lr=3e-3"])
    assert cfg.model.head_dim == 64


# ---- files ------------------------------------------------------------------------------------------

def test_yaml_syntax_error_names_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("model:\n  hidden_size: 64\n  num_heads: [4, 2\ntrain:\n  lr: 0.1\n")
    msg = error_of([], f)
    assert "broken.yaml" in msg
    line = int(re.search(r"line (\d+)", msg).group(1))
    assert line in (3, 4), msg  # the unclosed bracket opens on line 3; the parser notices on line 4


def test_yaml_bad_indent_names_line(tmp_path):
    f = tmp_path / "indent.yaml"
    f.write_text("model:\n  hidden_size: 64\n   num_heads: 4\n")
    msg = error_of([], f)
    assert re.search(r"line 3\b", msg), msg


def test_yaml_not_a_mapping(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- model\n- train\n")
    assert "mapping" in error_of([], f)


def test_empty_yaml_means_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("")
    assert load_config(f) == Config()


def test_missing_config_file(tmp_path):
    msg = error_of([], tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_config_path_is_directory(tmp_path):
    assert str(tmp_path) in error_of([], tmp_path)


# ---- DeepSpeed config --------------------------------------------------------------------------------

@pytest.mark.parametrize("micro, accum, world", [(8, 1, 1), (2, 4, 3), (1, 1, 8), (3, 2, 2)])
def test_ds_batch_sizes(micro, accum, world):
    cfg = load_config(None, [f"train.micro_batch_size={micro}", f"train.grad_accum={accum}"])
    ds = deepspeed_config(cfg, world)
    assert ds["train_batch_size"] == micro * accum * world == cfg.global_batch_windows(world)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum


def test_ds_precision_sections():
    bf16 = deepspeed_config(load_config(None, ["train.precision=bf16"]), 1)
    assert bf16["bf16"] == {"enabled": True} and "fp16" not in bf16
    fp16 = deepspeed_config(load_config(None, ["train.precision=fp16"]), 1)
    assert fp16["fp16"]["enabled"] is True and "bf16" not in fp16
    fp32 = deepspeed_config(load_config(None, ["train.precision=fp32"]), 1)
    assert "bf16" not in fp32 and "fp16" not in fp32


def test_ds_zero_and_offload():
    ds = deepspeed_config(load_config(None, ["zero.stage=1", "train.grad_clip=0.5"]), 2)
    z = ds["zero_optimization"]
    assert z["stage"] == 1 and "offload_optimizer" not in z and "offload_param" not in z
    assert ds["gradient_clipping"] == 0.5
    ds = deepspeed_config(load_config(None, ["zero.stage=3", "zero.offload_optimizer=cpu", "zero.offload_param=cpu"]), 2)
    z = ds["zero_optimization"]
    assert z["stage"] == 3
    assert z["offload_optimizer"] == {"device": "cpu"} and z["offload_param"] == {"device": "cpu"}


def test_ds_user_mapping_merged_last(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text(
        "train:\n  precision: bf16\n  micro_batch_size: 4\nzero:\n  stage: 2\n"
        "deepspeed:\n  zero_optimization:\n    round_robin_gradients: true\n    allgather_bucket_size: 1000\n"
        "  bf16:\n    immediate_grad_update: true\n  steps_per_print: 5\n  wall_clock_breakdown: true\n"
    )
    cfg = load_config(f, ["deepspeed.zero_optimization.allgather_bucket_size=2000"])
    ds = deepspeed_config(cfg, 2)
    z = ds["zero_optimization"]
    assert z["stage"] == 2 and z["allgather_bucket_size"] == 2000 and z["round_robin_gradients"] is True  # keys added
    assert z["contiguous_gradients"] is True and "reduce_bucket_size" in z  # generated keys kept (deep merge)
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds["steps_per_print"] == 5 and ds["wall_clock_breakdown"] is True  # user wins where scaletrain has no key
    assert ds["train_batch_size"] == 8
    # The config object itself is not mutated by generating ds_config.
    assert cfg.deepspeed["zero_optimization"] == {"round_robin_gradients": True, "allgather_bucket_size": 2000}
    assert deepspeed_config(cfg, 2) == ds


def test_whole_numbers_in_e_notation_and_an_empty_run_dir():
    """5e7 is a number (PyYAML alone reads it as a string); where the key is a whole number it is 50,000,000
    (as the README writes it). 5.5e0 is not whole: refused. An empty run.dir (an unset shell variable) would train into the cwd."""
    cfg = load_config(None, ["zero.reduce_bucket_size=5e7", "train.max_steps=1e3", "model.attention_window=1E2"])
    assert (cfg.zero.reduce_bucket_size, cfg.train.max_steps, cfg.model.attention_window) == (50_000_000, 1000, 100)
    for bad, needle in [("zero.reduce_bucket_size=5.5e0", "zero.reduce_bucket_size"), ("run.dir=", "run.dir")]:
        with pytest.raises(UserError) as exc:
            load_config(None, [bad])
        assert needle in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("sets, words", [
    (["train.lr=.inf"], "finite number"),  # every step skipped, and the run "finished"
    (["model.rope_theta=.nan"], "finite number"),
    (["train.seed=18446744073709551616"], "train.seed"),  # torch.manual_seed overflowed after data preparation
    (["train.keep_every=3", "train.save_every=2"], "multiple of train.save_every"),  # milestone 3 was never saved
    (["train.keep_every=4", "train.save_every=0"], "multiple of train.save_every"),
    (["train.early_stop_patience=2", "data.val_fraction=0"], "needs a validation split"),  # stopped nothing, silently
    (["train.freeze=[embeddings,layers.0-3,norm]"], "covers every parameter"),  # tiny.yaml ties: the head too
])
def test_settings_that_trained_something_else_silently_are_refused(sets, words):
    with pytest.raises(UserError, match=words):
        load_config("configs/tiny.yaml", sets)


def test_a_key_written_twice_in_a_config_file_is_refused(tmp_path):
    """YAML keeps the last of two equal keys: a `model:` section appended at the end replaced the whole first one."""
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  hidden_size: 768\n  num_heads: 12\ntrain:\n  max_steps: 10\nmodel:\n  num_layers: 16\n")
    with pytest.raises(UserError, match="'model' appears twice in one mapping \\(first at line 1\\)"):
        load_config(str(p), [])
    assert load_config("configs/tiny.yaml", ["train.freeze=[embeddings,layers.0-2,norm]"]).train.freeze  # one layer left


def test_growing_a_model_without_rope_allows_an_odd_head_size():
    """The even head size is RoPE's need (it rotates pairs); a NoPE or ALiBi model with head size 15 trains, and
    its growth schedule was refused all the same."""
    cfg = load_config("configs/tiny.yaml", ["model.position=none", "model.hidden_size=60", "model.num_heads=4",
                                            "model.num_kv_heads=2", "growth.schedule=[{at_step: 10, set: {model.num_layers: 6}}]"])
    assert cfg.growth.schedule[0].at_step == 10


def test_saved_configs_keep_loading_under_the_newer_rules(tmp_path):
    """The rules for configs users give (keep_every on the save grid, ...) are not applied to a run's saved
    config.yaml: a run that trained before them must still resume, evaluate and export."""
    cfg = load_config("configs/tiny.yaml", [])
    tree = cfg.to_dict()
    tree["train"].update(save_every=100, keep_every=250, early_stop_patience=2)
    tree["data"]["val_fraction"] = 0.0
    assert build_config(tree).train.keep_every == 250
    p = tmp_path / "old.yaml"
    p.write_text(yaml.safe_dump(tree))
    with pytest.raises(UserError, match="multiple of train.save_every"):
        load_config(str(p), [])  # given again as a config to run with: told what to fix


def test_yaml_merge_keys_still_work_and_may_be_overridden(tmp_path):
    p = tmp_path / "m.yaml"
    p.write_text("growth:\n  schedule:\n    - &grow {at_step: 100, depth_method: stack, set: {model.num_layers: 6}}\n"
                 "    - <<: *grow\n      at_step: 200\n      set: {model.num_layers: 8}\n")
    stages = load_config(str(p), []).growth.schedule
    assert [(s.at_step, s.depth_method, s.set) for s in stages] == [(100, "stack", {"model.num_layers": 6}),
                                                                   (200, "stack", {"model.num_layers": 8})]


def test_plain_scalars_mean_what_they_show(tmp_path):
    """YAML 1.2's core schema, not PyYAML's 1.1: 0100 is not octal 64, `no` is not false, 1:30 is not 90 and a
    date stays a name; and a number written true/false is refused, not read as 1."""
    cfg = load_config(None, ["train.max_steps=0100", "run.dir=no", "train.seed=1_000", "train.lr=3e-4"])
    assert (cfg.train.max_steps, cfg.run.dir, cfg.train.seed, cfg.train.lr) == (100, "no", 1000, 3e-4)
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  dir: 2026-12-07\ntrain:\n  max_steps: 0o17\n  compile: true\n")
    cfg = load_config(f)
    assert (cfg.run.dir, cfg.train.max_steps, cfg.train.compile) == ("2026-12-07", 15, True)
    assert parse_overrides(["a.b=1:30", "a.c=off", "a.d=.5", "a.e=null"])["a"] == {"b": "1:30", "c": "off", "d": 0.5, "e": None}
    saved = tmp_path / "saved.yaml"  # strings that read as numbers in either YAML are written quoted
    save_config(load_config(None, ["run.dir='5e7'", "data.source='0o17'"]), saved)
    assert (load_config(saved).run.dir, load_config(saved).data.source) == ("5e7", "0o17")
    assert parse_overrides(["a.b=0o_"])["a"]["b"] == "0o_"  # no digits after the prefix: text, not a crash
    for bad in ["train.compile=off", "model.tie_word_embeddings=1", "growth.insert=[1, true]"]:  # switches: true/false
        with pytest.raises(UserError) as exc:
            load_config(None, [bad])
        assert bad.split("=")[0] in str(exc.value) and "true" in str(exc.value), exc.value
    for bad in ["train.max_steps=true", "train.lr=false"]:
        with pytest.raises(UserError) as exc:
            load_config(None, [bad])
        assert bad.split("=")[0] in str(exc.value) and "true/false" in str(exc.value), exc.value


@pytest.mark.parametrize("value", ["!!int 0b11", "!!int 1:30", "!!float abc", "!!timestamp 2020-01-01", "!!binary aGk="])
def test_explicit_tags_that_cannot_hold_are_one_line(tmp_path, value):
    """int() and float() raised ValueError out of the loader (a traceback); a date or bytes in the deepspeed:
    mapping passed validation and the run died writing ds_config.json."""
    f = tmp_path / "c.yaml"
    f.write_text(f"train:\n  seed: {value}\n")
    with pytest.raises(UserError, match="not valid YAML at line 2"):
        load_config(f)
    with pytest.raises(UserError):  # --set: not YAML, so the text itself, which is no seed
        load_config(None, [f"train.seed={value}"])
    assert load_config(None, [f"deepspeed.x={value}"]).deepspeed["x"] == value  # text: JSON can hold it
