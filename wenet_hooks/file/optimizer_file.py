"""The optimizer file ``<tag>.optim``: one flat ``dict[str, Tensor]``, so the same
writer, manifest, verification and publishing serve it as ``<tag>.pt``.

Its name does not end in ``.pt`` on purpose: WeNet's ``average_model.py``
averages every ``model_dir/[!init]*.pt`` it finds (newest by mtime), and
loads with ``strict=False``, so an optimizer file named ``*.pt`` would be
averaged into the model silently. wenet_hooks 0.2.0 named it
``<tag>.optim.pt``; such files are still read (:func:`find_optimizer_file`).

On disk (``torch.load(path, weights_only=True)``)::

    {
        "exp_avg/encoder.embed.weight":    Tensor (full fp32, the parameter's shape),
        "exp_avg_sq/encoder.embed.weight": Tensor,
        ...                                # every state key of every trainable parameter
        "meta": uint8 Tensor,              # UTF-8 JSON: format, optimizer class, step,
    }                                      # param groups, lr scheduler, engine counters, loss scaler

It does not depend on the world size or ZeRO stage that wrote it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import torch

from wenet_hooks.errors import VerificationError
from wenet_hooks.file.writer import Entry

logger = logging.getLogger(__name__)

FORMAT = "wenet_hooks.optimizer/1"
META_KEY = "meta"
SUFFIX = ".optim"
LEGACY_SUFFIX = ".optim.pt"  # wenet_hooks 0.2.0: taken for a model by WeNet's average_model.py
# What every optimizer file's meta holds (see to_file_dict's callers).
REQUIRED = ("optimizer", "params", "state_keys", "step", "param_groups", "lr_scheduler", "engine", "loss_scaler",
            "world_size", "zero_stage")
# What DeepSpeed's load_checkpoint restores besides the state tensors, as the meta records it:
ENGINE_COUNTERS = ("global_steps", "global_samples", "skipped_steps")
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")  # fp16 training


def optimizer_path(weights: Union[str, Path]) -> Path:
    """``exp/epoch_3.pt`` -> ``exp/epoch_3.optim``: where the optimizer file of those weights is written."""
    return _beside(weights, SUFFIX)


def legacy_optimizer_path(weights: Union[str, Path]) -> Path:
    """``exp/epoch_3.pt`` -> ``exp/epoch_3.optim.pt``: the name wenet_hooks 0.2.0 wrote."""
    return _beside(weights, LEGACY_SUFFIX)


def find_optimizer_file(weights: Union[str, Path]) -> Optional[Path]:
    """The optimizer file beside ``weights`` under its name, else under 0.2.0's name (said once), else None."""
    for path in (optimizer_path(weights), legacy_optimizer_path(weights)):
        if path.is_file():
            if path.name.endswith(LEGACY_SUFFIX) and path not in _said_legacy:
                _said_legacy.add(path)
                logger.info("wenet_hooks: reading %s, the name wenet_hooks 0.2.0 gave the optimizer file; new saves "
                            "write %s (WeNet's average_model.py takes every *.pt for a model: rename or remove "
                            "the old one)", path, optimizer_path(weights).name)
            return path
    return None


_said_legacy: set[Path] = set()


def _beside(weights: Union[str, Path], suffix: str) -> Path:
    weights = Path(weights)
    stem = weights.name[: -len(".pt")] if weights.name.endswith(".pt") else weights.name
    return weights.with_name(stem + suffix)


def file_key(state: str, param: str) -> str:
    """The file's key of one state tensor, e.g. ``exp_avg/decoder.embed.0.weight``."""
    return f"{state}/{param}"


def to_file_dict(state: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The flat dict written as ``<tag>.optim``.

    Raises:
        ValueError: ``meta`` holds something JSON cannot represent (naming it).
    """
    flat = {file_key(name, param): value for param, values in state.items() for name, value in values.items()}
    flat[META_KEY] = meta_tensor(meta)
    return flat


def file_entries(shapes: Mapping[str, tuple[int, ...]], state_keys: list[str], meta: torch.Tensor) -> list[Entry]:
    """The file's layout from shapes alone, in :func:`to_file_dict`'s order: each parameter's states
    (full fp32), then the meta."""
    entries = [Entry(file_key(key, param), tuple(shape), torch.float32)
               for param, shape in shapes.items() for key in state_keys]
    return entries + [Entry(META_KEY, tuple(meta.shape), torch.uint8)]


def meta_tensor(meta: Mapping[str, Any]) -> torch.Tensor:
    """The meta entry: UTF-8 JSON as a uint8 tensor.

    Raises:
        ValueError: ``meta`` holds something JSON cannot represent (naming it).
    """
    try:
        text = json.dumps({"format": FORMAT, **meta}, sort_keys=True)
    except TypeError as e:
        raise ValueError(f"the optimizer's metadata cannot be stored as plain data ({e}); HINT: an lr scheduler "
                         "whose state_dict() holds objects cannot be saved here") from e
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def from_file_dict(path: Path,
                   loaded: Mapping[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """``(meta, state)`` of a loaded optimizer file.

    Raises:
        VerificationError: it is not an optimizer file of this format.
    """
    if META_KEY not in loaded:
        raise VerificationError(path, [f"has no '{META_KEY}' entry: not an optimizer file written by wenet_hooks "
                                       "(HINT: pass the <tag>.optim written beside <tag>.pt)"])
    try:
        meta = json.loads(bytes(loaded[META_KEY].numpy()).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise VerificationError(path, [f"its '{META_KEY}' entry is not valid JSON ({e})"]) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise VerificationError(path, [f"format {found!r}, expected {FORMAT!r}"])
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise VerificationError(path, [f"its '{META_KEY}' lacks {', '.join(missing)}: not a complete optimizer file"])
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in loaded.items():
        if key != META_KEY:
            name, _, param = key.partition("/")
            state.setdefault(param, {})[name] = value
    return meta, state


def plain(value: Any) -> Any:
    """JSON-ready: tensors and numpy scalars become numbers, tuples lists; dicts and lists recursively."""
    if torch.is_tensor(value):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        return value.item()
    return value
