"""eval / generate choose where and in what precision they run: --device auto|cpu|cuda, --precision."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
import torch

from hf_fixtures import cli_ok, corpus, hf_dir, hf_root, imported, sp_model  # noqa: F401 (fixtures)
from launch_utils import run_cli
from scaletrain.errors import UserError
from scaletrain.evaluate import evaluate, file_batches
from scaletrain.generate import generate, inference_device_and_dtype, load_model


def _doc(tmp_path: Path) -> Path:
    (tmp_path / "doc.txt").write_text(Path(sysconfig.get_paths()["stdlib"], "heapq.py").read_text()[:6000])
    return tmp_path / "doc.txt"


def test_bf16_eval_is_close_to_fp32_and_auto_is_fp32_on_cpu(tmp_path, imported):
    doc = _doc(tmp_path)
    losses = {}
    for precision in ("auto", "fp32", "bf16"):
        model, tok, _ = load_model(str(imported), device="cpu", precision=precision)
        want = torch.bfloat16 if precision == "bf16" else torch.float32
        assert {p.dtype for p in model.parameters()} == {want}
        losses[precision] = evaluate(model, file_batches(doc, tok, 128, 4, "text"))["loss"]
    assert losses["auto"] == losses["fp32"]
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"], losses  # bf16: a rounding per op
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16


def test_generate_reads_only_the_last_prompt_position_and_runs_in_bf16(imported):
    model, tok, _ = load_model(str(imported), device="cpu", precision="fp32")
    prompt = tok.encode("def main(argv):\n    parser = ")
    full = model(torch.tensor([prompt]))[0, -1]  # the whole prompt's logits, as before
    ids = generate(model, prompt, max_new_tokens=1, temperature=0)
    assert ids == [int(full.argmax())]
    bf16, _, _ = load_model(str(imported), device="cpu", precision="bf16")
    out = generate(bf16, prompt, max_new_tokens=8, temperature=0.7, seed=1)
    assert len(out) >= 1 and all(0 <= i < tok.vocab_size for i in out)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_cuda_without_a_gpu_is_one_line(imported):
    with pytest.raises(UserError, match="no CUDA GPU"):
        inference_device_and_dtype("cuda", "auto")
    rc, out, err = run_cli("eval", str(imported), "--device", "cuda", "--max-batches", "1")
    assert rc == 2 and "no CUDA GPU" in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_eval_on_the_gpu_matches_the_cpu(tmp_path, imported):
    doc = _doc(tmp_path)
    res = {}
    for device in ("cpu", "cuda"):
        model, tok, _ = load_model(str(imported), device=device, precision="fp32")
        assert next(model.parameters()).device.type == device
        res[device] = evaluate(model, file_batches(doc, tok, 128, 4, "text"))["loss"]
    assert abs(res["cpu"] - res["cuda"]) < 1e-4, res
    out = cli_ok("generate", str(imported), "--prompt", "import os\n", "--max-new-tokens", "8", "--json")
    assert '"ids"' in out


def test_an_imported_model_has_no_val_split_of_its_own(imported):
    """import-hf's config.yaml is a fine-tuning template (data.source: stdlib): eval without --data scored the
    val split of whatever stdlib cache had the same vocab size, tokenised by another tokenizer."""
    rc, _, err = run_cli("eval", str(imported), "--max-batches", "1")
    assert rc == 2 and "no val split of its own" in err and len(err.strip().splitlines()) == 1, err
