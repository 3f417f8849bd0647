"""Converting each planned tag, and the run as a whole.

Each tag goes through the same publisher as a save during training: read ->
write ``<tag>.pt.tmp`` -> verify -> publish (rename) -> clean up. A
folder-shaped ``<tag>.pt/`` is first moved aside to ``<tag>.pt.being-replaced/``
so a crash at any point loses nothing; a later run finds it there and finishes
the job.
"""

from __future__ import annotations

import itertools
import logging
import shutil
import time
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import torch

from wenet_hooks.compat import describe_environment
from wenet_hooks.convert.legacy import rename_legacy_optimizer_files
from wenet_hooks.convert.options import ConvertConfig
from wenet_hooks.convert.plan import ASIDE_SUFFIX, SHARDED, Source, has_valid_single_file, plan
from wenet_hooks.convert.report import Outcome, Progress, print_plan, print_summary
from wenet_hooks.dtypes import dtype_name, resolve_dtype
from wenet_hooks.errors import VerificationError, WenetHooksError, first_line
from wenet_hooks.file.commit import fingerprint
from wenet_hooks.file.manifest import Manifest, TensorSpec, spec_differences
from wenet_hooks.file.optimizer_file import META_KEY, file_key, optimizer_path, to_file_dict
from wenet_hooks.file.publish import tmp_path_for, write_entries, write_state_dict
from wenet_hooks.file.writer import Entry, OnTensor, Value
from wenet_hooks.readers.folder import FolderCheckpoint
from wenet_hooks.readers.sharded import ShardedCheckpoint

logger = logging.getLogger("wenet_hooks.convert")

EXIT_FAILED = 2


def run(options: ConvertConfig) -> int:
    """Convert what ``options`` asks for; the process exit status (0, or 2 when anything was not converted)."""
    logger.debug("wenet_hooks: %s", describe_environment())
    try:
        remove_sharded = options.removes_sharded()
        if Path(options.model_dir).is_dir():
            renamed = rename_legacy_optimizer_files(Path(options.model_dir), options.dry_run)
            if options.dry_run and renamed:
                print("\n".join(f"would rename {old} to {new.name}" for old, new in renamed))
        sources = plan(options)
        expected = _expected_manifest(options)
    except (WenetHooksError, ValueError) as e:
        logger.error("%s", e)
        return EXIT_FAILED
    if options.dry_run:
        print_plan(sources, Path(options.model_dir))
        return 0
    outcomes = [_convert_one(source, options, remove_sharded, expected) for source in sources]
    print_summary(outcomes)
    return EXIT_FAILED if any(o.error for o in outcomes) else 0


def convert_tag(source: Source, model_dir: Path, *, dtype: str, overwrite: bool, remove_sharded: bool,
                expected: Optional[Manifest], progress: OnTensor,
                optimizer: bool = False) -> Outcome:
    """Write ``<model_dir>/<tag>.pt`` from ``source``; raises on any failure, leaving the source intact."""
    started = time.perf_counter()
    target = model_dir / f"{source.tag}.pt"
    _check_target(target, source, overwrite)
    torch_dtype = resolve_dtype(dtype)
    if optimizer and source.kind != SHARDED:
        raise WenetHooksError(f"{source.path} holds weights only: an optimizer file needs DeepSpeed's sharded "
                              f"{source.tag}/ of a model+optimizer save; HINT: convert it without optimizer=true")
    if source.kind == SHARDED:
        outcome = _convert_sharded(source, target, torch_dtype, expected, progress, optimizer)
    else:
        outcome = _convert_folder(source, target, torch_dtype, expected, progress)
    _clean_up(source, target, remove_sharded)
    outcome.seconds = time.perf_counter() - started
    return outcome


def _convert_sharded(source: Source, target: Path, dtype: torch.dtype, expected: Optional[Manifest],
                     progress: OnTensor, optimizer: bool) -> Outcome:
    """Sharded -> single file (and the optimizer file), one tensor in memory at a time where torch allows it."""
    checkpoint = ShardedCheckpoint(source.path)
    if optimizer:  # read and checked before anything is written
        _optimizer_layout(checkpoint)
    entries = checkpoint.entries(dtype)
    if expected is not None:
        found: dict[str, TensorSpec] = {}
        for e in entries:
            found[e.key] = found[e.alias_of] if e.alias_of else TensorSpec(e.shape, e.dtype)
        _check_against_model(found, expected, source)
    write_entries(entries, checkpoint.values(entries, dtype), target, on_tensor=progress)
    if optimizer:  # its meta names the weights just written, as a save's does
        optimizer_entries, optimizer_values = _optimizer_layout(checkpoint, fingerprint(target))
        write_entries(optimizer_entries, optimizer_values, optimizer_path(target), on_tensor=progress)
    return Outcome(source.tag, source.kind, str(checkpoint.zero_stage), str(checkpoint.world_size), len(entries),
                   target.stat().st_size, dtype_name(dtype), verified="yes")


def _optimizer_layout(checkpoint: ShardedCheckpoint,
                      weights: Optional[str] = None) -> tuple[list[Entry], Iterator[Value]]:
    """``<tag>.optim`` as the hook writes it: each parameter's state tensors, then the meta (naming the
    fingerprint of its ``weights``, when given)."""
    keys, names, shapes = checkpoint.optimizer_state_keys(), checkpoint.trainable_names(), checkpoint.full_shapes()
    named = {"weights": weights} if weights is not None else {}
    meta = to_file_dict({}, {**checkpoint.optimizer_meta(), **named})[META_KEY]
    entries = [Entry(file_key(key, name), tuple(shapes[name]), torch.float32) for name in names for key in keys]
    entries.append(Entry(META_KEY, tuple(meta.shape), meta.dtype))
    per_key = [checkpoint.optimizer_values(key, names) for key in keys]
    # The file's order is parameter by parameter, each key's state in turn.
    values = itertools.chain((next(values) for _ in names for values in per_key), [meta])
    return entries, values


def _convert_folder(source: Source, target: Path, dtype: torch.dtype, expected: Optional[Manifest],
                    progress: OnTensor) -> Outcome:
    state_dict: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, tensor in FolderCheckpoint(source.path).tensors(dtype):
        state_dict[key] = tensor
        progress(tensor)
    if expected is not None:
        _check_against_model({k: TensorSpec.of(t) for k, t in state_dict.items()}, expected, source)
    aside = _move_folder_aside(source, target)
    write_state_dict(state_dict, target)
    _remove_aside(aside)
    return Outcome(source.tag, source.kind, tensors=len(state_dict), nbytes=target.stat().st_size,
                   dtype=dtype_name(dtype), verified="yes")


def _convert_one(source: Source, options: ConvertConfig, remove_sharded: bool,
                 expected: Optional[Manifest]) -> Outcome:
    with Progress(source.tag) as progress:
        try:
            return convert_tag(source, Path(options.model_dir), dtype=options.dtype.value,
                               overwrite=options.overwrite, remove_sharded=remove_sharded,
                               expected=expected, progress=progress.update, optimizer=options.optimizer)
        except (WenetHooksError, OSError) as e:  # OSError: the file system refused (permissions, space)
            logger.error("%s: %s", source.tag, e)
            return Outcome(source.tag, source.kind, error=first_line(e))
        except Exception as e:  # anything else a malformed checkpoint provokes: this tag fails, the run goes on
            logger.exception("%s: reading %s failed", source.tag, source.path)
            return Outcome(source.tag, source.kind, error=f"{source.path}: {type(e).__name__}: {first_line(e)}; "
                           "HINT: the checkpoint is damaged or of a layout this package does not know")


def _expected_manifest(options: ConvertConfig) -> Optional[Manifest]:
    if options.config is None:
        return None
    from wenet_hooks.wenet.model import manifest_from_wenet_config

    return manifest_from_wenet_config(Path(options.config))


def _check_target(target: Path, source: Source, overwrite: bool) -> None:
    tmp = tmp_path_for(target)
    if tmp.exists():  # left by a crash mid-write: never a valid file
        tmp.unlink()
    if target.is_file() and not overwrite and has_valid_single_file(target.parent, source.tag):
        raise WenetHooksError(f"{target} already exists and loads as a single file; HINT: pass overwrite=true "
                              "to replace it")


def _check_against_model(found: dict[str, TensorSpec], expected: Manifest, source: Source) -> None:
    """Keys and shapes (not dtypes: ``dtype`` chooses those) against the model's."""
    problems = spec_differences(found, expected, dtypes=False)
    if problems:
        raise VerificationError(source.path, ["does not match the model that config builds:", *problems])


def _move_folder_aside(source: Source, target: Path) -> Optional[Path]:
    """A folder-shaped ``<tag>.pt/`` must leave its name to the file; where it went, if it moved."""
    if source.path.name.endswith(ASIDE_SUFFIX):
        return source.path  # an interrupted repair: already aside
    if source.path != target:
        return None
    aside = target.with_name(target.name + ASIDE_SUFFIX)
    source.path.rename(aside)
    logger.info("moved %s aside to %s until its single file is verified", source.path, aside)
    return aside


def _remove_aside(aside: Optional[Path]) -> None:
    if aside is not None:
        shutil.rmtree(aside)


def _clean_up(source: Source, target: Path, remove_sharded: bool) -> None:
    if source.kind == SHARDED and remove_sharded:
        shutil.rmtree(source.path)
        logger.info("removed sharded %s (keep_sharded=none; %s verified)", source.path, target)
