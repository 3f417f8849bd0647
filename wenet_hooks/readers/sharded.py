"""Reading a DeepSpeed ZeRO-1/2/3 sharded checkpoint ``<model_dir>/<tag>/`` tensor by tensor.

Shards are memory-mapped and each parameter is described by the slices of the
ranks' flat fp32 partitions that hold it (:class:`~wenet_hooks.file.writer.Pieces`):
the writer writes those slices straight from the mappings to their places in
the file, so no parameter is assembled in memory (DeepSpeed's ``zero_to_fp32``
concatenates every rank's optimizer state at once). The layout follows DeepSpeed's own
reconstruction (``deepspeed/utils/zero_to_fp32.py``):

- ZeRO-1/2: ``mp_rank_00_model_states.pt`` holds the module state in training
  precision (all keys, in ``state_dict()`` order), ``param_shapes`` per
  optimizer group and ``shared_params``; each rank's
  ``*zero_pp_rank_<r>_mp_rank_00_optim_states.pt`` holds
  ``single_partition_of_fp32_groups[g]``, consecutive slices of group ``g``'s
  flat fp32 vector (parameters back to back, plus ``param_alignment_paddings``).
- ZeRO-3: every rank has a model-states file (buffers, ``param_shapes``,
  ``frozen_param_fragments``) and an optim file whose ``fp32_flat_groups``
  hold, for each parameter in order, its ``ceil(numel / world_size)`` slice.

Frozen parameters come from the module state (ZeRO-1/2; DeepSpeed's own
converter drops them at ZeRO-1) or from the frozen fragments (ZeRO-3).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from wenet_hooks.errors import CheckpointReadError
from wenet_hooks.file.optimizer_file import ENGINE_COUNTERS, LOSS_SCALER_FIELDS, plain
from wenet_hooks.file.pages import release_pages
from wenet_hooks.file.writer import Entry, Pieces, Value
from wenet_hooks.readers.safe_load import load_shard

OSD = "optimizer_state_dict"
_RANK = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_(model|optim)_states\.pt$")


def is_sharded_checkpoint(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*model_states.pt"))


class ShardedCheckpoint:
    """A checked, memory-mapped view of one ``<model_dir>/<tag>/`` folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        if not is_sharded_checkpoint(self.folder):
            raise CheckpointReadError(
                self.folder, "is not a DeepSpeed checkpoint (no *model_states.pt inside); HINT: pass the "
                "experiment folder as model_dir and the checkpoint's folder name as tag")
        self.optim_files = _rank_files(self.folder, "optim")
        self.optim_states = [load_shard(f) for f in self.optim_files]
        self.optim = [_field(states, OSD, f) for states, f in zip(self.optim_states, self.optim_files)]
        self.zero_stage = int(_first(self.optim, "zero_stage", self.optim_files))
        self.world_size = _world_size(self.optim, self.optim_files)
        _check_same_step(self.optim, self.optim_files)
        if self.zero_stage <= 2:
            self.model_files = [self.folder / "mp_rank_00_model_states.pt"]
        else:
            self.model_files = _rank_files(self.folder, "model")
            _check_rank_count(self.model_files, self.world_size, "model")
        self.model_states = [load_shard(f) for f in self.model_files]
        for path, states in zip(self.model_files, self.model_states):
            _field(states, "module", path)
            _field(states, "param_shapes", path)
        self.module = self.model_states[0]["module"]

    def entries(self, dtype: torch.dtype) -> list[Entry]:
        """The file's layout, from metadata alone: every key in ``state_dict()`` order.

        Of keys that share a tensor (DeepSpeed's ``shared_params``: tied
        weights), the first in order owns it and the others are aliases.
        Floating tensors take ``dtype``.
        """
        source_of = self._sources()
        shapes = self._full_shapes()
        owner_of: dict[str, str] = {}
        layout = []
        for key in self.module:
            source = source_of.get(key, key)
            if source in owner_of:
                layout.append(Entry(key, alias_of=owner_of[source]))
                continue
            owner_of[source] = key
            value = self.module[source]
            layout.append(Entry(key, tuple(shapes.get(source, value.shape)),
                                dtype if value.is_floating_point() else value.dtype))
        return layout

    def values(self, entries: list[Entry], dtype: torch.dtype) -> Iterator[Value]:
        """The values of the non-alias ``entries``, one at a time, read from the shards.

        Parameters kept in ``dtype`` come as :class:`Pieces` (views into the
        mappings, whose pages are released once the consumer asks for the next
        value); the others as tensors.
        """
        readers = {**self._frozen_fragments(), **self._trainable_slices()}
        source_of = self._sources()
        for e in entries:
            if e.alias_of:
                continue
            source = source_of.get(e.key, e.key)
            if source in readers:
                read = readers[source]()
                yield from _released(read, _cast(read, dtype))
            else:  # a buffer, or (ZeRO-1/2) a frozen parameter kept whole in the module state
                yield _cast(self.module[source].clone(), dtype)

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, full tensor)`` in ``state_dict()`` order; aliases yield their owner's tensor."""
        entries = self.entries(dtype)
        values = self.values(entries, dtype)
        done: dict[str, torch.Tensor] = {}
        for e in entries:
            done[e.key] = done[e.alias_of] if e.alias_of else _tensor(next(values))
            yield e.key, done[e.key]

    def optimizer_values(self, key: str, names: list[str]) -> Iterator[Value]:
        """Optimizer state ``key`` of each parameter of ``names`` (full fp32), one at a time, in that order."""
        readers = self._trainable_slices(key)
        for name in names:
            read = readers[name]()
            yield from _released(read, read)

    def _sources(self) -> dict[str, str]:
        return dict(self.model_states[0].get("shared_params") or {})

    def full_shapes(self) -> dict[str, torch.Size]:
        """Every parameter's real shape (ZeRO-3 keeps placeholders in the module state)."""
        return self._full_shapes()

    def _full_shapes(self) -> dict[str, torch.Size]:
        shapes: dict[str, torch.Size] = {}
        for group in self.model_states[0]["param_shapes"]:
            shapes.update(group)
        shapes.update(self.model_states[0].get("frozen_param_shapes") or {})
        return shapes

    def optimizer_state_keys(self) -> list[str]:
        """The optimizer's state tensors per flat partition (``exp_avg``...), as the gather names them."""
        first = self._base_state(0, 0)
        flat = self._flats(0)[0]
        return sorted(k for k, v in first.items() if torch.is_tensor(v) and v.shape == flat.shape)

    def optimizer_meta(self) -> dict[str, Any]:
        """What ``<tag>.optim`` records besides the tensors, read from the shards.

        DeepSpeed's shards do not name the optimizer class: Adam's two moments
        are recorded as ``Adam`` (any Adam-family optimizer resumes from it).
        """
        keys = self.optimizer_state_keys()
        base = self._base(0)
        states = self.model_states[0]
        scaler = getattr(self.optim[0].get("loss_scaler"), "state", None)
        return {
            "optimizer": "Adam" if keys == ["exp_avg", "exp_avg_sq"] else "unknown",
            "params": self.trainable_names(),
            "state_keys": keys,
            "step": float(self._base_state(0, 0).get("step", 0)),
            "param_groups": [{k: plain(v) for k, v in group.items() if k not in ("params", "step")}
                             for group in (base.get("param_groups", []) if isinstance(base, dict) else [])],
            "lr_scheduler": plain(states.get("lr_scheduler")),
            "engine": {k: int(states[k]) for k in ENGINE_COUNTERS if k in states},
            "loss_scaler": ({k: plain(v) for k, v in scaler.items() if k in LOSS_SCALER_FIELDS}
                            if isinstance(scaler, dict) else None),
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
        }

    def trainable_names(self) -> list[str]:
        """The parameters the optimizer holds, in ``state_dict()`` order (tied ones under their first key)."""
        names = {name for group in self.model_states[0]["param_shapes"] for name in group}
        return [key for key in self.module if key in names]

    def _flats(self, rank: int) -> list[torch.Tensor]:
        osd = self.optim[rank]
        return list(osd["single_partition_of_fp32_groups"] if self.zero_stage <= 2 else osd["fp32_flat_groups"])

    def _base(self, rank: int) -> Any:
        """Rank ``rank``'s base optimizer state: torch's ``state_dict()`` (or DeepSpeed's elastic list)."""
        osd = self.optim[rank]
        return (osd.get("base_optimizer_state") if self.zero_stage <= 2 else osd.get(OSD)) or {}

    def _base_state(self, rank: int, group: int) -> dict[str, Any]:
        """The base optimizer's state of flat ``group`` on ``rank``."""
        base = self._base(rank)
        if isinstance(base, list):  # DeepSpeed's elastic layout: one state per group
            return base[group]
        state = base.get("state") or {}
        if group not in state:
            raise CheckpointReadError(self.optim_files[rank], "holds no optimizer state (saved before the first "
                                      "step, or with save_states: model_only); HINT: convert without optimizer=true")
        return state[group]

    def _trainable_slices(self, state_key: Optional[str] = None) -> dict[str, Any]:
        shapes = self.model_states[0]["param_shapes"]
        if self.zero_stage <= 2:
            return self._zero2_slices(shapes, state_key)
        return self._zero3_slices(shapes, state_key)

    def _rank_flats(self, rank: int, state_key: Optional[str]) -> list[torch.Tensor]:
        """Rank ``rank``'s flat fp32 masters, or that optimizer state in the same layout."""
        flats = self._flats(rank)
        if state_key is None:
            return flats
        return [self._base_state(rank, group)[state_key] for group in range(len(flats))]

    def _zero2_slices(self, shapes: list[dict[str, torch.Size]], state_key: Optional[str]) -> dict[str, Any]:
        paddings = self.optim[0].get("param_alignment_paddings")
        flats = [self._rank_flats(rank, state_key) for rank in range(self.world_size)]
        readers = {}
        for group, group_shapes in enumerate(shapes):
            parts = [rank_flats[group] for rank_flats in flats]
            offset = 0
            for index, (name, shape) in enumerate(group_shapes.items()):
                readers[name] = functools.partial(_read_span, parts, offset, torch.Size(shape))
                offset += math.prod(shape) + (paddings[group][index] if paddings else 0)
            _check_consumed(offset, parts, self.world_size, self.folder)
        return readers

    def _zero3_slices(self, shapes: list[dict[str, torch.Size]], state_key: Optional[str]) -> dict[str, Any]:
        flats = [self._rank_flats(rank, state_key) for rank in range(self.world_size)]
        readers, offset = {}, 0
        for group_shapes in shapes:
            for name, shape in group_shapes.items():
                part = math.ceil(math.prod(shape) / self.world_size)
                readers[name] = functools.partial(_read_zero3, flats, offset, part, torch.Size(shape))
                offset += part
        return readers

    def _frozen_fragments(self) -> dict[str, Any]:
        if self.zero_stage <= 2:
            return {}  # frozen parameters are whole in the module state
        shapes = self.model_states[0].get("frozen_param_shapes") or {}
        fragments = [states.get("frozen_param_fragments") or {} for states in self.model_states]
        return {name: functools.partial(_read_frozen, [f[name] for f in fragments], torch.Size(shape))
                for name, shape in shapes.items()}


def _span(parts: list[torch.Tensor], offset: int, numel: int) -> list[torch.Tensor]:
    """Views of the ``numel`` values starting at ``offset`` of the ranks' concatenated ``parts``."""
    views, start = [], 0
    for part in parts:
        end = start + part.numel()
        lo, hi = max(offset, start), min(offset + numel, end)
        if lo < hi:
            views.append(part[lo - start:hi - start])
        start = end
    return views


def _read_span(parts: list[torch.Tensor], offset: int, shape: torch.Size) -> Pieces:
    """The parameter of ``shape`` at ``offset`` of the ranks' concatenated parts (ZeRO-1/2)."""
    return Pieces(tuple(shape), torch.float32, tuple(_span(parts, offset, math.prod(shape))))


def _read_zero3(flats: list[list[torch.Tensor]], offset: int, part: int, shape: torch.Size) -> Pieces:
    """Rank r holds values [r * part, (r + 1) * part) of the parameter at ``offset`` of its groups."""
    views = [view for groups in flats for view in _span(groups, offset, part)]
    return Pieces(tuple(shape), torch.float32, tuple(_span(views, 0, math.prod(shape))))


def _read_frozen(fragments: list[torch.Tensor], shape: torch.Size) -> Pieces:
    flat = [f.reshape(-1) for f in fragments]
    return Pieces(tuple(shape), flat[0].dtype, tuple(_span(flat, 0, math.prod(shape))))


def _released(read: Value, value: Value) -> Iterator[Value]:
    """Yield ``value`` (``read``, or a cast copy of it); once the consumer is done with it, let the
    kernel drop the mapped pages ``read`` was taken from."""
    yield value
    if isinstance(read, Pieces):
        for part in read.parts:
            release_pages(part)


def _tensor(value: Value) -> torch.Tensor:
    return value.tensor() if isinstance(value, Pieces) else value


def _cast(value: Value, dtype: torch.dtype) -> Value:
    if value.dtype == dtype or not value.dtype.is_floating_point:
        return value
    return _tensor(value).to(dtype)


def _rank_files(folder: Path, kind: str) -> list[Path]:
    by_rank: dict[int, Path] = {}
    for path in folder.glob(f"*zero_pp_rank_*_mp_rank_00_{kind}_states.pt"):
        by_rank[int(_RANK.search(path.name).group(1))] = path
    if not by_rank:
        raise CheckpointReadError(folder, f"holds no *_{kind}_states.pt shard; HINT: the save did not finish or "
                                  "was written without its optimizer states (save_states: model+optimizer)")
    missing = sorted(set(range(max(by_rank) + 1)) - set(by_rank))
    if missing:
        raise CheckpointReadError(folder, f"the {kind} shard of rank {missing[0]} is missing "
                                  f"(found ranks {sorted(by_rank)}); HINT: copy it back from the node that wrote it")
    return [by_rank[r] for r in sorted(by_rank)]


def _field(state: Any, key: str, path: Path) -> Any:
    if not isinstance(state, dict) or key not in state:
        raise CheckpointReadError(path, f"is not a DeepSpeed checkpoint shard (no '{key}' in it); HINT: a file "
                                  "of another kind was put in this folder")
    return state[key]


def _first(states: list[dict], key: str, files: list[Path]) -> Any:
    if key not in states[0]:
        raise CheckpointReadError(files[0], f"is not a ZeRO optimizer shard (no '{key}')")
    return states[0][key]


def _world_size(optim: list[dict], files: list[Path]) -> int:
    counts = [max(c) if isinstance(c, list) else int(c) for c in (osd["partition_count"] for osd in optim)]
    for path, count in zip(files, counts):
        if count != counts[0]:
            raise CheckpointReadError(path, f"was written by a job of {count} ranks but {files[0].name} by one of "
                                      f"{counts[0]}: shards from two different runs are mixed in this folder")
    _check_rank_count(files, counts[0], "optim")
    return counts[0]


def _check_rank_count(files: list[Path], world_size: int, kind: str) -> None:
    if len(files) < world_size:
        missing = re.sub(r"zero_pp_rank_\d+_", f"zero_pp_rank_{len(files)}_", files[0].name)
        raise CheckpointReadError(files[0].parent, f"{missing}, the {kind} shard of rank {len(files)}, is missing "
                                  f"({len(files)} of {world_size} ranks found); HINT: copy it back from the node "
                                  "that wrote it")
    if len(files) > world_size:
        raise CheckpointReadError(files[world_size], f"belongs to no rank of this {world_size}-rank save: shards "
                                  "from two different runs are mixed in this folder")


def _check_same_step(optim: list[dict], files: list[Path]) -> None:
    steps = [_optimizer_step(osd) for osd in optim]
    for path, step in zip(files, steps):
        if step != steps[0]:
            raise CheckpointReadError(path, f"was saved at optimizer step {step} but {files[0].name} at step "
                                      f"{steps[0]}: shards from two different saves are mixed in this folder")


def _optimizer_step(osd: dict) -> Optional[tuple[float, ...]]:
    base = osd.get("base_optimizer_state") or osd.get(OSD) or {}
    groups = base if isinstance(base, list) else [base]
    steps = []
    for group in groups:
        for state in (group.get("state") or {}).values() if isinstance(group, dict) else ():
            if isinstance(state, dict) and "step" in state:
                steps.append(float(state["step"]))
    return tuple(steps) or None


def _check_consumed(offset: int, parts: list[torch.Tensor], world_size: int, folder: Path) -> None:
    # DeepSpeed pads each group to a multiple of 2 * world_size.
    align = 2 * world_size
    available = sum(p.numel() for p in parts)
    if math.ceil(offset / align) != math.ceil(available / align):
        raise CheckpointReadError(folder, f"parameter shapes account for {offset} values but the partitions hold "
                                  f"{available}: the model states and optimizer shards do not match")
