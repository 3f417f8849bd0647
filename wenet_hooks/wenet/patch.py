"""Installing into WeNet: idempotent, logged, reversible.

WeNet's ``train.py`` and ``executor.py`` import ``save_model`` (and
``train.py`` ``check_modify_and_save_config``) BY NAME from
``wenet.utils.train_utils``, so patching the module attribute alone would
miss them. Every module in ``sys.modules`` that holds the original function
is rebound, and each rebinding is recorded so :func:`uninstall` can undo it.
"""

from __future__ import annotations

import importlib
import logging
import sys
import types
from typing import Callable

from wenet_hooks.wenet import hook

logger = logging.getLogger(__name__)

TRAIN_UTILS = "wenet.utils.train_utils"
# name in train_utils -> function that wraps the original
WRAPPERS: dict[str, Callable[[Callable], Callable]] = {
    "save_model": hook.wrap_save_model,
    "check_modify_and_save_config": hook.wrap_check_modify_and_save_config,
}
ORIGINAL_ATTR = "__wenet_hooks_original__"

# (wrapper, original) pairs currently installed
_installed: list[tuple[Callable, Callable]] = []


def install() -> list[str]:
    """Import WeNet's train_utils and wrap its functions everywhere they are held.

    Returns:
        The places rebound (``module.name``); empty if already installed.
    """
    return patch_train_utils(importlib.import_module(TRAIN_UTILS))


def patch_train_utils(module: types.ModuleType) -> list[str]:
    """Wrap ``save_model`` and ``check_modify_and_save_config`` of ``module`` (idempotent)."""
    places: list[str] = []
    for name, make_wrapper in WRAPPERS.items():
        original = getattr(module, name, None)
        if original is None or hasattr(original, ORIGINAL_ATTR):
            continue
        wrapper = make_wrapper(original)
        setattr(wrapper, ORIGINAL_ATTR, original)
        places += _rebind_everywhere(original, wrapper)
        _installed.append((wrapper, original))
    if places:
        hook.note_installed(places)
        logger.debug("wenet_hooks: installed into WeNet (%s)", ", ".join(places))
    return places


def uninstall() -> list[str]:
    """Put every original function back where the wrappers were."""
    places: list[str] = []
    while _installed:
        wrapper, original = _installed.pop()
        places += _rebind_everywhere(wrapper, original)
    if places:
        logger.info("wenet_hooks: uninstalled from WeNet (%s)", ", ".join(places))
    return places


def is_installed() -> bool:
    return bool(_installed)


def _rebind_everywhere(old: Callable, new: Callable) -> list[str]:
    places = []
    for modname, mod in list(sys.modules.items()):
        if not isinstance(mod, types.ModuleType):
            continue
        namespace = vars(mod)
        for attr, value in list(namespace.items()):
            if value is old:
                namespace[attr] = new
                places.append(f"{modname}.{attr}")
    return places
