"""The WeNet adapter: everything this package knows about WeNet.

``config`` (the ``wenet_hooks`` section of train.yaml), ``autoload`` (the start-up
finder that ``wenet_hooks.pth`` installs), ``patch`` (wrapping WeNet's
``save_model`` wherever it is bound), ``hook`` (what the wrapped ``save_model``
does), ``files`` (``<tag>.yaml``, ``final.pt``, sharded-folder retention),
``model`` (the model a train.yaml builds) and ``train`` (the explicit entry).

Like the package, importing this loads nothing: ``install``, ``uninstall`` and
``is_installed`` come from ``patch`` on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["install", "is_installed", "uninstall"]


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'wenet_hooks.wenet' has no attribute {name!r}")
    return getattr(importlib.import_module("wenet_hooks.wenet.patch"), name)
