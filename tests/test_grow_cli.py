"""`scaletrain grow`: function preservation checked through transformers (an independent Llama), streaming
output layout, lineage, optimizer moments, bad input.

Parents are random-weight Hugging Face Llama dirs (an "imported HF model"); parent and child logits both come
from `transformers.LlamaForCausalLM`, so our model code is not the judge of our growth code.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from launch_utils import run_cli
from scaletrain.growth.check import sample_windows
from scaletrain.growth.offline import child_model_config, grow_checkpoint
from scaletrain.growth.parent import open_parent
from scaletrain.growth.plan import GrowthSpec

VOCAB = 97
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def hf_parent(d: Path, hidden, heads, kv, ffn, layers, tied, seed=0) -> Path:
    """A random HF Llama saved as safetensors; weights large enough that logits are O(1..10), random norm gains."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=64,
                      tie_word_embeddings=tied, initializer_range=0.08, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(seed)
    m = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    m.save_pretrained(d, safe_serialization=True)
    return d


def hf_logits(ckpt: Path, x: torch.Tensor) -> torch.Tensor:
    """Logits of a checkpoint dir (ours or HF) computed by transformers from its safetensors."""
    from safetensors.torch import load_file

    from scaletrain.hf.arch_map import transformers_model
    from scaletrain.weights import open_weights

    src = open_weights(ckpt)
    model = transformers_model(src.model).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    state = {}
    for f in sorted(ckpt.glob("model*.safetensors")):
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    if src.model.tie_word_embeddings:
        model.tie_weights()
    with torch.no_grad():
        return model(x).logits.float()


ARCHS = {  # parent (hidden, heads, kv, ffn, layers), width-grown child
    "mha": ((64, 4, 4, 160, 2), dict(hidden_size=128, num_heads=8, num_kv_heads=8, intermediate_size=320)),
    "gqa": ((96, 6, 2, 160, 2), dict(hidden_size=192, num_heads=12, num_kv_heads=4, intermediate_size=320)),
}


@pytest.fixture(scope="module")
def parents(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("parents")
    return {(arch, tied): hf_parent(root / f"{arch}-{tied}", *dims, tied, seed=3)
            for arch, (dims, _) in ARCHS.items() for tied in (True, False)}


@pytest.mark.parametrize("noise", [0.0, 0.1])
@pytest.mark.parametrize("grown", ["width", "depth", "both"])
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("arch", ["mha", "gqa"])
def test_child_logits_equal_parent_in_transformers(parents, tmp_path, arch, tied, grown, noise):
    parent_dir = parents[(arch, tied)]
    overrides = {}
    if grown in ("width", "both"):
        overrides.update(ARCHS[arch][1])
    if grown in ("depth", "both"):
        overrides["num_layers"] = 4
    parent = open_parent(parent_dir)
    child = child_model_config(parent.model, overrides)
    x, y, desc = sample_windows(None, 2, 24, VOCAB, seed=1)
    out = tmp_path / "child"
    rec = grow_checkpoint(parent, out, child, GrowthSpec(noise_std=noise, insert="interleave", seed=5), sample=(x, y, desc),
                          progress=False)
    a, b = hf_logits(parent_dir, x), hf_logits(out, x)
    assert a.abs().max() > 1.0  # not a vacuous comparison
    assert (a - b).abs().max().item() <= TOL
    check = rec["grow"]["check"]  # our own streamed check agrees with the oracle
    assert check["max_abs_dlogits"] <= TOL and abs(check["parent_loss"] - check["child_loss"]) <= 1e-5
    assert rec["kind"] == "grow" and rec["grow"]["exact"] and rec["grow"]["noise"] == noise
    if noise and grown != "depth":  # noise really changed the copies (symmetry broken), function kept
        plain = tmp_path / "plain"
        grow_checkpoint(open_parent(parent_dir), plain, child, GrowthSpec(insert="interleave", seed=5), progress=False)
        name = "model.layers.0.mlp.down_proj.weight"
        assert not torch.equal(_tensor(out, name), _tensor(plain, name))


def _tensor(ckpt: Path, name: str) -> torch.Tensor:
    from scaletrain.weights.files import FileReader
    from scaletrain.weights.files import weight_files

    return FileReader(weight_files(ckpt), False).read(name)


def test_non_integer_width_is_exact_and_stack_is_not(parents, tmp_path):
    parent_dir = parents[("gqa", False)]
    x, y, desc = sample_windows(None, 2, 24, VOCAB, seed=1)
    parent = open_parent(parent_dir)
    child = child_model_config(parent.model, dict(hidden_size=144, num_heads=9, num_kv_heads=3, intermediate_size=250))
    grow_checkpoint(parent, tmp_path / "odd", child, GrowthSpec(noise_std=0.1), progress=False)
    assert (hf_logits(parent_dir, x) - hf_logits(tmp_path / "odd", x)).abs().max().item() <= TOL
    deep = child_model_config(parent.model, dict(num_layers=4))
    rec = grow_checkpoint(open_parent(parent_dir), tmp_path / "stack", deep, GrowthSpec(depth_method="stack"),
                          sample=(x, y, desc), progress=False)
    assert not rec["grow"]["exact"] and rec["grow"]["check"]["max_abs_dlogits"] > 1e-3
    assert [layer["parent"] for layer in rec["grow"]["operators"]["layers"]] == [0, 1, 0, 1]


def test_cli_streams_shards_and_writes_lineage(cli, parents, tmp_path):
    out = tmp_path / "child"
    rc, stdout, stderr = cli("grow", str(parents[("gqa", True)]), "--out", str(out), "--set", "model.num_layers=4",
                             "model.hidden_size=192", "model.num_heads=12", "model.num_kv_heads=4",
                             "--noise", "0.1", "--max-shard-size", "100KB", "--seed", "7")
    assert rc == 0, stderr
    assert "exact" in stdout and "max |dlogits|" in stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded, streamed shard by shard
    rec = json.loads((out / "lineage.json").read_text())
    assert rec["kind"] == "grow" and rec["parents"][0]["path"] == str(parents[("gqa", True)].resolve())
    assert rec["grow"]["factors"]["hidden_size"] == 2.0 and rec["grow"]["noise"] == 0.1 and rec["grow"]["seed"] == 7
    assert rec["grow"]["check"]["max_abs_dlogits"] <= TOL
    assert rec["config_diff"]["model.num_layers"] == [2, 4]
    assert not list(tmp_path.glob(".child.tmp-*"))


BAD_INPUT = [
    (["--set", "model.hidden_size=32"], "cannot shrink hidden_size"),
    (["--set", "model.num_heads=5"], "must be divisible"),
    (["--set", "model.hidden_size=128", "model.num_heads=6", "model.num_kv_heads=6"], "must be divisible"),
    (["--set", "model.vocab_size=128"], "vocab"),
    (["--set", "model.num_layers=4", "--depth-method", "zigzag"], "invalid choice"),
    (["--set", "model.num_layers=4", "--insert", "up"], "--insert"),
    (["--set", "model.num_layerz=4"], "did you mean 'model.num_layers'"),
    (["--set", "train.lr=1"], "model.KEY=VALUE"),
    (["--set", "model.num_layers=4", "--optimizer", "grow"], "optimizer state"),
    (["--set", "model=5"], "model.KEY=VALUE"),
    (["--set", "model.num_layers=4", "--noise", "inf"], "finite number"),
]


@pytest.fixture(scope="module")
def bad_input_runs(parents, tmp_path_factory) -> list:
    """Every bad-input case, four CLI processes at a time (each is mostly interpreter and torch start-up):
    futures of (exit code, stderr, what its otherwise empty dir holds afterwards)."""
    roots = [tmp_path_factory.mktemp(f"bad{i}") for i in range(len(BAD_INPUT))]

    def one(root: Path, args: list[str]) -> tuple:
        rc, _, stderr = run_cli("grow", str(parents[("mha", True)]), "--out", str(root / "child"), *args)
        return rc, stderr, sorted(p.name for p in root.iterdir())

    with ThreadPoolExecutor(max_workers=4) as pool:
        return [pool.submit(one, root, args) for root, (args, _) in zip(roots, BAD_INPUT)]


@pytest.mark.parametrize("case", range(len(BAD_INPUT)), ids=[m for _, m in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_nothing_written(bad_input_runs, case):
    rc, stderr, left = bad_input_runs[case].result()
    message = BAD_INPUT[case][1]
    assert rc == 2, stderr
    assert message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert left == []


def test_existing_out_is_refused(cli, parents, tmp_path):
    out = tmp_path / "child"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, _, stderr = cli("grow", str(parents[("mha", True)]), "--out", str(out), "--set", "model.num_layers=4")
    assert rc == 2 and "already exists" in stderr and len(stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_a_child_grown_with_its_moments_grows_again_with_them(parents, tmp_path):
    """`--optimizer grow` from a grown child: the moments it carries (optimizer/) are read like a DeepSpeed
    parent's. Depth growth keeps every existing tensor's moments (scale 1) and starts new blocks at zero."""
    from safetensors.torch import load_file, save_file

    child = tmp_path / "child"
    grow_checkpoint(open_parent(parents[("mha", True)]), child, child_model_config(open_parent(parents[("mha", True)]).model,
                    {"num_layers": 3}), GrowthSpec(), progress=False)
    weights = {}
    for f in child.glob("model*.safetensors"):
        weights.update(load_file(f))
    torch.manual_seed(3)
    for kind in ("exp_avg", "exp_avg_sq"):  # stand-ins for the moments `--optimizer grow` would have written
        (child / "optimizer" / kind).mkdir(parents=True)
        save_file({n: torch.rand_like(t, dtype=torch.float32) for n, t in weights.items()},
                  child / "optimizer" / kind / "model.safetensors")
    (child / "optimizer" / "state.json").write_text(json.dumps({"adam_step": 11}))

    parent = open_parent(child)
    assert parent.moments is not None and parent.moments.adam_step == 11
    grandchild = tmp_path / "grandchild"
    grow_checkpoint(parent, grandchild, child_model_config(parent.model, {"num_layers": 5}), GrowthSpec(),
                    optimizer="grow", progress=False)
    assert json.loads((grandchild / "optimizer" / "state.json").read_text()) == {"adam_step": 11}
    for kind in ("exp_avg", "exp_avg_sq"):
        before = load_file(child / "optimizer" / kind / "model.safetensors")
        after = {}
        for f in (grandchild / "optimizer" / kind).glob("*.safetensors"):
            after.update(load_file(f))
        for name, value in before.items():
            assert torch.equal(after[name], value), name
        new = [n for n in after if n.startswith(("model.layers.3.", "model.layers.4."))]
        assert new and all(not after[n].any() for n in new)


def test_a_damaged_checkpoint_dir_is_refused_in_one_line(cli, parents, tmp_path):
    """grow and import-hf outputs carry a manifest of their weights: a flipped bit in a grown child was loaded
    silently (eval gave a loss of 1e36; export-hf vouched for it with the parent's lineage). Without the
    manifest (older dirs, or deleted on purpose) the files are used as they are."""
    imported, child = tmp_path / "imported", tmp_path / "child"
    assert cli("import-hf", str(parents[("mha", False)]), "--out", str(imported))[0] == 0
    assert set(json.loads((imported / "manifest.json").read_text())["files"]) == {"model.safetensors"}
    rc, _, stderr = cli("grow", str(imported), "--out", str(child), "--set", "model.num_layers=3")
    assert rc == 0, stderr
    assert set(json.loads((child / "manifest.json").read_text())["files"]) == {"model.safetensors"}
    weights = child / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x40  # one bit of the last tensor's values
    weights.write_bytes(data)
    for args in (["export-hf", str(child), "--out", str(tmp_path / "hf")],
                 ["grow", str(child), "--out", str(tmp_path / "g2"), "--set", "model.num_layers=4"]):
        rc, _, stderr = cli(*args)
        assert rc == 2 and "does not match its sha256" in stderr and len(stderr.strip().splitlines()) == 1, (args, stderr)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "g2").exists()
    (child / "manifest.json").unlink()
    rc, _, stderr = cli("grow", str(child), "--out", str(tmp_path / "g2"), "--set", "model.num_layers=4")
    assert rc == 0, stderr
    (child / "optimizer").mkdir()
    (child / "optimizer" / "state.json").write_text('{"adam_step": "x"}')  # was a ValueError traceback
    rc, _, stderr = cli("grow", str(child), "--out", str(tmp_path / "g3"), "--set", "model.num_layers=4", "--optimizer", "grow")
    assert rc == 2 and "state.json cannot be read" in stderr and len(stderr.strip().splitlines()) == 1, stderr
