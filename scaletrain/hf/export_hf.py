"""`scaletrain export-hf SRC --out HF_DIR`: publish a run dir, checkpoint dir or tag as a Hugging Face model.

Writes config.json (LlamaForCausalLM), safetensors (sharded + index above --max-shard-size),
generation_config.json, tokenizer files (AutoTokenizer gives the training ids; checked before finishing),
lineage.json and a README.md model card. Tensors stream one at a time from any ZeRO stage, so peak memory
is about the largest tensor, not the model plus its optimizer (measured: the result's `weights_peak_rss_mb`
over `rss_before_weights_mb`, printed by the CLI).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from scaletrain import lineage
from scaletrain.dtypes import DTYPES
from scaletrain.errors import UserError
from scaletrain.hf import generation_config
from scaletrain.hf.arch_map import export_plan, hf_config
from scaletrain.hf.model_card import write_model_card
from scaletrain.hf.tokenizer_files import check_same_ids, write_hf_tokenizer
from scaletrain.process_memory import max_rss_mb, reset_peak, status_mb
from scaletrain.weights.checkpoint_dir import DEFAULT_SHARD, check_out, source_parent, staged
from scaletrain.weights.sources import expected_shapes, open_weights, shape_problems, summarise
from scaletrain.weights.writer import TO_ST, parse_size, write_safetensors

DTYPE_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


class StreamMemory:
    """Peak RSS while the weights stream (VmHWM reset just before), over the RSS just before, and the whole
    process's peak (the larger of the peak before the reset and the one after)."""

    def __enter__(self):
        self.peak_before = max(max_rss_mb(), status_mb("VmHWM") or 0.0)
        self.reset = reset_peak()
        self.rss_before = status_mb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.stream_peak = status_mb("VmHWM") if self.reset else None

    def report(self) -> dict:
        total = max(self.peak_before, max_rss_mb(), status_mb("VmHWM") or 0.0)
        return {"peak_rss_mb": total, "rss_before_weights_mb": self.rss_before, "weights_peak_rss_mb": self.stream_peak}


def export_hf(source: str, out: str, dtype: Optional[str] = None, max_shard_size: str = DEFAULT_SHARD, progress: bool = True) -> dict:
    out_dir = Path(out).expanduser()
    check_out(out_dir)
    max_bytes = parse_size(max_shard_size)
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    src = open_weights(source)
    plan = export_plan(src.model)  # the transformers architecture computing the same function, or a one-line refusal
    problems = shape_problems(src.specs(), expected_shapes(src.model))
    if problems:
        raise UserError(f"{src.path}: weights do not match its config: {summarise(problems)}")
    if src.tokenizer is None:
        raise UserError(f"{src.path}: no tokenizer found (looked for tokenizer/ and the run's data cache); "
                        f"an export must ship the tokenizer its ids come from: copy its files into {src.path / 'tokenizer'}")
    from scaletrain.data.tokenizer import load_tokenizer

    ours = load_tokenizer(src.tokenizer)
    with staged(out_dir) as tmp:
        with StreamMemory() as mem:
            written = write_safetensors(tmp, plan.adapter.specs(src.specs()), plan.adapter.tensors(src.tensors()), max_bytes,
                                        DTYPES.get(dtype or ""), progress)
        name = DTYPE_NAMES.get(written["dtypes"][0], "float32") if len(written["dtypes"]) == 1 else "float32"
        bos = ours.bos_id if ours.bos_id >= 0 else None
        pad = ours.eos_id if src.model.num_labels else None  # classifiers pool at the last non-pad token
        cfg = hf_config(plan, src.model, bos, ours.eos_id, name, pad)
        gen = generation_config.for_export(generation_config.find(src.path), bos, ours.eos_id, cfg["transformers_version"])
        cfg["eos_token_id"] = gen["eos_token_id"]  # a source's extra stop tokens (Llama 3's list) in both files, as HF has them
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / generation_config.GENERATION_CONFIG).write_text(json.dumps(gen, indent=2))
        write_hf_tokenizer(src.tokenizer, tmp, src.model.max_seq_len, pad_with_eos=pad is not None)
        check_same_ids(tmp, ours)
        parent = src.lineage or {}
        stored = sorted({TO_ST[dt] for _, _, dt in src.specs()})
        diff = {} if stored == written["dtypes"] else {"dtype": ["/".join(stored), "/".join(written["dtypes"])]}
        rec = lineage.make("export", written["content_id"], [source_parent(src)], src.model.model_dump(mode="json"),
                           diff, steps=parent.get("steps"), tokens=parent.get("tokens"),
                           data=parent.get("data"), val_loss=parent.get("val_loss"), path=out_dir, dtypes=written["dtypes"])
        lineage.write(tmp, rec)
        write_model_card(tmp, out_dir.name, src.model, rec, lineage.tree_lines(tmp), name)
    memory = mem.report()
    if progress and memory["rss_before_weights_mb"] is not None:  # the CLI prints the process's peak on stdout
        stream = memory["weights_peak_rss_mb"]
        print(f"export-hf: RSS {memory['rss_before_weights_mb']:.1f} MB before streaming the weights, peak "
              f"{'n/a' if stream is None else f'{stream:.1f}'} MB while streaming", file=sys.stderr)
    return {**rec, "files": written["files"], "total_size": written["total_size"], **memory}
