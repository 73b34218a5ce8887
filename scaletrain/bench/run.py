"""Orchestrates `scaletrain bench`'s training comparison: one process group for the alternating
timed steps (all precisions), then one short process group per (precision, model) for peak memory."""

from __future__ import annotations

from scaletrain.bench.spawn import run_ranks
from scaletrain.bench.training import memory_job, timing_job
from scaletrain.kernels import cpu_matmul

OURS_NOTE = "scaletrain LlamaForCausalLM via the trainer's build_model/build_optimizer (fused AdamW)"
PEER_NOTE = "transformers.LlamaForCausalLM(attn_implementation='sdpa'), torch AdamW (default implementation)"


def training_bench(spec: dict, memory: bool = True) -> dict:
    ranks, device = spec["ranks"], spec["device"]
    timing = run_ranks(timing_job, (spec,), ranks, device, spec["threads"])
    if memory:
        for precision in spec["precisions"]:
            for kind in spec["contestants"]:
                # glibc's default allocator here, so freed memory (compile-time garbage, last step's
                # activations) leaves RSS and the high-water mark shows what the steps really hold
                mem = run_ranks(memory_job, (spec, precision, kind), ranks, device, spec["threads"],
                                env={"SCALETRAIN_NO_MALLOC_TUNING": "1"})
                timing[precision][kind]["memory_per_rank"] = mem["per_rank"]
    return {
        "config": {k: spec[k] for k in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                                        "vocab_size", "seq_len", "micro_batch", "ranks", "device", "zero_stage",
                                        "steps", "warmup", "per_round", "threads", "contestants")},
        "ours_settings": {"model": OURS_NOTE, "attention": spec["attention"], "compile": spec["compile"],
                          "loss_chunk": spec["loss_chunk"], "fused_ops": spec["fused_ops"],
                          "cpu_kernels": cpu_matmul.kernels_status() if device == "cpu" else None},
        "peer_settings": {"model": PEER_NOTE},
        "mfu_formula": "tokens/s x (6 N + 12 L d T) / peak; N = non-embedding params + output head; "
                       "peak = measured bf16/fp32 matmul FLOP/s of all ranks at once",
        "results": timing,
    }
