"""Files WeNet keeps beside its checkpoints: <tag>.yaml, final.pt, sharded folders."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

logger = logging.getLogger(__name__)

FINAL_LINK = "final.pt"


def write_info_yaml(model_dir: Path, tag: str, info_dict: Mapping[str, Any]) -> Path:
    """``<model_dir>/<tag>.yaml`` exactly as WeNet's save_model writes it (atomically).

    ``average_model.py`` and ``load_checkpoint`` read epoch, step and loss from it.
    """
    path = Path(model_dir) / f"{tag}.yaml"
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fout:
        fout.write(yaml.dump(info_dict))
        fout.flush()
        os.fsync(fout.fileno())
    os.replace(tmp, path)
    return path


class FinalLink:
    """Makes ``final.pt`` point to the last ``epoch_N.pt``.

    WeNet's train.py links ``final.pt`` to ``'{N}.pt'``, a file that does not
    exist. When the process exits, a dangling ``final.pt`` is re-pointed to
    the last epoch this process saved; a valid one is left alone.
    """

    def __init__(self) -> None:
        self._last: dict[Path, str] = {}
        self._registered = False

    def remember(self, model_dir: Path, tag: str) -> None:
        self._last[Path(model_dir)] = tag
        if not self._registered:
            atexit.register(self.repair_all)
            self._registered = True

    def repair_all(self) -> None:
        for model_dir, tag in self._last.items():
            repair_final_link(model_dir, tag)


def repair_final_link(model_dir: Path, tag: str) -> bool:
    """Point a missing-target ``final.pt`` at ``<tag>.pt``; True if it was changed."""
    link = Path(model_dir) / FINAL_LINK
    if not link.is_symlink() or link.exists() or not (Path(model_dir) / f"{tag}.pt").is_file():
        return False
    tmp = link.with_name(FINAL_LINK + ".tmp")
    tmp.unlink(missing_ok=True)
    os.symlink(f"{tag}.pt", tmp)
    os.replace(tmp, link)
    logger.info("wenet_hooks: %s now points to %s.pt (WeNet's link was dangling)", link, tag)
    return True


class ShardedRetention:
    """Keeps the K most recent sharded ``<tag>/`` folders whose ``<tag>.pt`` verified.

    Only tags verified by this process are ever candidates, so a folder whose
    single file failed, or one from an earlier run, is never removed.
    """

    def __init__(self) -> None:
        self._verified: dict[Path, list[str]] = {}

    def after_verified(self, model_dir: Path, tag: str, keep_last: Optional[int]) -> list[Path]:
        """Record ``tag`` as safely converted and remove what falls outside ``keep_last``."""
        tags = self._verified.setdefault(Path(model_dir), [])
        tags.append(tag)
        if keep_last is None or len(tags) <= keep_last:
            return []
        doomed, tags[:] = tags[: len(tags) - keep_last], tags[len(tags) - keep_last:]
        return [folder for t in doomed if (folder := _remove_sharded(Path(model_dir), t))]


def _remove_sharded(model_dir: Path, tag: str) -> Optional[Path]:
    folder, single = model_dir / tag, model_dir / f"{tag}.pt"
    if not folder.is_dir() or not single.is_file():
        return None
    shutil.rmtree(folder)
    logger.info("wenet_hooks: removed sharded %s (kept %s)", folder, single)
    return folder
