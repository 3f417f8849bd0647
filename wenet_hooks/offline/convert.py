"""Converting existing checkpoints of a WeNet ``model_dir`` into single files.

Each tag goes through the same path as a save during training: read -> write
``<tag>.pt.tmp`` -> verify -> publish (rename) -> clean up. A folder-shaped
``<tag>.pt/`` is first moved aside to ``<tag>.pt.being-replaced/`` so a crash
at any point loses nothing; a later run finds it there and finishes the job.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch

from wenet_hooks.consolidate import resolve_dtype
from wenet_hooks.errors import CheckpointReadError, VerificationError, WenetHooksError
from wenet_hooks.io import state_dict_nbytes, tmp_path_for, write_state_dict
from wenet_hooks.offline.folder import FolderCheckpoint, is_folder_shaped
from wenet_hooks.offline.sharded import ShardedCheckpoint, is_sharded_checkpoint
from wenet_hooks.stream import can_stream, write_streamed
from wenet_hooks.verify import Manifest, load_state_dict_file

logger = logging.getLogger(__name__)

ASIDE_SUFFIX = ".being-replaced"  # <tag>.pt.being-replaced/: a folder-shaped .pt during its repair
LATEST = "latest"  # DeepSpeed's file naming the newest tag

SHARDED, FOLDER = "sharded", "folder"


@dataclass(frozen=True)
class Source:
    """Where one tag's weights are read from."""

    tag: str
    kind: str  # SHARDED or FOLDER
    path: Path


@dataclass
class Outcome:
    """One row of the summary table."""

    tag: str
    kind: str
    zero_stage: str = "-"
    world_size: str = "-"
    tensors: int = 0
    nbytes: int = 0
    dtype: str = "-"
    seconds: float = 0.0
    verified: str = "no"
    error: Optional[str] = None


def find_sources(model_dir: Path) -> dict[str, Source]:
    """Every tag in ``model_dir`` with a sharded folder or a folder-shaped ``.pt``."""
    sources: dict[str, Source] = {}
    for entry in sorted(model_dir.iterdir()):
        for suffix in (".pt" + ASIDE_SUFFIX, ".pt"):
            if entry.name.endswith(suffix) and is_folder_shaped(entry):
                tag = entry.name[: -len(suffix)]
                sources.setdefault(tag, Source(tag, FOLDER, entry))
                break
    for entry in sorted(model_dir.iterdir()):
        if is_sharded_checkpoint(entry):  # preferred: complete, frozen weights included
            sources[entry.name] = Source(entry.name, SHARDED, entry)
    return sources


def finish_interrupted_repairs(model_dir: Path, sources: dict[str, Source]) -> None:
    """Remove ``<tag>.pt.being-replaced/`` folders whose single file was already published.

    A file is published only after it verified, so such a folder is a leftover
    of a run stopped between the rename and the clean-up.
    """
    for tag, source in list(sources.items()):
        if source.path.name.endswith(ASIDE_SUFFIX) and has_valid_single_file(model_dir, tag):
            shutil.rmtree(source.path)
            logger.info("removed %s: %s.pt was already written and verified", source.path, tag)
            del sources[tag]


def resolve_tag(model_dir: Path, tag: str, sources: dict[str, Source]) -> str:
    """``latest`` means the tag named in ``model_dir/latest``."""
    if tag != LATEST:
        return tag
    latest = model_dir / LATEST
    if not latest.is_file():
        raise CheckpointReadError(latest, "does not exist, so tag=latest names nothing; HINT: pass tag=<name>")
    named = latest.read_text().strip()
    if named not in sources:
        raise CheckpointReadError(latest, f"names tag '{named}', which has no checkpoint in {model_dir}; "
                                  f"HINT: pass one of: {', '.join(sorted(sources)) or 'none found'}")
    return named


def has_valid_single_file(model_dir: Path, tag: str) -> bool:
    path = model_dir / f"{tag}.pt"
    if not path.is_file():
        return False
    try:
        load_state_dict_file(path)
        return True
    except VerificationError:
        return False


def read_source(source: Source, dtype: torch.dtype) -> tuple[Iterator[tuple[str, torch.Tensor]], Outcome]:
    """Open a source (checking it) and describe it."""
    outcome = Outcome(source.tag, source.kind, dtype=str(dtype).replace("torch.", ""))
    if source.kind == SHARDED:
        checkpoint = ShardedCheckpoint(source.path)
        outcome.zero_stage, outcome.world_size = str(checkpoint.zero_stage), str(checkpoint.world_size)
        return checkpoint.tensors(dtype), outcome
    return FolderCheckpoint(source.path).tensors(dtype), outcome


def convert_tag(source: Source, model_dir: Path, *, dtype: str, overwrite: bool, keep_sharded: bool,
                expected: Optional[Manifest], progress) -> Outcome:
    """Write ``<model_dir>/<tag>.pt`` from ``source``; raises on any failure, leaving the source intact."""
    started = time.perf_counter()
    target = model_dir / f"{source.tag}.pt"
    _check_target(target, source, overwrite)
    if source.kind == SHARDED and can_stream():
        outcome = _stream_sharded(source, target, resolve_dtype(dtype), expected, progress)
        _clean_up(source, keep_sharded)
        outcome.seconds = time.perf_counter() - started
        return outcome
    tensors, outcome = read_source(source, resolve_dtype(dtype))
    state_dict = OrderedDict()
    for key, tensor in tensors:
        state_dict[key] = tensor
        progress(tensor)
    if expected is not None:
        _check_against_model({k: (t.shape, t.dtype) for k, t in state_dict.items()}, expected, source)
    source = _move_folder_aside(source, target)
    write_state_dict(state_dict, target, verify=True)
    outcome.tensors, outcome.nbytes, outcome.verified = len(state_dict), state_dict_nbytes(state_dict), "yes"
    _clean_up(source, keep_sharded)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _stream_sharded(source: Source, target: Path, dtype: torch.dtype, expected: Optional[Manifest],
                    progress) -> Outcome:
    """Sharded -> single file holding one tensor in memory at a time."""
    checkpoint = ShardedCheckpoint(source.path)
    entries = checkpoint.entries(dtype)
    if expected is not None:
        found: dict[str, tuple] = {}
        for e in entries:
            found[e.key] = found[e.alias_of] if e.alias_of else (e.shape, e.dtype)
        _check_against_model(found, expected, source)
    write_streamed(entries, checkpoint.values(entries, dtype), target, on_tensor=progress)
    return Outcome(source.tag, source.kind, str(checkpoint.zero_stage), str(checkpoint.world_size), len(entries),
                   target.stat().st_size, str(dtype).replace("torch.", ""), verified="yes")


def _check_target(target: Path, source: Source, overwrite: bool) -> None:
    tmp = tmp_path_for(target)
    if tmp.exists():  # left by a crash mid-write: never a valid file
        tmp.unlink()
    if target.is_file() and not overwrite and has_valid_single_file(target.parent, source.tag):
        raise WenetHooksError(f"{target} already exists and loads as a single file; HINT: pass overwrite=true "
                              "to replace it")


def _check_against_model(found: dict[str, tuple], expected: Manifest, source: Source) -> None:
    """Keys and shapes of ``found`` (``key -> (shape, dtype)``) against the model's."""
    problems = [f"missing key '{k}' (expected shape {list(s.shape)})" for k, s in expected.tensors.items()
                if k not in found]
    problems += [f"unexpected key '{k}'" for k in found if k not in expected.tensors]
    problems += [f"'{k}': shape {list(found[k][0])}, expected {list(s.shape)}" for k, s in expected.tensors.items()
                 if k in found and tuple(found[k][0]) != tuple(s.shape)]
    if problems:
        raise VerificationError(source.path, ["does not match the model that config builds:", *problems])


def _move_folder_aside(source: Source, target: Path) -> Source:
    if source.kind != FOLDER or source.path != target:
        return source
    aside = target.with_name(target.name + ASIDE_SUFFIX)
    source.path.rename(aside)
    logger.info("moved %s aside to %s until its single file is verified", source.path, aside)
    return Source(source.tag, source.kind, aside)


def _clean_up(source: Source, keep_sharded: bool) -> None:
    if source.kind == FOLDER and source.path.name.endswith(ASIDE_SUFFIX):
        shutil.rmtree(source.path)
    elif source.kind == SHARDED and not keep_sharded:
        shutil.rmtree(source.path)
        logger.info("removed sharded %s (keep_sharded=false)", source.path)
