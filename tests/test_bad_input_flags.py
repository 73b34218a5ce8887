"""The bad-input matrix, continued (tests/test_bad_input_matrix.py has checkpoints and the CLI's other misuse):
hostfiles through `scaletrain plan --hostfile`, the bench's flags and fp16 where this machine cannot train it.
Same contract and harness: exit code 2, exactly one `error:` line naming the problem, no traceback, nothing
under the case's directory changed. None of these cases needs a trained run."""

from __future__ import annotations

from typing import Callable

import pytest

from bad_input_harness import check_refusal, run_cases
from test_bad_input_cli import TINY_YAML, _write, train


# ---- hostfiles (`scaletrain plan --hostfile`) ---------------------------------------------------------

def _plan_hostfile(tmp, text: str | bytes | None):
    hf = tmp / "hostfile"
    if text is not None:
        _write(hf, text)
    return ["plan", "--config", TINY_YAML, "--hostfile", str(hf), "--peak-tflops", "1"]


def c_hostfile_bad_line(tmp, base):
    return _plan_hostfile(tmp, "worker-0 slots=4\nworker-1 slots 4\n"), ("hostfile:2", "slots=N")


def c_hostfile_plus_sign(tmp, base):
    return _plan_hostfile(tmp, "worker-0 slots=+4\n"), ("hostfile:1", "slots=4", "'+'")


def c_hostfile_not_text(tmp, base):
    return _plan_hostfile(tmp, b"worker-0 slots=4\n\xff\xfe\n"), ("hostfile", "not UTF-8")


def c_hostfile_zero_slots(tmp, base):
    return _plan_hostfile(tmp, "worker-0 slots=0\n"), ("slots=0", ">= 1")


def c_hostfile_duplicate_host(tmp, base):
    return _plan_hostfile(tmp, "worker-0 slots=4\nworker-0 slots=4\n"), ("worker-0", "listed again")


def c_hostfile_missing(tmp, base):
    return _plan_hostfile(tmp, None), ("hostfile", "not found")


def c_hostfile_more_ranks_than_slots(tmp, base):
    return _plan_hostfile(tmp, "worker-0 slots=8\nworker-1 slots=4\n") + ["--gpus", "6"], ("--gpus 6", "worker-1=4")


def c_hostfile_more_nodes_than_hosts(tmp, base):
    return _plan_hostfile(tmp, "worker-0 slots=8\nworker-1 slots=4\n") + ["--nodes", "3"], ("--nodes 3", "2 host(s)")


def c_hostfile_gpus_with_include(tmp, base):
    argv = _plan_hostfile(tmp, "worker-0 slots=4\nworker-1 slots=4\n") + ["--gpus", "2", "--include", "worker-0"]
    return argv, ("--gpus/--nodes and --include/--exclude", "use one")


def c_hostfile_include_no_slot(tmp, base):
    argv = _plan_hostfile(tmp, "worker-0 slots=4\nworker-1 slots=4\n") + ["--include", "worker-1:"]
    return argv, ("--include", "no slot", "worker-1:0,1")


def c_hostfile_include_unknown_host(tmp, base):
    argv = _plan_hostfile(tmp, "worker-0 slots=4\nworker-1 slots=4\n") + ["--include", "worker-0@worker-9"]
    return argv, ("--include", "unknown host 'worker-9'", "worker-0, worker-1")


def c_hostfile_include_malformed(tmp, base):
    argv = _plan_hostfile(tmp, "worker-0 slots=4\nworker-1 slots=4\n") + ["--include", "worker-0:0,x"]
    return argv, ("--include", "slot 'x'", "not a number")


def c_bench_cuda_without_a_gpu(tmp, base):
    if __import__("torch").cuda.is_available():
        return ["bench", "--device", "cuda", "--ranks", "64"], ("--ranks 64", "GPUs")
    return ["bench", "--device", "cuda"], ("--device cuda", "no CUDA GPU")


def c_bench_out_in_a_missing_folder(tmp, base):
    """Checked before the benchmark runs (minutes), not when its JSON is written."""
    return ["bench", "--precision", "fp32", "--out", str(tmp / "results" / "bench.json")], ("--out", "writable folder")


def c_bench_flash_attention_on_cpu(tmp, base):
    return ["bench", "--device", "cpu", "--attention", "flash", "--precision", "fp32"], ("--attention flash", "--attention sdpa")


def c_bench_heads_that_do_not_divide(tmp, base):
    """The config's own check named model.hidden_size and model.num_heads, which the bench takes as --hidden, --heads."""
    return ["bench", "--heads", "3", "--precision", "fp32"], ("--hidden (256)", "--heads (3)")


def _fp16_trains_here() -> bool:
    from scaletrain.train.precision import cpu_fp16_training

    return __import__("torch").cuda.is_available() or cpu_fp16_training()


def c_bench_fp16_on_cpu(tmp, base):
    if _fp16_trains_here():  # (a Sapphire Rapids CPU, a GPU): the ZeRO-0 refusal instead
        return ["bench", "--precision", "fp16", "--zero", "0"], ("--precision fp16", "--zero 0")
    return ["bench", "--device", "cpu", "--precision", "fp16"], ("--precision fp16", "AVX512-FP16")


def c_fp16_training_on_cpu(tmp, base):
    """DeepSpeed refused it with a ValueError from deep inside its engine."""
    if _fp16_trains_here():
        return train(tmp, "train.precision=fp16", "zero.stage=0"), ("train.precision=fp16", "zero.stage=0")
    return train(tmp, "train.precision=fp16"), ("train.precision=fp16", "AVX512-FP16")


CASES: dict[str, Callable] = {name[2:]: fn for name, fn in sorted(globals().items()) if name.startswith("c_")}


@pytest.fixture(scope="module")
def results(request, tmp_path_factory) -> dict:
    """Runs the cases this session selected (all, or those picked with -k), four at a time."""
    picked = {item.callspec.params["case"] for item in request.session.items
              if item.module is request.module and "case" in getattr(getattr(item, "callspec", None), "params", {})}
    roots = {name: tmp_path_factory.mktemp(name) for name in sorted(picked or CASES)}
    return run_cases(CASES, roots, None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, results):
    check_refusal(results[case].result())
