"""Load a model from any source for inference, and KV-cached sampling (`scaletrain generate`)."""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from scaletrain.errors import UserError


def inference_device_and_dtype(device: str = "auto", precision: str = "auto") -> tuple[torch.device, torch.dtype]:
    """`--device auto`: a CUDA GPU when there is one. `--precision auto`: bf16 on a GPU that has it (fp16 on one
    that does not), fp32 on CPU (exact numbers; bf16 there is a choice: faster where the CPU multiplies it)."""
    from scaletrain.dtypes import DTYPES

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible here; use --device cpu or auto")
    dev = torch.device(device)
    if precision == "auto":
        precision = "fp32" if dev.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    return dev, DTYPES[precision]


def load_model(source: str, need_tokenizer: bool = True, device: str = "cpu", precision: str = "fp32"):
    """(model in eval mode on `device` in `precision` (the commands pass their flags, `auto` by default: see
    inference_device_and_dtype); tokenizer or None; WeightSource) for a run/checkpoint/HF dir."""
    from scaletrain.data.tokenizer import load_tokenizer
    from scaletrain.model.classify import build_model
    from scaletrain.model.llama import LlamaShape
    from scaletrain.weights import load_into, open_weights

    src = open_weights(source)
    if need_tokenizer and src.tokenizer is None:
        raise UserError(f"{src.path}: no tokenizer found (tokenizer/ or the run's data cache); copy the tokenizer "
                        f"files its ids come from into {src.path / 'tokenizer'}")
    tok = load_tokenizer(src.tokenizer) if src.tokenizer is not None else None
    shape = LlamaShape.from_config(src.model)
    if shape.attention not in ("sdpa", "eager"):
        shape = replace(shape, attention="sdpa")  # flash/flex are training kernels; KV-cached decode uses sdpa
    # built on the meta device, then given empty memory that load_into fills: initialising weights only to
    # overwrite them took seconds at 1B parameters (load_into refuses a checkpoint that misses any of them)
    dev, dtype = inference_device_and_dtype(device, precision)
    with torch.device("meta"):
        model = build_model(shape, pad_id=tok.eos_id if tok is not None else 2)  # num_labels > 0: a classifier
    load_into(model.materialize(dev), src, "checkpoint")  # filled in fp32, then cast: one rounding from the source
    return model.to(dtype).eval(), tok, src


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    # one vocab-sized row, on the CPU (the generator is a CPU one), in fp64: a temperature below fp32's range (1e-300)
    # would be 0 there, and 0/0 NaN. Max first: a tiny temperature gives 0 and -inf, not inf - inf.
    logits = logits.double().cpu()
    logits = (logits - logits.max()) / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits[order[drop]] = float("-inf")
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.no_grad()
def generate(model, prompt_ids: list[int], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, eos_id: Optional[int] = None, vocab: Optional[int] = None) -> list[int]:
    """New token ids after `prompt_ids` (stops at EOS, which is included, or at max_seq_len).
    One forward over the prompt, then one token per step against the KV cache. `vocab`: the tokenizer's size;
    a model whose vocab_size is larger (padded, or a smaller custom tokenizer) never picks an id past it,
    which the tokenizer could not decode."""
    if not prompt_ids:
        raise UserError("the prompt encodes to no tokens; give a non-empty --prompt")
    limit = model.shape.max_seq_len
    if len(prompt_ids) >= limit:
        raise UserError(f"the prompt has {len(prompt_ids)} tokens; the model's context is {limit}")
    gen = torch.Generator().manual_seed(seed)
    caches, dev = model.new_caches(), model_device(model)
    logits = model.next_token_logits(torch.tensor([prompt_ids], device=dev), caches, 0)
    out: list[int] = []
    pos = len(prompt_ids)
    while len(out) < max_new_tokens:
        if vocab is not None and vocab < logits.numel():
            logits = logits.clone()
            logits[vocab:] = float("-inf")
        nxt = _pick(logits, temperature, top_k, top_p, gen)
        out.append(nxt)
        if nxt == eos_id or pos + 1 >= limit:  # it sits at index pos: prompt + output stay within the context
            break
        logits = model.next_token_logits(torch.tensor([[nxt]], device=dev), caches, pos)
        pos += 1
    return out
