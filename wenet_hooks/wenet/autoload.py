"""Start-up hook of wenet_hooks, imported by ``wenet_hooks.pth`` in every interpreter.

It must cost nothing in processes that never import WeNet, so it imports only
the standard library and does one thing: put a finder on ``sys.meta_path``
that notices when ``wenet.utils.train_utils`` is imported. Right after that
module has run, and before ``train.py`` or ``executor.py`` bind
``save_model`` by name, ``wenet_hooks.wenet.patch.patch_train_utils``
wraps it. Whether the wrapped ``save_model`` does anything is decided by the
``wenet_hooks`` section of ``train.yaml``.

Set ``WENET_HOOKS_DISABLE=1`` to switch all of this off. Importing it
registers the finder; that is its whole purpose (``wenet_hooks.pth`` runs it).
"""

from __future__ import annotations

import os
import sys
from importlib.abc import Loader, MetaPathFinder

ENV_DISABLE = "WENET_HOOKS_DISABLE"
TARGET_MODULE = "wenet.utils.train_utils"


def is_disabled() -> bool:
    return os.environ.get(ENV_DISABLE, "").strip().lower() not in ("", "0", "false", "no")


class _PatchAfterExec(Loader):
    """Delegates to WeNet's own loader, then patches the fresh module."""

    def __init__(self, loader: Loader) -> None:
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        from wenet_hooks.wenet.patch import patch_train_utils

        patch_train_utils(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks
        return getattr(self._loader, name)


class TrainUtilsFinder(MetaPathFinder):
    """Finds nothing itself; wraps the loader that the other finders return."""

    def find_spec(self, fullname, path, target=None):
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PatchAfterExec):
                    spec.loader = _PatchAfterExec(spec.loader)
                return spec
        return None


def install_import_hook() -> bool:
    """Put the finder first on ``sys.meta_path`` (once). False when disabled."""
    if is_disabled():
        return False
    if not any(isinstance(f, TrainUtilsFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, TrainUtilsFinder())
    return True


install_import_hook()
