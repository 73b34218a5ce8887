"""Shared fixtures: a session-wide data cache dir and a helper that runs the real CLI in a subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from launch_utils import run_cli  # noqa: E402  (the `cli` fixture)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_cache_dir(tmp_path_factory) -> Path:
    """A temp dir to use as `data.cache_dir`, shared by the session so token caches are built once."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture
def cli():
    return run_cli


@pytest.fixture
def one_thread():
    """Tiny tensors: threading only adds overhead (and contention on shared CI machines)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_terminal_summary(terminalreporter):
    """Runs that could not be forks of the preloaded process cost a fresh interpreter each: say so, and why."""
    import preloaded_cli

    if preloaded_cli.fallbacks:
        why = ", ".join(f"{key} ({n} runs)" for key, n in sorted(preloaded_cli.fallbacks.items()))
        terminalreporter.write_line(f"preloaded_cli: fresh interpreters for runs whose environment differed from the "
                                    f"forkserver's in: {why}")
