"""scripts/ablate.py end to end on a tiny budget: two real variants at equal FLOPs, the table/JSON/plot, reuse
of finished runs of the same request, and refusal of run dirs made by another request."""

import json
import sys

import pytest
import yaml

from launch_utils import REPO, small_corpus

sys.path.insert(0, str(REPO / "scripts"))
import ablate  # noqa: E402

pytestmark = pytest.mark.slow


def test_two_variants_at_equal_flops_then_reuse_and_refusal(tmp_path, capsys):
    corpus = small_corpus(tmp_path / "corpus")
    spec = {"base": "configs/tiny.yaml", "evals": 2, "flops": 5e8,
            "set": ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.num_kv_heads=1",
                    "model.intermediate_size=64", "model.vocab_size=512", "train.seq_len=32", "train.micro_batch_size=2",
                    "train.eval_batches=1", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"],
            "variants": [{"name": "llama", "set": []}, {"name": "layernorm", "set": ["model.norm=layernorm"]}]}
    cfg = tmp_path / "spec.yaml"
    cfg.write_text(yaml.safe_dump(spec))
    out, runs = tmp_path / "out" / "abl", tmp_path / "runs"
    argv = ["--config", str(cfg), "--out", str(out), "--runs", str(runs)]
    assert ablate.main(argv) == 0
    res = json.loads(out.with_suffix(".json").read_text())
    rows = {r["name"]: r for r in res["variants"]}
    assert set(rows) == {"llama", "layernorm"} and out.with_suffix(".png").stat().st_size > 0
    for r in rows.values():  # each spends the budget to within one step, and its curve ends at its last step
        step_flops = r["train_flops"] / r["steps"]
        assert spec["flops"] - step_flops < r["train_flops"] <= spec["flops"]
        assert r["curve"][-1][0] == pytest.approx(r["train_flops"]) and r["val_loss"] == r["curve"][-1][1]
    assert "| layernorm | `model.norm=layernorm` |" in out.with_suffix(".md").read_text()
    before = {p: p.stat().st_mtime for p in runs.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert ablate.main(argv) == 0  # the same request: both finished runs are reused, nothing re-trained
    assert "steps x" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime for p in runs.rglob("*") if p.is_file()} == before
    with pytest.raises(SystemExit, match="holds a run of another request"):
        ablate.main([*argv, "--flops", "1e9"])  # another budget must not reuse or resume those runs
