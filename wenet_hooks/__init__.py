"""wenet_hooks: recognize-ready single-file checkpoints from DeepSpeed ZeRO training.

The core is free of WeNet imports so it serves any DeepSpeed trainer::

    engine.save_checkpoint(model_dir, tag=tag)          # DeepSpeed's sharded save, as before
    save_consolidated(engine, model_dir, tag)           # collective: every rank; rank 0 writes <tag>.pt

or, step by step::

    state_dict = consolidate(engine)                    # collective: every rank calls it
    if state_dict is not None:                          # rank 0
        write_state_dict(state_dict, "exp/epoch_3.pt")  # atomic, verified

The package is organised by stage of the pipeline, each depending only on
those below it: ``wenet`` (the WeNet adapter) -> ``save`` (one collective
save, its ``plan`` built and agreed once) and ``resume`` (exact resume) ->
``gather`` (DeepSpeed's masters and optimizer state to rank 0) -> ``file``
(writer, manifest and the optimizer file's format, verification, atomic
publishing, the commit); ``convert`` (the offline
command) -> ``readers`` (existing checkpoints) -> ``file``. The offline
command's ``config=`` check borrows ``wenet.model`` (WeNet knowledge stays in
the adapter). ``tests/test_layers.py`` holds the exact rules.

Importing this package loads nothing else: each name below is imported on
first use, so the start-up hook (``wenet_hooks.wenet.autoload``) costs nothing
in processes that never use it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

# public name -> module that defines it
_EXPORTS = {
    "consolidate": "wenet_hooks.gather",
    "save_consolidated": "wenet_hooks.save",
    "settle_background": "wenet_hooks.save",
    "SaveOptions": "wenet_hooks.plan",
    "restore": "wenet_hooks.resume",
    "RestoreError": "wenet_hooks.errors",
    "BackgroundWriter": "wenet_hooks.background",
    "write_state_dict": "wenet_hooks.file.publish",
    "verify": "wenet_hooks.file.verify",
    "load_state_dict_file": "wenet_hooks.file.verify",
    "Manifest": "wenet_hooks.file.manifest",
    "TensorSpec": "wenet_hooks.file.manifest",
    "WenetHooksError": "wenet_hooks.errors",
    "ConsolidationError": "wenet_hooks.errors",
    "CheckpointWriteError": "wenet_hooks.errors",
    "CheckpointReadError": "wenet_hooks.errors",
    "VerificationError": "wenet_hooks.errors",
    "SaveError": "wenet_hooks.errors",
    "ConfigError": "wenet_hooks.errors",
}

__all__ = [
    "BackgroundWriter",
    "CheckpointReadError",
    "CheckpointWriteError",
    "ConfigError",
    "ConsolidationError",
    "Manifest",
    "RestoreError",
    "SaveError",
    "SaveOptions",
    "TensorSpec",
    "VerificationError",
    "WenetHooksError",
    "consolidate",
    "load_state_dict_file",
    "restore",
    "save_consolidated",
    "settle_background",
    "verify",
    "write_state_dict",
]

if TYPE_CHECKING:  # what static tools and IDEs see; at run time __getattr__ imports on demand
    from wenet_hooks.background import BackgroundWriter
    from wenet_hooks.errors import (
        CheckpointReadError,
        CheckpointWriteError,
        ConfigError,
        ConsolidationError,
        RestoreError,
        SaveError,
        VerificationError,
        WenetHooksError,
    )
    from wenet_hooks.file.manifest import Manifest, TensorSpec
    from wenet_hooks.file.publish import write_state_dict
    from wenet_hooks.file.verify import load_state_dict_file, verify
    from wenet_hooks.gather import consolidate
    from wenet_hooks.resume import restore
    from wenet_hooks.plan import SaveOptions
    from wenet_hooks.save import save_consolidated, settle_background


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'wenet_hooks' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # imported once
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
