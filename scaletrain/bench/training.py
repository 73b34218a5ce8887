"""Timed training steps of ours vs the peer, in the same rank processes, alternating.

Per precision: build both engines, warm both up (compilation happens here, untimed), then rounds of
`per_round` steps each, the order flipping every round, so load from other jobs on a shared machine
hits both alike. Reported step time = median over timed steps (slowest rank's median); tokens/s =
ranks x micro_batch x seq_len / step time; MFU = tokens/s x FLOPs/token / peak, with the trainer's
own `flops_per_token` and `measure_peak_flops` (summed over ranks measuring at once, like
`train/mfu`). The peak is sampled before and after the timed rounds; the larger sample is used.

Peak memory per rank is measured in separate short runs (one model per process group), because
two models in one process share one heap and one high-water mark: the RSS high-water mark over
two steps after warm-up (so compilation is not counted), reset through /proc/self/clear_refs.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch
import torch.distributed as tdist

from scaletrain.bench.models import build_ours, build_peer, step_fn
from scaletrain.config import Config, build_config
from scaletrain.dtypes import DTYPES
from scaletrain.train.disk_space import num_params
from scaletrain.train.distributed import Dist, all_reduce_sum, barrier, collectives_status
from scaletrain.train.metrics import flops_per_token, measure_peak_flops, nominal_peak_flops
from scaletrain.model.llama import LlamaShape
from scaletrain.process_memory import max_rss_mb, peak_rss_mb, reset_peak, status_mb

SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size", "vocab_size")


def bench_config(spec: dict, precision: str) -> Config:
    model = {k: spec[k] for k in SHAPE_KEYS}
    model.update(attention=spec["attention"], fused_ops=spec.get("fused_ops", "none"),
                 max_seq_len=max(2048, spec["seq_len"]), tie_word_embeddings=True)
    return build_config({
        "model": model,
        "train": {"seq_len": spec["seq_len"], "micro_batch_size": spec["micro_batch"], "precision": precision,
                  "compile": spec["compile"], "loss_chunk": spec["loss_chunk"], "threads": spec["threads"],
                  "max_steps": 10**6, "warmup_steps": 10},
        "zero": {"stage": spec["zero_stage"]},
    })


def _batch(cfg: Config, dist: Dist) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + dist.rank)  # a different fixed batch per rank
    data = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.train.seq_len + 1), generator=g)
    return data[:, :-1].to(dist.device), data[:, 1:].to(dist.device)


def _sync(dist: Dist) -> None:
    if dist.device.type == "cuda":
        torch.cuda.synchronize()


def _peak(dtype: torch.dtype, dist: Dist) -> float:
    barrier()  # all ranks measure at once: they share the machine the way training does
    return all_reduce_sum([measure_peak_flops(dtype, dist.device)])[0]


def _slowest(value: float) -> float:
    out = [value]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        out = [None] * tdist.get_world_size()
        tdist.all_gather_object(out, value)
    return max(out)


def _sig(x: float) -> float:
    """4 significant digits: a fraction like MFU can be 0.002 on a tiny shape, where 4 decimals keep only 2."""
    return float(f"{x:.4g}")


def timing_job(dist: Dist, spec: dict) -> dict:
    results = {}
    for precision in spec["precisions"]:
        cfg = bench_config(spec, precision)
        builders = {"ours": lambda: build_ours(cfg, dist.device, dist.world), "peer": lambda: build_peer(cfg, dist.world)}
        engines = {kind: builders[kind]() for kind in spec["contestants"]}
        x, y = _batch(cfg, dist)
        steps = {kind: step_fn(kind, e, x, y) for kind, e in engines.items()}
        losses = {}
        for kind, step in steps.items():
            for _ in range(spec["warmup"]):
                losses[kind] = step()
        peaks = [_peak(DTYPES[precision], dist)]
        times: dict[str, list[float]] = {k: [] for k in steps}
        # exactly `steps` timed steps each, in turns whose order flips: at least two turns when both run, so that
        # neither side always goes first
        per_turn = spec["per_round"] if len(steps) == 1 else max(1, min(spec["per_round"], -(-spec["steps"] // 2)))
        done, r = 0, 0
        while done < spec["steps"]:
            n = min(per_turn, spec["steps"] - done)
            for kind in (list(steps) if r % 2 == 0 else list(steps)[::-1]):
                barrier()
                for _ in range(n):
                    t0 = time.perf_counter()
                    losses[kind] = steps[kind]()
                    _sync(dist)
                    times[kind].append(time.perf_counter() - t0)
            done, r = done + n, r + 1
        peaks.append(_peak(DTYPES[precision], dist))
        shape = LlamaShape.from_config(cfg.model)
        fpt = flops_per_token(shape, cfg.train.seq_len)
        tokens_per_step = dist.world * cfg.train.micro_batch_size * cfg.train.seq_len
        peak = max(peaks)
        out = {"peak_matmul_flops": peak, "peak_matmul_flops_samples": peaks, "flops_per_token": fpt,
               "tokens_per_step": tokens_per_step, "collectives": collectives_status()}
        nominal = nominal_peak_flops(dist.device, precision)
        if nominal:  # a GPU's data-sheet peak, summed over ranks: the MFU papers report
            out["nominal_peak_flops"] = nominal * dist.world
        for kind, ts in times.items():
            step_s = _slowest(statistics.median(ts))
            tps = tokens_per_step / step_s
            out[kind] = {"tokens_per_sec": round(tps, 1), "step_time_s": round(step_s, 6), "mfu": _sig(tps * fpt / peak),
                         "params": num_params(engines[kind].module),  # as built (ZeRO-3: whole, not a partition)
                         "step_times_s": [round(t, 4) for t in ts], "last_loss": round(losses[kind], 4)}
            if nominal:
                out[kind]["mfu_vs_nominal"] = _sig(tps * fpt / out["nominal_peak_flops"])
        if len(times) == 2:
            out["speedup"] = round(out["ours"]["tokens_per_sec"] / out["peer"]["tokens_per_sec"], 3)
        results[precision] = out
        for e in engines.values():
            e.destroy() if hasattr(e, "destroy") else None
        del engines, steps
        gc.collect()
    return results


def memory_job(dist: Dist, spec: dict, precision: str, kind: str) -> dict:
    """Peak memory per rank of one model (ours or peer) over 2 steps after warm-up, in fresh processes."""
    __import__("transformers")  # both kinds pay the same import baseline

    cfg = bench_config(spec, precision)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = status_mb("VmRSS") or 0.0
    engine = build_ours(cfg, dist.device, dist.world) if kind == "ours" else build_peer(cfg, dist.world)
    x, y = _batch(cfg, dist)
    step = step_fn(kind, engine, x, y)
    for _ in range(max(1, spec["warmup"])):
        step()
    _sync(dist)
    gc.collect()
    steady = reset_peak()
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    _sync(dist)
    # The kernel's high-water mark (VmHWM), not a sampler that could miss a short peak.
    mine = {"peak_rss_mb": round(peak_rss_mb(), 1), "rss_before_model_mb": round(base, 1),
            "peak_excludes_warmup": steady,
            "process_max_rss_mb": round(max_rss_mb(), 1)}
    if dist.device.type == "cuda":
        mine["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    per_rank = [mine]
    if tdist.is_initialized() and tdist.get_world_size() > 1:
        per_rank = [None] * tdist.get_world_size()
        tdist.all_gather_object(per_rank, mine)
    return {"per_rank": per_rank}
