"""kernels/build.py: the CPU kernels switch off cleanly (env, failed build) and a killed build's lock
cannot block later runs."""

from __future__ import annotations

from pathlib import Path

from scaletrain.kernels import build


def test_env_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("SCALETRAIN_CPU_KERNELS", "torch")
    assert build.extension() is None


def test_failed_build_warns_in_one_line_and_returns_none(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "broken.cpp"
    broken.write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(build, "SOURCES", [broken])
    monkeypatch.setattr(build, "_HEADERS", [])
    monkeypatch.setattr(Path, "home", lambda: tmp_path)
    where = build.build_dir("avx2")
    where.mkdir(parents=True)
    (where / "lock").write_text("")  # left by a build that was killed: torch's loader would wait on it forever
    assert build._load.__wrapped__("avx2") is None  # and did not hang on the stale lock
    assert not (where / "lock").exists()
    err = capsys.readouterr().err
    assert "did not build" in err and "deliberately broken" in err and "using PyTorch's" in err
    warning = [line for line in err.splitlines() if "did not build" in line]
    assert len(warning) == 1


def test_a_home_without_room_for_the_build_means_pytorchs_kernels(tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.write_text("a file where the home dir should be")  # mkdir under it fails as on a read-only home
    monkeypatch.setattr(Path, "home", lambda: home)
    assert build._load.__wrapped__("avx2") is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot be built" in err and "using PyTorch's" in err


def test_each_isa_builds_apart_and_the_cpu_picks_one(monkeypatch):
    """The AVX-512 and AVX2 builds differ in flags, so in cache dir; the CPU's capability picks the build."""
    assert build.build_dir("avx512") != build.build_dir("avx2")
    assert "-DSCALETRAIN_AVX2" in build.flags("avx2") and "-DSCALETRAIN_AVX2" not in build.flags("avx512")
    for capability, want in [("AMX", "avx512"), ("AVX512", "avx512"), ("AVX2", "avx2"), ("DEFAULT", None)]:
        monkeypatch.setattr(build.torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert build.isa() == want
    assert build.extension() is None  # no vector ISA: PyTorch's kernels
    assert not build.bf16_ready()


def test_the_build_runs_the_ninja_beside_python(tmp_path, monkeypatch):
    """Two ninja versions (the venv's, the system's) read each other's build log as stale: a process whose
    PATH found the other one rebuilt the kernels every time. The build puts this Python's dir first."""
    (tmp_path / "ninja").write_text("")
    monkeypatch.setattr(build.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with build._ninja_beside_python():
        assert build.os.environ["PATH"] == f"{tmp_path}:/usr/bin:/bin"
    assert build.os.environ["PATH"] == "/usr/bin:/bin"
    (tmp_path / "ninja").unlink()  # no ninja there: PATH as it is
    with build._ninja_beside_python():
        assert build.os.environ["PATH"] == "/usr/bin:/bin"


def test_constant_mark_is_torchs_and_dynamo_honours_it():
    """`constant_while_compiling` sets what `torch.compiler.assume_constant_result` sets (a torch upgrade that
    changes the mark fails here), and a compiled caller runs the marked function outside its graph: file I/O
    inside it would otherwise break a fullgraph compile."""
    import subprocess
    import sys

    code = """
import sys, torch
from scaletrain.kernels import build

def theirs(): return 1
def ours(): return 1
build.constant_while_compiling(ours)
assert 'torch._dynamo' not in sys.modules, 'marking imported dynamo'
torch.compiler.assume_constant_result(theirs)
assert vars(ours) == vars(theirs) and vars(ours), (vars(ours), vars(theirs))

@build.constant_while_compiling
def flag():
    with open(build.__file__) as f:
        return bool(f.read(1))

f = torch.compile(lambda x: x + 1 if flag() else x - 1, fullgraph=True, backend="eager")
assert f(torch.zeros(2)).tolist() == [1.0, 1.0]
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_shapes_only_models_do_not_import_dynamo():
    """A model built on the meta device (CLI commands check checkpoints' shapes that way) skips initialisers:
    torch's meta normal_ / pow import dynamo, ~1.7 s of every such command."""
    import subprocess
    import sys

    code = """
import sys, torch
from scaletrain.config import ModelConfig
from scaletrain.weights.sources import expected_shapes
shapes = expected_shapes(ModelConfig(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=96,
                                     vocab_size=128, max_seq_len=32))
assert shapes['model.embed_tokens.weight'] == (128, 64), shapes
assert 'torch._dynamo' not in sys.modules
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
