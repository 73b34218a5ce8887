"""data.mix: several sources in fixed proportions. The sampler's draws (exact shares, each source's own stream
order, the same windows however the stream is cut into calls), the caches (one shared tokenizer, reused, a
missing part named), the config rules, and training: val/<name>/loss per source, and 1 rank x 2 accumulated
micro-batches equal to 2 ranks (the mixture's data position is one integer, like a single source's)."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from launch_utils import TINY, run_cli, run_training, tb_scalars
from scaletrain.config import load_config
from scaletrain.data.mix_rules import BLOCK, block_counts
from scaletrain.data.mixture import MixtureStream
from scaletrain.data.cache import find_cache, open_cache, prepare_data
from scaletrain.data.sampler import WindowStream
from scaletrain.errors import UserError

STDLIB = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _corpus(dest: Path, files: list[Path]) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for p in files:
        shutil.copyfile(p, dest / (p.stem + ".txt"))
    return dest


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mix")
    return _corpus(root / "prose", STDLIB[:20]), _corpus(root / "code", STDLIB[20:45])


def _mix(prose: Path, code: Path, w1: float = 3, w2: float = 1) -> str:
    return f"data.mix=[{{source: {prose}, weight: {w1}}}, {{source: {code}, weight: {w2}, name: code}}]"


def test_block_counts_are_the_weights_in_4096ths():
    assert block_counts([3, 1]) == [3072, 1024]
    counts = block_counts([1, 1, 1])
    assert sum(counts) == BLOCK and max(counts) - min(counts) == 1
    assert block_counts([1e308, 1e308]) == [2048, 2048]  # (their sum is inf: it said "cannot convert float NaN")


def test_draws_keep_the_shares_and_each_source_s_own_order():
    a = WindowStream(np.arange(10_000) % 500, 8, seed=1)   # 1,249 windows
    b = WindowStream(np.arange(801) % 500, 8, seed=2)      # 100 windows: repeated in epochs
    mix = MixtureStream([("a", 0.7, a), ("b", 0.3, b)], seed=5)
    ids = mix.window_ids(0, 3 * BLOCK)
    from_b = ids >= a.num_windows
    counts = block_counts([0.7, 0.3])
    for blk in range(3):
        assert int(from_b[blk * BLOCK:(blk + 1) * BLOCK].sum()) == counts[1]
    # the k-th window a source gives is the k-th of its own stream
    assert np.array_equal(ids[~from_b], a.window_ids(0, int((~from_b).sum())))
    assert np.array_equal(ids[from_b] - a.num_windows, b.window_ids(0, int(from_b.sum())))
    # any cut of the stream into calls (ranks, micro-batches, a resume) gives the same windows
    again = MixtureStream([("a", 0.7, a), ("b", 0.3, b)], seed=5)
    pieces = [again.window_ids(s, n) for s, n in ((0, 5), (5, BLOCK - 1), (BLOCK + 4, 2 * BLOCK - 4))]
    assert np.array_equal(np.concatenate(pieces), ids)
    assert not np.array_equal(MixtureStream([("a", 0.7, a), ("b", 0.3, b)], seed=6).window_ids(0, 64), ids[:64])
    x, y = mix.batch(ids[:6])
    for row, w in zip(x, ids[:6]):
        part, local = (a, w) if w < a.num_windows else (b, w - a.num_windows)
        assert row.tolist() == part.batch(np.array([local]))[0][0].tolist()
    assert y.shape == x.shape == (6, 8)


def test_phases_change_the_shares_and_each_source_carries_on_where_it_was():
    a = WindowStream(np.arange(20_000) % 500, 8, seed=1)
    b = WindowStream(np.arange(4_001) % 500, 8, seed=2)
    c = WindowStream(np.arange(4_001) % 500, 8, seed=3)
    first, second = BLOCK + 1000, 2 * BLOCK + 1500  # boundaries inside blocks
    phases = [(0, [2, 1, 1]), (first, [1, 0, 3]), (second, [1, 1, 1])]
    mix = MixtureStream([("a", 2, a), ("b", 1, b), ("c", 1, c)], seed=5, phases=phases)
    ids = mix.window_ids(0, second + 2 * BLOCK)
    part = np.searchsorted(mix.offsets, ids, side="right") - 1
    assert np.bincount(part[:BLOCK], minlength=3).tolist() == block_counts([2, 1, 1])
    in_second = part[first:first + BLOCK]
    assert np.bincount(in_second, minlength=3).tolist() == block_counts([1, 0, 3])  # b left out
    assert np.bincount(part[second:second + BLOCK], minlength=3).tolist() == block_counts([1, 1, 1])
    for s, stream in enumerate((a, b, c)):  # each source's k-th draw is its stream's k-th window, across phases
        mine = ids[part == s] - mix.offsets[s]
        assert np.array_equal(mine, stream.window_ids(0, len(mine)))
    # the first phase is the stream without phases; any cut into calls gives the same windows
    plain = MixtureStream([("a", 2, a), ("b", 1, b), ("c", 1, c)], seed=5)
    assert np.array_equal(plain.window_ids(0, first), ids[:first])
    again = MixtureStream([("a", 2, a), ("b", 1, b), ("c", 1, c)], seed=5, phases=phases)
    assert np.array_equal(np.concatenate([again.window_ids(second + 7, 50), again.window_ids(first - 3, 10)]),
                          np.concatenate([ids[second + 7:second + 57], ids[first - 3:first + 7]]))


def test_caches_share_one_tokenizer_and_are_reused(corpora, tmp_path):
    prose, code = corpora
    cfg = load_config(None, [_mix(prose, code), f"data.cache_dir={tmp_path}", "model.vocab_size=512"])
    cache = prepare_data(cfg, progress=False)
    assert cache.dir.name.startswith("mix-") and [p.dir.parent for p in cache.parts] == [tmp_path, tmp_path]
    assert len({p.meta["tokenizer_sha256"] for p in cache.parts} | {cache.meta["tokenizer_sha256"]}) == 1
    assert cache.meta["tokens"]["train"] == sum(p.meta["tokens"]["train"] for p in cache.parts)
    assert [m["name"] for m in cache.meta["mixture"]] == ["prose", "code"]
    stamp = (cache.dir / "meta.json").stat().st_mtime_ns
    again = open_cache(find_cache(cfg))
    assert again.dir == cache.dir and (cache.dir / "meta.json").stat().st_mtime_ns == stamp
    assert prepare_data(cfg, progress=False).dir == cache.dir
    other = load_config(None, [_mix(prose, code, 1, 1), f"data.cache_dir={tmp_path}", "model.vocab_size=512"])
    assert find_cache(other) != cache.dir  # weights are part of the mixture's name (its parts are shared)
    assert [p.dir for p in prepare_data(other, progress=False).parts] == [p.dir for p in cache.parts]
    shutil.rmtree(cache.parts[1].dir)
    with pytest.raises(UserError, match=r"names part code in .*missing; delete the mixture's directory"):
        open_cache(cache.dir)


def test_the_tokenizer_is_trained_once_per_set_of_sources(corpora, tmp_path):
    """A sample larger than the line budget: the list's order chose other lines, so reordering trained another
    tokenizer and re-tokenised every source; new weights read every source again to train the same one."""
    prose, code = corpora
    small = ["model.vocab_size=512", "data.tokenizer_sample_lines=3000", f"data.cache_dir={tmp_path}"]
    first = prepare_data(load_config(None, [_mix(prose, code), *small]), progress=False)
    trained = sorted(tmp_path.glob("mixtok-*/tokenizer.model"))
    assert len(trained) == 1
    stamp = trained[0].stat().st_mtime_ns
    reordered = f"data.mix=[{{source: {code}, weight: 1, name: code}}, {{source: {prose}, weight: 3}}]"
    again = prepare_data(load_config(None, [reordered, *small]), progress=False)
    assert sorted(p.dir for p in again.parts) == sorted(p.dir for p in first.parts)
    prepare_data(load_config(None, [_mix(prose, code, 5, 1), *small]), progress=False)
    assert sorted(tmp_path.glob("mixtok-*/tokenizer.model")) == trained and trained[0].stat().st_mtime_ns == stamp
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file; set data.cache_dir to a directory"):
        prepare_data(load_config(None, [_mix(prose, code), "model.vocab_size=512", f"data.cache_dir={tmp_path / 'afile'}"]),
                     progress=False)


def test_the_model_card_names_a_mixture_s_sources():
    from scaletrain.hf.model_card import _data_sources

    mix = [{"source": "/d/web", "weight": 7.0, "name": None}, {"source": "/d/code", "weight": 2.0, "name": "code"}]
    assert _data_sources({"mix": mix}) == "mixture of /d/web ×7, code ×2"
    assert _data_sources({"source": "stdlib"}) == "stdlib" and _data_sources({}) == "n/a"


@pytest.mark.parametrize("sets, message", [
    (["data.source=/x"], "set data.source or data.mix, not both"),
    (["data.format=prompt_completion"], "data.mix mixes running text"),
    (["data.mix=[{source: /a/web, weight: 1}, {source: /b/web, weight: 1}]"], "two sources named 'web'"),
    (["data.mix=[{source: /a, weight: 10000}, {source: /b, weight: 1}]"], "below 1/4096 of the total"),
    (["data.mix=[{source: /a, weight: 1, name: 'a b'}]"], "must be letters, digits"),
    (["data.mix=[{source: /a, weight: 0}]"], "weight"),
    (["data.mix_phases=[{at_step: 5, weights: {web: 2}}]", "data.mix=[]"], "set data.mix too"),
    (["data.mix_phases=[{at_step: 5, weights: {blog: 2}}]"], "names 'blog', which is no data.mix source"),
    (["data.mix_phases=[{at_step: 9, weights: {web: 2}}, {at_step: 5, weights: {web: 1}}]"], "must rise"),
    (["data.mix_phases=[{at_step: 5, weights: {web: 0}}]"], "leaves no source with a weight above 0"),
    (["data.mix_phases=[{at_step: 5, weights: {web: -1}}]"], "weights must be >= 0"),
])
def test_config_rules(sets, message):
    base = ["data.mix=[{source: /a/web, weight: 1}]"] if not any(s.startswith("data.mix=") for s in sets) else []
    with pytest.raises(UserError, match=message):
        load_config(None, [*base, *sets])


@pytest.mark.slow
def test_training_reports_each_source_and_ranks_do_not_change_the_batches(corpora, tmp_path):
    prose, code = corpora
    tiny = _corpus(tmp_path / "tiny", STDLIB[45:46])  # one document: no val window, left out of val/loss (a note says so)
    mix = _mix(prose, code)[:-1] + f", {{source: {tiny}, weight: 1}}]"
    phases = "data.mix_phases=[{at_step: 2, weights: {code: 0, prose: 1}}]"  # steps 3-4: prose and tiny only
    common = [*TINY, mix, phases, f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=4",
              "train.eval_every=2", "train.precision=fp32", "train.save_every=0"]
    one = tmp_path / "one"
    out = run_training(1, [*common, f"run.dir={one}", "train.grad_accum=2", "train.micro_batch_size=1"]).stdout
    assert "| prose " in out and "| code " in out  # the val line names each source's loss
    assert "note: val/loss leaves out data.mix source(s) tiny" in out
    assert "data.mix weights from step 3: prose 1, code 0, tiny 1" in out
    parts = {n: tb_scalars(one, f"val/{n}/loss") for n in ("prose", "code")}
    total = tb_scalars(one, "val/loss")
    assert sorted(total) == [2, 4]
    for step in total:
        assert total[step] == pytest.approx((3 * parts["prose"][step] + parts["code"][step]) / 4, rel=1e-6)
        assert math.isfinite(parts["code"][step])
    rc, out, err = run_cli("eval", str(one), "--json")  # the same per-source scores, on the whole val splits
    assert rc == 0, err[-2000:]
    res = json.loads(out)
    assert sorted(res["sources"]) == ["code", "prose"]
    assert res["loss"] == pytest.approx((3 * res["sources"]["prose"]["loss"] + res["sources"]["code"]["loss"]) / 4)
    two = tmp_path / "two"
    run_training(2, [*common, f"run.dir={two}", "train.grad_accum=1", "train.micro_batch_size=1"])
    want, got = tb_scalars(one, "train/loss"), tb_scalars(two, "train/loss")
    assert sorted(got) == [1, 2, 3, 4]
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-5), f"step {step}"
    # a resume warns when the phases already passed differ, not when a later one moves (with max_steps, say)
    later = [a for a in common if not a.startswith(("data.mix_phases", "train.max_steps"))]
    one_args = [*later, f"run.dir={one}", "train.grad_accum=2", "train.micro_batch_size=1"]
    out = run_training(1, [*one_args, "train.max_steps=6", "data.mix_phases=[{at_step: 2, weights: {code: 0, prose: 1}}, "
                                                          "{at_step: 5, weights: {code: 1}}]"]).stdout
    assert "warning: data.mix_phases" not in out and "data.mix weights from step 6: prose 1, code 1, tiny 1" in out
    assert out.count("data.mix weights from step 3: prose 1, code 0, tiny 1") == 1  # resumed at 4: said at the start
    out = run_training(1, [*one_args, "train.max_steps=8", "data.mix_phases=[{at_step: 3, weights: {code: 0, prose: 1}}]"]).stdout
    assert "warning: data.mix_phases was" in out, out[-2000:]  # steps 3-6 trained on other weights than it says
