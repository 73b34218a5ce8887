"""Every random number generator a rank may draw from, as plain values that `torch.load(weights_only=True)`
accepts (no numpy objects in the pickle): saved with each checkpoint, restored on resume."""

from __future__ import annotations

import random

import numpy as np
import torch


def capture() -> dict:
    version, key, gauss = random.getstate()
    kind, np_key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(key), gauss],
        "numpy": [kind, torch.from_numpy(np_key.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict) -> None:
    """Checkpoints written before python/numpy/cuda states were saved hold only "torch": restore what is there."""
    torch.set_rng_state(state["torch"])
    if "python" in state:
        version, key, gauss = state["python"]
        random.setstate((version, tuple(key), gauss))
    if "numpy" in state:
        kind, key, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, key.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
