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
