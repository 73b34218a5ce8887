"""scripts/growth_vs_scratch.py end to end on a tiny budget: three real runs, growth inside two of them, the
FLOPs bookkeeping and the reach-the-target interpolation."""

import json
import math
import sys

import pytest

from launch_utils import REPO, small_corpus

sys.path.insert(0, str(REPO / "scripts"))
import growth_vs_scratch as gvs  # noqa: E402


def test_first_reach_interpolates_between_evaluations():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 3.0)]
    assert gvs.first_reach(pts, 3.5) == pytest.approx(2.5)
    assert gvs.first_reach(pts, 5.0) == 1.0     # reached at the first evaluation
    assert gvs.first_reach(pts, 2.0) is None    # never reached


@pytest.mark.slow
def test_script_runs_grows_and_reports_ratios(tmp_path):
    corpus = small_corpus(tmp_path / "corpus")
    out, png = tmp_path / "gvs", tmp_path / "gvs.png"
    rc = gvs.main(["--out", str(out), "--png", str(png), "--steps", "16", "--grow-at", "8", "--variants", "depth,width",
                   "--seq-len", "32", "--batch", "2", "--warmup", "2", "--rewarmup", "2", "--eval-every", "4",
                   "--eval-batches", "1", "--set", f"data.source={corpus}", f"data.cache_dir={tmp_path / 'cache'}"])
    assert rc == 0 and png.stat().st_size > 0
    res = json.loads((out / "growth_vs_scratch.json").read_text())
    r = res["results"]
    assert set(r) == {"scratch", "depth", "width"} and r["scratch"]["ratio_flops"] == 1.0
    # Same compute for every run (up to one child step), cheaper parent steps bought extra child steps.
    child_step = r["scratch"]["total_flops"] / 16
    for v in ("depth", "width"):
        assert abs(r[v]["total_flops"] - r["scratch"]["total_flops"]) <= child_step
        steps = [p["step"] for p in res["curves"][v]]
        assert steps[-1] > 16
        assert r[v]["ratio_flops"] is None or math.isclose(r[v]["ratio_flops"], r["scratch"]["flops"] / r[v]["flops"])
    # The growth really happened inside the grown runs (the trainer logs the parameter count per shape).
    assert "grew to stage 1" in (out / "depth.log").read_text()
