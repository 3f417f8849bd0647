"""Loading files of unknown origin without ever running code from them.

DeepSpeed's shards pickle a few of its own classes (an enum, the loss scaler,
fragment addresses). They are allowed by name and rebuilt as inert stand-ins
that keep their constructor arguments and state: a crafted file cannot run
code here, and reading a checkpoint needs no DeepSpeed import (seconds saved).

torch >= 2.5 scopes such an allow-list with ``torch.serialization.safe_globals``
around ``torch.load(weights_only=True)``. Older torch has no scoped allow-list
(2.4's ``add_safe_globals`` would change every later load in the process), so
there the file is unpickled by :class:`_RestrictedUnpickler`: the standard
library's documented way to restrict unpickling, allowing exactly the globals
torch's own ``weights_only`` loader allows plus the stand-ins.
"""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import torch

from wenet_hooks.compat import safe_globals_context
from wenet_hooks.errors import CheckpointReadError, first_line
from wenet_hooks.file.verify import refused_global

# Every non-torch class DeepSpeed (0.14 to 0.19) puts in its shards.
DEEPSPEED_CLASSES = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)


class DeepSpeedObject:
    """A DeepSpeed object as read from a shard: its arguments and state, no behaviour."""

    def __init__(self, *args: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __int__(self) -> int:  # ZeroStageEnum(2) -> 2
        return int(self.args[0])


def _stand_in(qualified: str) -> type:
    """A DeepSpeedObject subclass named as DeepSpeed's class, so allow-lists key it by that name."""
    module, name = qualified.rsplit(".", 1)
    return type(name, (DeepSpeedObject,), {"__module__": module, "__qualname__": name})


_STAND_INS = [_stand_in(name) for name in DEEPSPEED_CLASSES]


def load_shard(path: Path) -> Any:
    """Load ``path`` memory-mapped, allowing plain data, tensors and DeepSpeed's classes only.

    Raises:
        CheckpointReadError: the file is missing, truncated, corrupt, or holds
            objects that are not plain data.
    """
    try:
        return _load(path)
    except FileNotFoundError as e:
        raise CheckpointReadError(path, "does not exist") from e
    except pickle.UnpicklingError as e:
        raise CheckpointReadError(
            path,
            "holds objects that are not plain tensors and data, refused by weights_only loading "
            f"({refused_global(e)}); HINT: this package never unpickles arbitrary objects. "
            "If the file is yours and was written by another DeepSpeed version, report the class named above",
        ) from e
    except Exception as e:
        raise CheckpointReadError(
            path, f"cannot be read ({first_line(e)}); HINT: the file is truncated or corrupt: "
            "restore it, or convert another tag"
        ) from e


def _load(path: Path) -> Any:
    # str: torch 2.1-2.3 take mmap=True only with a file name, not a Path.
    allow = safe_globals_context()
    if allow is not None:
        with allow(_STAND_INS):  # classes (not (class, name) pairs, which torch 2.5 does not take)
            return torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    # torch < 2.5: torch.load refuses a pickle_module together with weights_only=True,
    # so its own unpickler is switched off and ours, as strict, takes its place.
    return torch.load(str(path), map_location="cpu", mmap=True, pickle_module=_RESTRICTED_PICKLE,
                      weights_only=False)


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals torch's ``weights_only`` loader allows, and the stand-ins."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = _allowed_globals()
        # Protocol-2 pickles name Python 2's module; the stdlib maps it the same way.
        qualified = f"{'builtins' if module == '__builtin__' else module}.{name}"
        if qualified in allowed:
            return allowed[qualified]
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {qualified} was not an allowed global")


def _allowed_globals() -> dict[str, Any]:
    from torch import _weights_only_unpickler

    allowed = dict(_weights_only_unpickler._get_allowed_globals())
    # Plain containers that DeepSpeed's shards hold and torch >= 2.5 allows as well.
    allowed.update({"builtins.set": set, "builtins.frozenset": frozenset})
    allowed.update({f"{cls.__module__}.{cls.__qualname__}": cls for cls in _STAND_INS})
    return allowed


# torch.load(pickle_module=...) wants a module-like object with Unpickler and load.
_RESTRICTED_PICKLE = types.SimpleNamespace(
    Unpickler=_RestrictedUnpickler,
    load=lambda file, **kwargs: _RestrictedUnpickler(file, **kwargs).load(),
    __name__="wenet_hooks_restricted_pickle",
)
