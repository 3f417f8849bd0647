"""Exact resume from single files, at any world size and ZeRO stage: :func:`restore`.

Right after ``deepspeed.initialize`` and before the first step, every rank
reads ``<tag>.pt`` and ``<tag>.optim`` in full and writes into its own
partitions exactly the slices it owns: the fp32 masters (so bf16 runs do not
resume from bf16-rounded weights) and each optimizer state, through the same
fragments the gather reads them by (:mod:`wenet_hooks.gather.masters`); then
the step, param groups, lr scheduler, engine counters and loss scaler. Both
files are checked completely first, and the ranks agree, so a bad input
changes nothing anywhere.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch

from wenet_hooks.dist import first_failure, get_world_size
from wenet_hooks.errors import RestoreError, VerificationError
from wenet_hooks.file.commit import fingerprint
from wenet_hooks.file.optimizer_file import ENGINE_COUNTERS, from_file_dict
from wenet_hooks.file.verify import load_state_dict_file
from wenet_hooks.gather.check import check_masters, mismatched
from wenet_hooks.gather.masters import EngineView, full_shape, inspect_engine
from wenet_hooks.gather.optimizer import optimizer_family
from wenet_hooks.gather.staging import wait_for_copies

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Restored:
    """What :func:`restore` put back, for its log line."""

    tensors: int  # parameters whose masters and state were set
    state_keys: tuple[str, ...]
    step: float
    saved_by: str  # "ZeRO-2 on 2 ranks"
    restored_onto: str

    def __str__(self) -> str:
        keys = ", ".join(self.state_keys) or "none yet"
        return (f"fp32 masters and optimizer state ({keys}) of {self.tensors} parameters at optimizer step "
                f"{self.step:g}, saved by {self.saved_by}, restored onto {self.restored_onto}")


def restore(engine: Any, weights: Union[str, Path], optimizer_file: Union[str, Path]) -> Restored:
    """Collective: must be called on all ranks, before the first step. Resume exactly.

    The module must hold the weights of ``weights`` (load them before
    ``deepspeed.initialize``, as WeNet's ``--checkpoint`` does): each rank
    checks that the slices it is about to write equal its training weights,
    and after writing that its masters do (:mod:`wenet_hooks.gather.check`).

    Raises:
        RestoreError: on every rank, listing every problem of either file
            (another model, another optimizer type, truncated, not plain data,
            weights the module does not hold); nothing was changed.
        ConsolidationError: on every rank, if the masters written do not
            equal the training weights afterwards (the run must not go on).
    """
    weights, optimizer_file = Path(weights), Path(optimizer_file)
    view = inspect_engine(engine)
    params = {view.names[i]: view.params[i] for i in view.trainable}
    values, meta, state, problems = _read_and_check(view, params, weights, optimizer_file)
    # Every rank read the same files; agreeing still keeps one rank from changing alone.
    problems = first_failure(problems or None)
    if problems:
        raise RestoreError(optimizer_file, problems)
    wait_for_copies(engine)  # a background save still copying these partitions reads them first
    with torch.no_grad():
        _ensure_state(view, meta["state_keys"], meta["step"])
        _write_partitions(view, values, state, meta["state_keys"])
        check_masters(view.partitions, view.names, "the fp32 masters restored")
    _restore_counters(engine, view, meta)
    return Restored(len(params), tuple(meta["state_keys"]), meta["step"],
                    f"ZeRO-{meta['zero_stage']} on {meta['world_size']} ranks",
                    f"ZeRO-{view.stage} on {get_world_size()} ranks")


def _read_and_check(view: EngineView, params: dict[str, torch.nn.Parameter], weights: Path,
                    optimizer_file: Path):
    """Both files read and checked against this run: ``(weights, meta, state, problems)``."""
    if view.partitions is None:
        return {}, {}, {}, [
            "this run keeps its fp32 masters in no partition layout wenet_hooks knows (ZeRO-0, NVMe-swapped "
            "optimizer states); HINT: exact resume needs ZeRO stage 1, 2 or 3 (with or without CPU offload)"]
    problems: list[str] = []
    values, meta, state = None, None, {}
    try:
        values = load_state_dict_file(weights)
    except VerificationError as e:
        problems += [f"{weights}: {p}" for p in e.problems]
    try:
        meta, state = from_file_dict(optimizer_file, load_state_dict_file(optimizer_file))
    except VerificationError as e:
        problems += [f"{optimizer_file}: {p}" for p in e.problems]
    if meta is not None:
        problems += _optimizer_mismatches(view, params, meta, state)
    if values is not None:
        problems += _weight_mismatches(weights, params, values)
        if not problems and meta is not None:
            problems += _other_save(weights, optimizer_file, meta)
        if not problems:
            problems += _not_in_the_module(view, weights, values)
    return values, meta, state, problems


def _other_save(weights: Path, optimizer_file: Path, meta: dict[str, Any]) -> list[str]:
    """The optimizer file names the weights it was saved with (files of wenet_hooks 0.2.0 and older do not)."""
    recorded = meta.get("weights")
    if recorded is None:
        return []
    try:
        found = fingerprint(weights)
    except Exception:  # unreadable: the weights' own check says so
        return []
    if found == recorded:
        return []
    return [f"{optimizer_file.name} belongs to another save than {weights.name} (it was saved beside weights with "
            f"fingerprint {recorded}; {weights} has {found}): a save of the same tag was cut off between its "
            "files; HINT: resume from a committed save (resume: auto finds the newest)"]


def _not_in_the_module(view: EngineView, weights: Path, values: dict[str, torch.Tensor]) -> list[str]:
    """This rank's slices of the file's weights, as they would be written, against its training weights."""
    assert view.partitions is not None
    wrong = mismatched(view.partitions, view.names,
                       lambda f: values[view.names[f.param]].reshape(-1).narrow(0, f.start, f.numel))
    if not wrong:
        return []
    return [f"weights: {len(wrong)} parameter(s) of {weights.name} differ from the weights this run's module holds "
            f"(first: {wrong[0]}); HINT: load the same file into the model before deepspeed.initialize, as "
            "WeNet's --checkpoint does"]


def _weight_mismatches(path: Path, params, values) -> list[str]:
    """Every way the weights differ from this run's trainable parameters."""
    problems = []
    for name, param in params.items():
        shape = tuple(full_shape(param))
        if name not in values:
            problems.append(f"weights: missing key '{name}' (expected shape {list(shape)})")
        elif tuple(values[name].shape) != shape:
            problems.append(f"weights: '{name}': shape {list(values[name].shape)}, expected {list(shape)}")
        elif values[name].dtype != torch.float32:
            problems.append(f"weights: '{name}' is {values[name].dtype}, not the fp32 masters; HINT: exact resume "
                            f"needs a <tag>.pt saved with dtype: fp32 (this one is {path.name})")
            break
    return problems


def _optimizer_mismatches(view: EngineView, params, meta, state) -> list[str]:
    """Every way the optimizer file differs from this run's model and optimizer."""
    problems = []
    mine = type(view.optimizer).__name__
    if optimizer_family(meta["optimizer"]) != optimizer_family(mine):
        problems.append(f"holds {meta['optimizer']} state, but this run's optimizer is {mine}; HINT: resume "
                        "with the optimizer the checkpoint was trained with, or without the .optim file")
    groups = view.optimizer.param_groups
    if len(meta["param_groups"]) != len(groups):
        problems.append(f"has {len(meta['param_groups'])} param groups, this run's optimizer {len(groups)}")
    if set(meta["params"]) != set(params):
        problems.append(f"holds the state of {len(meta['params'])} trainable parameters, this model has "
                        f"{len(params)} (first difference: "
                        f"'{next(iter(sorted(set(meta['params']) ^ set(params))))}')")
    if not meta["state_keys"]:
        if meta["step"] > 0:
            problems.append(f"holds no optimizer state although it was saved at optimizer step {meta['step']:g}: "
                            "the state was kept where it was not read; HINT: resume without the optimizer file "
                            "(weights only)")
        return problems  # saved before the first step: no state, nothing per parameter
    for name, param in params.items():
        shape = tuple(full_shape(param))
        for key in meta["state_keys"]:
            found = state.get(name, {}).get(key)
            if found is None:
                problems.append(f"missing state '{key}/{name}' (expected shape {list(shape)})")
            elif tuple(found.shape) != shape:
                problems.append(f"'{key}/{name}': shape {list(found.shape)}, expected {list(shape)}")
    problems += [f"unexpected state of '{name}': not a trainable parameter of this model"
                 for name in state if name not in params]
    return problems


def _ensure_state(view: EngineView, keys: list[str], step: float) -> None:
    """Create the optimizer's state before its first step, as it would create it itself."""
    if not keys:
        return  # saved before the first step: the optimizer creates its state itself, as it would have
    optimizer = view.optimizer
    # torch's own optimizers keep the step as a float tensor; DeepSpeed's (CPU and fused Adam) as an int.
    as_tensor = type(optimizer).__module__.startswith("torch.optim")
    assert view.partitions is not None
    for flat in view.partitions.flats:
        state = optimizer.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
        state["step"] = step_value(step, _group_of(optimizer, flat), flat.device) if as_tensor else int(step)
    for group in optimizer.param_groups:
        if "step" in group:  # DeepSpeed's fused Adam counts in the group
            group["step"] = int(step)


def step_value(step: float, group: dict[str, Any], device: torch.device) -> torch.Tensor:
    """``state["step"]`` as torch's Adam/AdamW make it for ``group``: on the parameters' device in
    float32 when ``fused`` or ``capturable`` (their kernels read it there), else a CPU scalar of the
    default float dtype (torch's ``_get_scalar_dtype``)."""
    if group.get("fused") or group.get("capturable"):
        dtype = torch.float32 if group.get("fused") else _scalar_dtype()
        return torch.tensor(step, dtype=dtype, device=device)
    return torch.tensor(step, dtype=_scalar_dtype())


def _group_of(optimizer: Any, flat: torch.Tensor) -> dict[str, Any]:
    # DeepSpeed hands each flat partition to its group's "params" while it steps (ZeRO-3 empties it
    # between steps); the groups agree on fused/capturable in practice, so the first one decides there.
    groups = optimizer.param_groups
    return next((g for g in groups if any(p is flat for p in g["params"])), groups[0])


def _scalar_dtype() -> torch.dtype:
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _write_partitions(view: EngineView, values, state, keys: list[str]) -> None:
    """Each fragment this rank owns, from the full tensors: the masters, then every state."""
    parts, names = view.partitions, view.names
    assert parts is not None
    targets = [(parts.flats, values)]
    targets += [([view.optimizer.state[flat][key] for flat in parts.flats],
                 {names[i]: state[names[i]][key] for i in view.trainable}) for key in keys]
    for flats, full in targets:
        for f in parts.fragments:
            source = full[names[f.param]].reshape(-1).narrow(0, f.start, f.numel)
            flats[f.group].narrow(0, f.offset, f.numel).copy_(source)


# How this run's optimizer computes, not what it computes: the new run's configuration decides.
_IMPLEMENTATION_FLAGS = ("step", "fused", "capturable", "foreach", "differentiable")


def _restore_counters(engine: Any, view: EngineView, meta: dict[str, Any]) -> None:
    for group, saved in zip(view.optimizer.param_groups, meta["param_groups"]):
        for key, value in saved.items():
            if key in group and key not in _IMPLEMENTATION_FLAGS:
                group[key] = type(group[key])(value) if isinstance(group[key], tuple) else value
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and meta.get("lr_scheduler") is not None:
        scheduler.load_state_dict(meta["lr_scheduler"])
    for name in ENGINE_COUNTERS:
        if name in meta.get("engine", {}) and hasattr(engine, name):
            setattr(engine, name, meta["engine"][name])
    scaler = getattr(getattr(engine, "optimizer", None), "loss_scaler", None)
    for name, value in (meta.get("loss_scaler") or {}).items():
        if scaler is not None and hasattr(scaler, name):
            setattr(scaler, name, value)

