"""Load DeepSpeed's checkpoint pickles without letting them run code.

DeepSpeed reads its own `*_model_states.pt` / `*_optim_states.pt` with `torch.load(weights_only=False)`:
a crafted file in a run dir would execute arbitrary code on resume. Those files legitimately reference
only a handful of classes besides tensors and containers (measured on DeepSpeed 0.19.8, ZeRO 0-3, fp32
and bf16): the ZeRO stage enum, the loss scaler and the fragment address dataclass. So:

- `check_file` lists every global a file's pickle references (torch reads the opcodes, nothing is
  imported) and refuses any name not in ALLOWED -- exact names, not a prefix, because a pickle can reach
  `os.system` through a dotted path such as `deepspeed.runtime.engine.os.system`; then it parses the file
  with torch's restricted unpickler (`weights_only=True`, those classes allow-listed; memory-mapped, so no
  tensor data is read). Run before anything is written, it turns a bad file into one line and exit 2.
- `restrict_engine_loads(engine)` makes DeepSpeed itself load through that restricted unpickler, so the
  file DeepSpeed reads is parsed the same way as the one we checked (no check-then-swap window).

Trust model: with these two in place a checkpoint cannot run code; it can still hold wrong numbers, which
the manifest's sha256 catches only against accidents, not against someone who can rewrite the manifest.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scaletrain.errors import UserError

ALLOWED = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # fp16 runs (GPU)
    "deepspeed.utils.tensor_fragment.fragment_address",
)


def _allowed_classes() -> list:
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _refuse_foreign_globals(path: Path) -> None:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # noqa: BLE001 - truncated zip, not a torch file at all, ...
        raise UserError(f"checkpoint file {path} cannot be read ({type(e).__name__}); it is truncated or not "
                        "a PyTorch file: restore it or resume from another checkpoint") from None
    foreign = [n for n in names if n not in ALLOWED]
    if foreign:
        raise UserError(f"checkpoint file {path} pickles '{foreign[0]}', which no DeepSpeed checkpoint contains; "
                        "refusing to load it (unpickling it could run code): use a run dir you trust")


def load(path: str | Path, map_location=None):
    """torch.load for DeepSpeed's files: restricted unpickler, only ALLOWED classes besides tensors."""
    _refuse_foreign_globals(Path(path))
    with torch.serialization.safe_globals(_allowed_classes()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError and friends: say which file, no traceback
            raise UserError(f"checkpoint file {path} cannot be loaded safely ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:120] if str(e) else ''}); restore it or resume from another checkpoint") from None


def check_file(path: Path) -> None:
    """Parse `path` as `load` would, without reading tensor data (mmap); UserError if it is unsafe or damaged."""
    _refuse_foreign_globals(path)
    with torch.serialization.safe_globals(_allowed_classes()):
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"checkpoint file {path} cannot be loaded safely ({type(e).__name__}); "
                            "it is damaged or was not written by DeepSpeed: restore it or resume from another checkpoint") from None


def check_tag(tag_dir: Path) -> None:
    """Every pickle of one checkpoint tag (DeepSpeed's shards and our rng files)."""
    for path in sorted(Path(tag_dir).glob("*.pt")):
        check_file(path)


def restrict_engine_loads(engine) -> None:
    """Route DeepSpeed's checkpoint reads (model and optimizer states) through `load`."""
    engine.checkpoint_engine.load = lambda path, map_location=None: load(path, map_location)
