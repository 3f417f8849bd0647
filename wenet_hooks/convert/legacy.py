"""Optimizer files under wenet_hooks 0.2.0's name, ``<tag>.optim.pt``, renamed to ``<tag>.optim``.

WeNet's ``average_model.py`` takes every ``model_dir/[!init]*.pt`` for a
model and loads it with ``strict=False``: an optimizer file under a ``.pt``
name is averaged into the model without a word. The offline command renames
the package's own old files (recognised by their ``meta`` entry, never by
name alone) and says so; anything else is left as it is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from wenet_hooks.errors import VerificationError
from wenet_hooks.file.optimizer_file import LEGACY_SUFFIX, META_KEY, SUFFIX
from wenet_hooks.file.verify import load_state_dict_file

logger = logging.getLogger("wenet_hooks.convert")


def legacy_optimizer_files(model_dir: Path) -> list[Path]:
    """The optimizer files wenet_hooks 0.2.0 wrote in ``model_dir`` (``<tag>.optim.pt``)."""
    return [path for path in sorted(model_dir.glob(f"*{LEGACY_SUFFIX}")) if path.is_file() and _is_ours(path)]


def rename_legacy_optimizer_files(model_dir: Path, dry_run: bool) -> list[tuple[Path, Path]]:
    """Rename each of :func:`legacy_optimizer_files` to ``<tag>.optim`` (none with ``dry_run``).

    One whose new name is taken already (a newer save) is left, with a warning.
    """
    renamed = []
    for old in legacy_optimizer_files(model_dir):
        new = old.with_name(old.name[: -len(LEGACY_SUFFIX)] + SUFFIX)
        if new.exists():
            logger.warning("%s: an optimizer file under wenet_hooks 0.2.0's name beside a newer %s; WeNet's "
                           "average_model.py takes it for a model: remove it", old, new.name)
            continue
        if not dry_run:
            os.replace(old, new)
            logger.info("renamed %s to %s: WeNet's average_model.py takes every *.pt for a model", old, new.name)
        renamed.append((old, new))
    return renamed


def _is_ours(path: Path) -> bool:
    try:
        return META_KEY in load_state_dict_file(path)
    except VerificationError:
        return False
