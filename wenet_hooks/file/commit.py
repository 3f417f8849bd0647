"""One save's files committed as a whole, and how a reader tells a committed save from a torn one.

A save writes up to three files: ``<tag>.pt`` (the weights), ``<tag>.optim``
(the optimizer state) and ``<tag>.yaml`` (WeNet's epoch, step and loss, with
the save's record). :func:`commit` makes them appear in one order:

1. every file is sealed under its ``.tmp`` name: written, fsynced, verified
   (:meth:`~wenet_hooks.file.publish.PendingFile.seal`);
2. the record (``<tag>.yaml.tmp``) is written and fsynced, naming the
   fingerprints of the sealed files;
3. the files are renamed (the weights, then the optimizer state), the record
   last, and the folder is fsynced;
4. ``latest_save`` (one line: the tag) is replaced the same way.

A kill at any instant leaves either the previous files of that tag, or a mix
whose fingerprints differ from the record: :func:`committed` tells them
apart, and :func:`newest_committed` skips every save that is not whole. On
disk, ``<tag>.yaml`` gains one key beside WeNet's own::

    wenet_hooks_save: {weights: "a1b2c3d4", optimizer: "0f1e2d3c"}   # optimizer: null without one

The fingerprint of a file is the CRC-32 of its zip directory (each record's
name, size and CRC-32), read without reading the tensors: two saves of
different values never share it in practice, and it is recomputed from the
file a reader finds, so a stale or foreign file beside the record shows. The
weights' fingerprint is the save's id: the optimizer file's meta names it too
(``weights``), so a resume refuses an optimizer file beside weights of another
save. Derived from the bytes, it keeps a resumed run's files bit-identical to
an uninterrupted run's.
"""

from __future__ import annotations

import logging
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import yaml

import wenet_hooks.file.publish as publish
from wenet_hooks.errors import CheckpointWriteError
from wenet_hooks.file.optimizer_file import optimizer_path
from wenet_hooks.file.publish import PendingFile, tmp_path_for

logger = logging.getLogger(__name__)

RECORD_KEY = "wenet_hooks_save"  # the save's record in <tag>.yaml (WeNet keeps unknown keys as they are)
LATEST = "latest_save"  # model_dir/latest_save: the tag of the newest committed save, for scripts and people
INIT_TAG = "init"  # WeNet's save before the first step: never a save to resume from (see newest_committed)


def fingerprint(path: Union[str, Path]) -> str:
    """The CRC-32 (8 hex digits) of a zip file's directory: each record's name, size and CRC-32.

    Raises:
        OSError: the file cannot be read. zipfile.BadZipFile: it is not a zip file.
    """
    crc = 0
    with zipfile.ZipFile(path) as z:
        for info in z.infolist():
            crc = zlib.crc32(info.filename.encode() + struct.pack("<QI", info.file_size, info.CRC), crc)
    return f"{crc:08x}"


@dataclass(frozen=True)
class SaveRecord:
    """What ``<tag>.yaml`` records of the files of its save: their fingerprints (the weights' is the save's id)."""

    weights: str
    optimizer: Optional[str] = None

    def as_yaml(self) -> dict[str, Any]:
        return {"weights": self.weights, "optimizer": self.optimizer}


def commit(weights: PendingFile, optimizer: Optional[PendingFile], info: Optional[Mapping[str, Any]]) -> SaveRecord:
    """Rank 0's end of one save: seal every file, write the record, rename them all, the record last;
    fsync the folder (the module docstring's order). On a failure what is left under a temporary name is
    removed (what was renamed stays: without its record it is not committed).

    Raises:
        CheckpointWriteError, VerificationError: a file failed to seal (nothing was renamed), or the
            file system refused a rename.
    """
    files = [f for f in (weights, optimizer) if f is not None]
    yaml_path = record_path(weights.path)
    try:
        for f in files:
            f.seal()
        record = SaveRecord(fingerprint(weights.tmp), fingerprint(optimizer.tmp) if optimizer is not None else None)
        if info is not None:
            with publish.naming(yaml_path):
                _write_synced(tmp_path_for(yaml_path), yaml.dump({**info, RECORD_KEY: record.as_yaml()}))
        for f in files:
            f.rename()
        with publish.naming(yaml_path):
            if info is not None:
                publish.replace_file(tmp_path_for(yaml_path), yaml_path)
            publish.fsync_dir(yaml_path.parent)
    except BaseException:
        for f in files:
            f.discard()
        if tmp_path_for(yaml_path).exists():
            tmp_path_for(yaml_path).unlink()
        raise
    for f in files:
        f.log_published()
    if info is not None and yaml_path.stem != INIT_TAG:  # the save a resume would take
        try:
            write_latest(yaml_path.parent, yaml_path.stem)
        except CheckpointWriteError as e:  # committed all the same: resume: auto reads the records
            logger.warning("wenet_hooks: %s; the save is committed, the pointer names an older one", e)
    return record


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_latest(model_dir: Path, tag: str) -> None:
    """``model_dir/latest_save`` replaced atomically by one line naming ``tag``."""
    path = Path(model_dir) / LATEST
    with publish.naming(path):
        _write_synced(tmp_path_for(path), tag + "\n")
        publish.replace_file(tmp_path_for(path), path)
        publish.fsync_dir(path.parent)


def record_path(weights: Union[str, Path]) -> Path:
    """``exp/step_3.pt`` -> ``exp/step_3.yaml``."""
    weights = Path(weights)
    return weights.with_name(weights.name[: -len(".pt")] + ".yaml" if weights.name.endswith(".pt")
                             else weights.name + ".yaml")


def read_record(weights: Union[str, Path]) -> Optional[SaveRecord]:
    """The record in the yaml beside ``weights``; None if there is none (or it cannot be read)."""
    path = record_path(weights)
    try:
        with open(path) as f:
            info = yaml.load(f, Loader=yaml.FullLoader)  # as WeNet reads it (its yaml.dump may tag tuples)
        found = info.get(RECORD_KEY) if isinstance(info, dict) else None
        if not isinstance(found, dict) or "weights" not in found:
            return None
        return SaveRecord(str(found["weights"]),
                          None if found.get("optimizer") is None else str(found["optimizer"]))
    except (OSError, yaml.YAMLError):
        return None


def committed(weights: Union[str, Path]) -> Optional[str]:
    """Why the save of ``weights`` is not whole, or None if it is committed: its record names the
    fingerprints of the ``.pt`` (and ``.optim``) found beside it."""
    weights = Path(weights)
    record = read_record(weights)
    if record is None:
        return f"{record_path(weights).name} is missing or holds no {RECORD_KEY} record (the save never committed)"
    pairs = [(weights, record.weights)]
    if record.optimizer is not None:
        pairs.append((optimizer_path(weights), record.optimizer))
    for path, expected in pairs:
        try:
            found = fingerprint(path)
        except (OSError, zipfile.BadZipFile):
            return f"{path.name} is missing or unreadable"
        if found != expected:
            return (f"{path.name} is not the file its save recorded (fingerprint {found}, recorded {expected}): "
                    "a later save of the same tag was cut off")
    return None


def newest_committed(model_dir: Union[str, Path]) -> Optional[Path]:
    """The ``<tag>.pt`` of the newest committed save in ``model_dir`` (by its record's time), ``init``
    excepted: a rerun re-saves ``init`` from what it resumed, without WeNet's epoch or step. None if none."""
    found = []
    for record in Path(model_dir).glob("*.yaml"):
        weights = record.with_suffix(".pt")
        if weights.stem == INIT_TAG or not weights.is_file() or committed(weights) is not None:
            continue
        found.append((record.stat().st_mtime_ns, weights.name, weights))
    return max(found)[2] if found else None
