"""generate's own rules, on tiny random models: what it prints, which ids it may pick, temperature edge cases,
the context limit. (Parity with transformers' generate: test_hf_interop.py; the KV cache: test_model_parity.py.)"""

from __future__ import annotations

import torch


def test_generate_prints_the_continuation_as_decoded_after_the_prompt():
    """Llama-style decoders drop the leading space of a sequence's first piece: decoding the new ids alone
    glued 'Hello' and 'world' together."""
    from scaletrain.commands.generate import continuation

    class MetaspaceLike:
        pieces = {0: "Hello", 1: "▁world", 2: "!"}

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")

    tok = MetaspaceLike()
    assert tok.decode([1]) == "world"
    assert "Hello" + continuation(tok, [0], [1, 2]) == "Hello world!"


def test_generate_never_picks_an_id_the_tokenizer_cannot_decode():
    """A model vocab larger than its tokenizer (padded, or a smaller custom .model): those ids would crash decode."""
    from scaletrain.generate import generate
    from scaletrain.model.llama import LlamaForCausalLM, LlamaShape

    torch.manual_seed(0)
    inner = LlamaForCausalLM(LlamaShape(32, 1, 4, 2, 64, 50, max_seq_len=64)).eval()

    class TailWins:  # the ids past the tokenizer get the highest logits
        shape, new_caches, parameters = inner.shape, inner.new_caches, inner.parameters

        def next_token_logits(self, *args):
            logits = inner.next_token_logits(*args)
            logits[40:] += 50.0
            return logits

    with torch.no_grad():
        free = generate(TailWins(), [3, 4], max_new_tokens=20, temperature=1.0, seed=1)
        capped = generate(TailWins(), [3, 4], max_new_tokens=20, temperature=1.0, seed=1, vocab=40)
        greedy = generate(TailWins(), [3, 4], max_new_tokens=20, temperature=0.0, vocab=40)
    assert min(free) >= 40
    assert max(capped) < 40 and max(greedy) < 40 and len(capped) == 20


def test_a_tiny_temperature_samples_the_argmax():
    """--temperature 1e-38 passed validation, then logits / T overflowed to inf and softmax gave NaN."""
    from scaletrain.generate import _pick

    logits = torch.tensor([5.0, 3.0, 1.0, float("-inf")])
    for t in (1e-300, 1e-38, 1e-30):
        assert _pick(logits, t, 0, 1.0, torch.Generator().manual_seed(0)) == 0
        assert _pick(logits, t, 2, 0.9, torch.Generator().manual_seed(0)) == 0


def test_generate_stays_within_the_context():
    """Prompt + output never exceed max_seq_len (the last token used to land one past it)."""
    from scaletrain.generate import generate
    from scaletrain.model.llama import LlamaForCausalLM, LlamaShape

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaShape(32, 1, 4, 2, 64, 50, max_seq_len=8)).eval()
    with torch.no_grad():
        out = generate(model, [3, 4, 5, 6, 7], max_new_tokens=10, temperature=0.0)
    assert len(out) == 3
