"""`scaletrain generate CKPT_OR_RUN_DIR --prompt TEXT`: KV-cached sampling (temperature 0 = greedy)."""

from __future__ import annotations

import argparse
import json
import math
import sys

from scaletrain.commands.common import add_inference_args


def run(args: argparse.Namespace) -> int:
    from scaletrain.errors import UserError
    from scaletrain.generate import generate, load_model

    if (args.max_new_tokens < 1 or not math.isfinite(args.temperature) or args.temperature < 0 or args.top_k < 0
            or not 0 < args.top_p <= 1):
        raise UserError("generate needs --max-new-tokens >= 1, --temperature >= 0, --top-k >= 0 and 0 < --top-p <= 1")
    if not -(2**63) <= args.seed < 2**64:  # torch.Generator's range (a larger one raised after the model loaded)
        raise UserError(f"--seed {args.seed} is out of range; use a number from 0 to 2^64-1")
    if not _is_unicode(args.prompt):  # bytes that are not UTF-8 in argv arrive as lone surrogates
        raise UserError("--prompt is not valid UTF-8 text; pass it in UTF-8 (check the terminal's locale)")
    model, tok, src = load_model(args.source, device=args.device, precision=args.precision)
    if src.model.num_labels:
        raise UserError(f"{src.path} is a sequence classifier (model.num_labels={src.model.num_labels}); it has no LM head "
                        "to generate with: use `scaletrain eval` for its accuracy")
    prompt_ids = tok.encode(args.prompt)
    ids = generate(model, prompt_ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, tok.eos_id,
                   vocab=tok.vocab_size)
    text = continuation(tok, prompt_ids, [i for i in ids if i != tok.eos_id])
    if args.json:  # the same text as the plain output prints after the prompt
        print(json.dumps({"prompt_ids": prompt_ids, "ids": ids, "text": text}))
    else:
        sys.stdout.write(args.prompt + text + "\n")
    return 0


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def continuation(tok, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text the new ids add after the prompt. Decoded together with the prompt: a Llama-style decoder drops
    the leading space of a sequence's first piece (decode(["▁world"]) is "world", not " world")."""
    prompt_text, full = tok.decode(prompt_ids), tok.decode(prompt_ids + new_ids)
    return full[len(prompt_text):] if full.startswith(prompt_text) else tok.decode(new_ids)


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained, imported or exported model")
    p.add_argument("source", metavar="CKPT_OR_RUN_DIR", help="run dir, checkpoint dir, checkpoint tag or HF dir")
    add_inference_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (deterministic)")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print prompt ids, new ids (EOS included) and the new text (as printed after the prompt) as JSON")
    p.set_defaults(func=run)
