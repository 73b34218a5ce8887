"""Cluster tests (real sshd hosts in network namespaces, a real slurmctld/slurmd): root, apt and minutes.

Not part of the default `python -m pytest -q`: they are skipped unless SCALETRAIN_CLUSTER_TESTS=1
(.ci/run sets it and runs them after the fast suite)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))        # cluster_utils
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # launch_utils

ENABLED = os.environ.get("SCALETRAIN_CLUSTER_TESTS") == "1"


def pytest_configure(config):
    config.addinivalue_line("markers", "cluster: needs root, apt and minutes; runs only with SCALETRAIN_CLUSTER_TESTS=1")


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).resolve().parent
    skip = pytest.mark.skip(reason="cluster test: set SCALETRAIN_CLUSTER_TESTS=1 to run (root, apt, minutes; .ci/run does)")
    for item in items:
        if here in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.cluster)
            if not ENABLED:
                item.add_marker(skip)
