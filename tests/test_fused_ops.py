"""`model.fused_ops: liger`: the module swap keeps names and function; where it cannot run, one line."""

import pytest
import torch

from scaletrain.errors import UserError
from scaletrain.model import fused_ops
from scaletrain.model.llama import LlamaForCausalLM, LlamaShape


def _shape():
    return LlamaShape(vocab_size=97, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      intermediate_size=48, max_seq_len=32)


def test_refused_without_cuda_in_one_line():
    with pytest.raises(UserError, match="needs a CUDA GPU") as e:
        fused_ops.check_fused_ops("liger", cuda=False)
    assert "\n" not in str(e.value)
    fused_ops.check_fused_ops("none", cuda=False)  # the default is always fine


def test_swap_keeps_parameter_names_and_the_function(monkeypatch):
    """Stand-in kernels with the Liger call signatures, computed with our reference ops: the swapped model must
    call them with the right arguments and layouts and give the unswapped model's logits."""
    from scaletrain.model.blocks import RMSNorm
    from scaletrain.model.llama import apply_rope

    class Norm:
        @staticmethod
        def apply(x, w, eps, offset, casting_mode, in_place):
            assert offset == 0.0 and casting_mode == "llama"
            m = RMSNorm(x.shape[-1], eps)
            m.weight = w
            return RMSNorm.forward(m, x)

    class SiluMul:
        @staticmethod
        def apply(a, b):
            return torch.nn.functional.silu(a) * b

    class Rope:
        @staticmethod
        def apply(q, k, cos, sin):
            assert cos.dim() == 3 and cos.shape[1] == q.shape[2]  # [1 or B, T, D]
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            return apply_rope(q, cos, sin), apply_rope(k, cos, sin)

    torch.manual_seed(0)
    model = LlamaForCausalLM(_shape())
    ids = torch.randint(0, 97, (2, 16))
    names = list(model.state_dict())
    with torch.no_grad():
        want = model(ids)
    monkeypatch.setattr(fused_ops, "check_fused_ops", lambda name, cuda: fused_ops._ops.update(
        rms_norm=Norm, silu_mul=SiluMul, rope=Rope))
    changed = fused_ops.use_fused_ops(model, "liger", cuda=True)
    assert changed == 2 * 4 + 1  # per layer 2 norms, the FFN and attention; the final norm
    assert list(model.state_dict()) == names
    with torch.no_grad():
        got = model(ids)
    want, got = (x.logits if hasattr(x, "logits") else x for x in (want, got))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_real_liger_kernels_match_the_reference_on_cuda(dtype, tol):
    """The real Triton kernels: same logits and gradients as our modules (fp32 tight, bf16 within rounding)."""
    pytest.importorskip("liger_kernel")
    import copy

    torch.manual_seed(0)
    ref = LlamaForCausalLM(_shape()).to("cuda", dtype)
    fused = copy.deepcopy(ref)
    assert fused_ops.use_fused_ops(fused, "liger", cuda=True) == 2 * 4 + 1
    ids = torch.randint(0, 97, (2, 16), device="cuda")
    outs = []
    for model in (ref, fused):
        out = model(ids)
        logits = out.logits if hasattr(out, "logits") else out
        logits.float().square().mean().backward()
        outs.append((logits.detach().float(), [p.grad.float() for p in model.parameters()]))
    (want, want_g), (got, got_g) = outs
    torch.testing.assert_close(got, want, rtol=0, atol=tol)
    for a, b in zip(got_g, want_g):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_liger_inside_compiled_blocks_trains_like_the_reference():
    """Regression (H100, torch 2.11): traced by torch.compile, Liger's autograd Functions gave wrong gradients
    (loss 10.24 instead of 8.05 after one step). They are kept out of the graph; two AdamW steps must agree."""
    pytest.importorskip("liger_kernel")
    from scaletrain.train.perf import compile_model

    losses = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = LlamaForCausalLM(_shape()).cuda()
        if fused:
            fused_ops.use_fused_ops(model, "liger", cuda=True)
        compile_model(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ids = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1)).cuda()
        run = []
        for _ in range(3):
            loss = model(ids[:, :-1], ids[:, 1:])
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], abs=1e-4)
