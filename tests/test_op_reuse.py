"""DeepSpeed's CPU Adam op, once built, is loaded again without compiling when the install that built it is
the same (a fresh venv at the same path gives every source a newer time, and ninja rebuilt it: ~45 s), and
is not when anything it was built from changed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import preloaded_cli
from launch_utils import env

from scaletrain.train import op_reuse

# Builds DeepSpeedCPUAdam as the trainer does and steps it against torch's AdamW.
STEP_BOTH = r"""
import json, os, sys
import torch
from deepspeed.ops.adam import DeepSpeedCPUAdam
from deepspeed.ops.op_builder.builder import OpBuilder
from scaletrain.train.extensions_dir import use_private_extensions_dir
from scaletrain.train.op_reuse import reuse_cpu_adam_build

use_private_extensions_dir()  # (keeps a TORCH_EXTENSIONS_DIR the test set)
torch.manual_seed(0)
start = torch.randn(256)
ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
with reuse_cpu_adam_build():
    opt = DeepSpeedCPUAdam([ours], lr=1e-2, weight_decay=0.1, adamw_mode=True)
torch_opt = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
for _ in range(3):
    for p, o in ((ours, opt), (ref, torch_opt)):
        p.grad = torch.sin(3 * p.detach())
        o.step()
print(json.dumps(dict(diff=(ours - ref).abs().max().item(), moved=(ours - start).abs().min().item(),
                      library=OpBuilder._loaded_ops["cpu_adam"].__file__, dir=os.environ["TORCH_EXTENSIONS_DIR"])))
"""


def _step_both(work: Path, extensions_dir: Path | None = None) -> dict:
    """STEP_BOTH in a process of its own (a fork of the suite's preloaded one: DeepSpeed loads each op once)."""
    e = env()
    if extensions_dir is not None:
        e["TORCH_EXTENSIONS_DIR"] = str(extensions_dir)
    (work / "step_both.py").write_text(STEP_BOTH)
    rc, out, err = preloaded_cli.run((), work, e, timeout=900, main="step_both")  # (a first build: ~1 min)
    assert rc == 0, out[-3000:] + err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["moved"] > 1e-3 and result["diff"] < 1e-6, result  # DeepSpeed's CPU Adam is AdamW
    return result


def test_an_unchanged_install_loads_the_built_op_and_a_changed_one_does_not(tmp_path, monkeypatch):
    built = _step_both(tmp_path)  # builds into the venv's own extensions dir, or finds it built (and stamps it)
    built_dir = Path(built["library"]).parent
    stamp = json.loads((built_dir / op_reuse.STAMP).read_text())

    # The same library and stamp elsewhere, no build files: reuse loads it; a build would fill the dir.
    copy = tmp_path / "ext" / "cpu_adam"
    copy.mkdir(parents=True)
    for name in ("cpu_adam.so", op_reuse.STAMP):
        shutil.copy2(built_dir / name, copy / name)  # (keeps the library's time, which the stamp names)
    reused = _step_both(tmp_path, tmp_path / "ext")
    assert reused["library"] == str(copy / "cpu_adam.so")
    assert sorted(p.name for p in copy.iterdir()) == sorted(["cpu_adam.so", op_reuse.STAMP]), "it compiled"

    # Anything the build came from, or the library itself, changed: not reused (DeepSpeed builds instead);
    # nor when DeepSpeed has the op prebuilt (its loader takes that one).
    from deepspeed import git_version_info
    from deepspeed.ops.op_builder import CPUAdamBuilder

    builder = CPUAdamBuilder()
    loaded = op_reuse._loaded_ops()
    had = loaded.pop("cpu_adam", None)  # (this process may have loaded it through another test)
    try:
        for key, other in [("sources", "0" * 64), ("torch", "0.0"), ("deepspeed", "0.0"), ("cpu", "0" * 64)]:
            (copy / op_reuse.STAMP).write_text(json.dumps({**stamp, key: other}))
            assert not op_reuse._load_if_unchanged(builder, copy), key
        (copy / op_reuse.STAMP).write_text(json.dumps(stamp))
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
        monkeypatch.setitem(git_version_info.installed_ops, "cpu_adam", True)
        with op_reuse.reuse_cpu_adam_build():
            assert "cpu_adam" not in loaded
        monkeypatch.setitem(git_version_info.installed_ops, "cpu_adam", False)
        os.utime(copy / "cpu_adam.so")  # rebuilt since the stamp
        assert not op_reuse._load_if_unchanged(builder, copy)
        assert "cpu_adam" not in loaded
    finally:
        loaded.pop("cpu_adam", None)
        if had is not None:
            loaded["cpu_adam"] = had
