"""Checkpoint files whose pickle runs a shell command when unpickled (it creates a marker file): if the
marker exists after a loading path ran, that path executed attacker code."""

from __future__ import annotations

import os
import struct
import types
from pathlib import Path

import torch


class _Payload:
    def __init__(self, marker: Path):
        self.cmd = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.cmd,)


def write_classic(path: Path, marker: Path) -> Path:
    """A valid PyTorch zip whose pickle calls posix.system (what any `weights_only=False` load executes)."""
    torch.save({"module": {"x": torch.zeros(2)}, "optimizer_state_dict": _Payload(marker)}, path)
    return path


def write_dotted(path: Path, marker: Path) -> Path:
    """The same call reached through a dotted name under `deepspeed.`: GLOBAL 'deepspeed.runtime.engine'
    'os.system' (protocol 4 resolves attribute paths). A loader that trusts anything named `deepspeed.*`
    would run it."""
    cmd = f"touch {marker}".encode()
    raw = (b"\x80\x04" + b"cdeepspeed.runtime.engine\nos.system\n" + b"X" + struct.pack("<I", len(cmd)) + cmd
           + b"\x85R.")

    class _Raw:
        def __init__(self, f, protocol=None):
            self.f = f

        def dump(self, _obj):
            self.f.write(raw)

    module = types.SimpleNamespace(Pickler=_Raw, __name__="raw_pickle")
    torch.save({}, path, pickle_module=module, pickle_protocol=4)
    return path


def fix_manifest(tag_dir: Path) -> None:
    """Re-hash every file into the manifest, as an attacker who can write the run dir would."""
    import hashlib
    import json

    mpath = tag_dir / "manifest.json"
    m = json.loads(mpath.read_text())
    files = {}
    for p in sorted(tag_dir.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            files[str(p.relative_to(tag_dir))] = {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "bytes": p.stat().st_size}
    m["files"] = files
    mpath.write_text(json.dumps(m, indent=1))


def self_check(tmp: Path) -> None:
    """The payloads really do run code under an unrestricted load (else the tests prove nothing)."""
    for writer in (write_classic, write_dotted):
        marker = tmp / f"marker-{writer.__name__}"
        f = writer(tmp / f"{writer.__name__}.pt", marker)
        import deepspeed.runtime.engine  # noqa: F401  (the dotted payload resolves through it)

        torch.load(f, weights_only=False)
        assert marker.exists(), f"{writer.__name__} did not run its payload"
        marker.unlink()
