"""train.precision auto: bf16 where the CPU (or GPU) multiplies bf16 natively, fp32 on CPUs that would run bf16
in software (~20x slower); an explicit bf16 there gets a warning. The matmul peak probe sizes itself to what the
dtype costs here and skips a library that refuses the dtype."""

from __future__ import annotations

import time

import pytest
import torch

from scaletrain.config import load_config
from scaletrain.errors import UserError
from scaletrain.train import metrics, precision

CPU = torch.device("cpu")


@pytest.mark.parametrize("capability, want", [("AVX2", "fp32"), ("DEFAULT", "fp32"), ("AVX512", "bf16"),
                                              ("AVX512_BF16", "bf16"), ("AMX", "bf16")])
def test_auto_follows_the_cpu(monkeypatch, capability, want):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "cpuinfo_field", lambda key: "fpu avx2 avx512f")  # no bf16 instructions named
    cfg, note = precision.resolve(load_config(None, ["train.precision=auto"]), CPU)
    assert cfg.train.precision == want
    assert note.startswith(f"train.precision auto -> {want} (") and capability in note
    if want == "bf16":  # the bf16 instructions by name, where the CPU has them
        monkeypatch.setattr(precision, "cpuinfo_field", lambda key: "avx512f avx512_bf16 amx_bf16")
        assert "natively (AMX-BF16, AVX512-BF16)" in precision.resolve(load_config(None, ["train.precision=auto"]), CPU)[1]


def test_explicit_precisions_are_kept_and_bf16_in_software_is_warned_about(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cfg, note = precision.resolve(load_config(None, ["train.precision=bf16"]), CPU)
    assert cfg.train.precision == "bf16" and note.startswith("warning: train.precision bf16") and "fp32" in note
    cfg, note = precision.resolve(load_config(None, ["train.precision=fp32"]), CPU)
    assert cfg.train.precision == "fp32" and note is None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512_BF16")
    assert precision.resolve(load_config(None, ["train.precision=bf16"]), CPU)[1] is None


def test_auto_is_the_default_and_the_tiny_config_uses_it():
    from launch_utils import REPO

    assert load_config(None, []).train.precision == "auto"
    assert load_config(str(REPO / "configs" / "tiny.yaml"), []).train.precision == "auto"


def test_plan_resolves_auto_for_its_device(monkeypatch):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    cfg = load_config(None, ["train.precision=auto"])
    assert precision.planned(cfg, "cpu").train.precision == "fp32"
    if not torch.cuda.is_available():
        assert precision.planned(cfg, "cuda").train.precision == "bf16"


def test_auto_on_a_gpu_without_native_bf16_is_fp16(monkeypatch):
    """A V100/T4 emulates bf16 (torch's is_bf16_supported() says yes by default, counting emulation): auto must
    take fp16, which those cards run natively. (Emulated here: the machine has no GPU.)"""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-32GB")
    assert precision.choose(torch.device("cuda", 0)) == ("fp16", "Tesla V100-SXM2-32GB has no bf16")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert precision.choose(torch.device("cuda", 0))[0] == "bf16"


def test_peak_probe_shrinks_a_slow_product_and_skips_a_refusing_one(monkeypatch):
    sizes = []

    def slow_mm(a, b):  # ~1 GFLOP/s: a 2048-square product would take 17 s
        sizes.append(a.shape[0])
        time.sleep(2.0 * a.shape[0] ** 3 / 1e9)
        return a

    def refusing_mm(a, b):
        raise RuntimeError("could not create a primitive descriptor")

    monkeypatch.setattr(torch, "mm", slow_mm)
    monkeypatch.setattr(metrics.cpu_matmul, "onednn_available", lambda: True)
    monkeypatch.setattr(metrics.cpu_matmul, "mm_nt", refusing_mm)
    monkeypatch.setattr(metrics, "cpu_has_avx512", lambda: False)  # bf16 in software
    t0 = time.perf_counter()
    rate = metrics.measure_peak_flops(torch.bfloat16, CPU, seconds=0.4)
    assert time.perf_counter() - t0 < 3.0
    assert max(sizes) < 2048 and 0.3e9 < rate < 1.2e9


def test_peak_of_a_hardware_dtype_is_measured_on_full_size_products(monkeypatch):
    """A slow first call (oneDNN generating its kernel, a busy neighbour) used to shrink the product to 128-640
    square, where call overhead is most of the time: the peak came out 3-4x low and train/mfu over 100 %."""
    sizes, calls = [], []

    def cold_then_fast_mm(a, b):
        sizes.append(a.shape[0])
        calls.append(1)
        if len(calls) == 1:
            time.sleep(0.3)
        return a

    monkeypatch.setattr(torch, "mm", cold_then_fast_mm)
    monkeypatch.setattr(metrics.cpu_matmul, "onednn_available", lambda: False)
    metrics.measure_peak_flops(torch.float32, CPU, seconds=0.05)
    assert set(sizes) == {2048}


def test_nominal_gpu_peak_tells_the_h100_variants_apart(monkeypatch):
    from scaletrain.train.metrics import nominal_peak_flops

    cuda = torch.device("cuda", 0)
    for name, bf16 in [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200 NVL", 835e12), ("NVIDIA H200", 989e12),
                       ("NVIDIA A100-SXM4-80GB", 312e12), ("Tesla T4", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, n=name: n)
        assert nominal_peak_flops(cuda, "bf16") == bf16, name


def test_ranks_on_different_hardware_agree_on_one_precision(monkeypatch):
    """`auto` is decided per rank: a job on AVX-512 and AVX2 nodes built bf16 and fp32 engines and hung in its
    first collective. After setup every rank takes what all of them run."""
    import torch.distributed as tdist

    def gather(out, mine, others):
        out[:] = [mine, *others]

    cfg = load_config(None, ["train.precision=bf16"])  # what auto resolved to on this rank
    monkeypatch.setattr(tdist, "all_gather_object", lambda out, mine: gather(out, mine, ["fp32"]))
    agreed, note = precision.agree(cfg, "auto", "train.precision auto -> bf16 (...)", 2)
    assert agreed.train.precision == "fp32" and "hardware differs: bf16, fp32" in note
    monkeypatch.setattr(tdist, "all_gather_object", lambda out, mine: gather(out, mine, ["fp16"]))  # A100 + V100
    assert precision.agree(cfg, "auto", None, 2)[0].train.precision == "fp16"
    monkeypatch.setattr(tdist, "all_gather_object", lambda out, mine: gather(out, mine, ["bf16"]))
    assert precision.agree(cfg, "auto", "n", 2) == (cfg, "n")
    assert precision.agree(cfg, "bf16", "n", 2) == (cfg, "n")  # asked for explicitly: as asked


def test_fp16_at_zero_0_is_refused(monkeypatch):
    """DeepSpeed 0.19's fp16 wrapper of a plain optimizer (ZeRO-0) unscales gradients that were never scaled."""
    monkeypatch.setattr(precision, "cpu_fp16_training", lambda: True)
    with pytest.raises(UserError, match="zero.stage=0.*zero.stage=1 or higher"):  # a config given to run (plan too)
        load_config(None, ["train.precision=fp16", "zero.stage=0"])
    saved = load_config(None, ["train.precision=fp16", "zero.stage=1"])
    saved.zero.stage = 0  # (a config saved before the rule): refused at start as well
    with pytest.raises(UserError, match="zero.stage=0.*zero.stage=1 or higher"):
        precision.resolve(saved, CPU)
    assert precision.resolve(load_config(None, ["train.precision=fp16", "zero.stage=1"]), CPU)[0].train.precision == "fp16"
    monkeypatch.setattr(precision, "choose", lambda device: ("fp16", "a V100 has no bf16"))
    cfg, note = precision.resolve(load_config(None, ["train.precision=auto", "zero.stage=0"]), CPU)
    assert cfg.train.precision == "fp32" and "needs zero.stage >= 1" in note  # auto: what trains right
    monkeypatch.setattr(precision, "cpu_fp16_training", lambda: False)
    with pytest.raises(UserError, match="AVX512-FP16"):
        precision.resolve(load_config(None, ["train.precision=fp16", "zero.stage=1"]), CPU)
