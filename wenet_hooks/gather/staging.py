"""A background save's host copies, taken off the training thread: the next optimizer step waits for them.

A background gather sends host copies of each rank's flat partitions (the
fp32 masters, and each optimizer state), because training changes the
originals. Only the optimizer's step changes them: forward and backward read
the weights and write gradients, and DeepSpeed copies the masters into the
weights after the base optimizer's step. So the copies need not be taken
while training waits. They are taken at the start of the save's background
job, and a step pre-hook on each torch optimizer of the engine (registered
once per engine) holds the next step until this rank's copies are complete.

The check of the masters against the training weights
(:class:`wenet_hooks.gather.check.ChunkCheck`) reads each chunk of the
masters in the same pass, right after copying it, so it compares what is
sent, and the masters are read once for both.

The copies are taken at the save itself instead (:attr:`Staging.deferred` is
False) when a flat lies on an accelerator, where the device-to-host copy into
pinned memory is fast and a second thread would need streams of its own, or
when the engine has no torch optimizer whose steps could be held.
"""

from __future__ import annotations

import functools
import threading
import time
import weakref
from typing import Any, Callable, Optional, Protocol

import torch

from wenet_hooks.errors import FirstError
from wenet_hooks.gather.masters import EngineView, known_state
from wenet_hooks.gather.snapshots import SnapshotPool

# Elements copied (and checked) at a time: 16 MB of fp32. Each chunk is a few calls that take the GIL back
# from the training thread, which then waits for it: a thread copying in 1 MB calls costs the training
# thread ~39 % of its op rate, in 16 MB calls ~14 % (bench/README.md, table 11). (1 MB kept each chunk in
# cache for its check; the check now reads it from memory again.)
_CHUNK = 1 << 22
# (offset of the chunk in its flat, the chunk in DeepSpeed's buffer, the chunk as copied, or the same when not copied)
Inspect = Callable[[int, torch.Tensor, torch.Tensor], None]


class Check(Protocol):
    """What reads the chunks as they are copied, and what it found."""

    def inspectors(self) -> dict[int, tuple[torch.Tensor, Inspect]]:
        """id(flat) -> (the flat, what reads each of its chunks)."""

    def problem(self) -> Optional[str]:
        """One line naming what was wrong, or None."""


class Staging:
    """One save's host copies of flat partitions, and the checks that read them, taken in one pass."""

    def __init__(self, pool: SnapshotPool, deferred: bool) -> None:
        self._pool = pool
        # Keyed by id(flat): the masters' check and their copy name the same tensor object.
        self._sources: dict[int, torch.Tensor] = {}  # every flat read, in the order it is read
        self._buffers: dict[int, torch.Tensor] = {}  # the host copy of each flat copied (others are only read)
        self._inspect: dict[int, list[Inspect]] = {}  # what reads each chunk of a flat
        self._checks: list[Check] = []
        self.deferred = deferred
        self.done = threading.Event()  # set once :meth:`run` has ended, however it ended
        self.failure = FirstError()

    def buffer_for(self, flat: torch.Tensor) -> torch.Tensor:
        """A host buffer that holds ``flat``'s values once :meth:`run` has run."""
        self._sources.setdefault(id(flat), flat)
        if id(flat) not in self._buffers:
            self._buffers[id(flat)] = self._pool.take(flat)
        return self._buffers[id(flat)]

    def add_check(self, check: Check) -> None:
        """Let ``check`` read the chunks of its flats in the copying pass."""
        self._checks.append(check)
        for flat, inspect in check.inspectors().values():
            self._sources.setdefault(id(flat), flat)
            self._inspect.setdefault(id(flat), []).append(inspect)

    def run(self) -> None:
        """Copy every flat and run the checks on the copied chunks (local: no collective). An error is
        kept in :attr:`failure`; :attr:`done` is set in every case, releasing the held steps."""
        try:
            with torch.no_grad():
                for key, source in self._sources.items():
                    _copy_and_inspect(source, self._buffers.get(key), self._inspect.get(key, []))
        except Exception as e:  # reported by the caller's vote, on every rank
            self.failure.record("copying the masters to host memory", e)
        finally:
            self.done.set()

    def cancel(self) -> None:
        """The copies will never be taken (the job could not start): release the held steps."""
        self.done.set()

    def problem(self) -> Optional[str]:
        """After :meth:`run`: the first check's finding, or None (an error is in :attr:`failure`)."""
        return next((p for p in (c.problem() for c in self._checks) if p is not None), None)

    def release(self) -> None:
        """The copies were sent (or never will be): back to the pool for the next save."""
        self._pool.give_back(list(self._buffers.values()))
        self._sources, self._buffers, self._inspect = {}, {}, {}
        self._checks = []  # (their findings were voted on before)


def _copy_and_inspect(flat: torch.Tensor, buffer: Optional[torch.Tensor], inspectors: list[Inspect]) -> None:
    """``flat`` copied into ``buffer`` (None: only read) chunk by chunk, each chunk read by ``inspectors``
    right after it is copied."""
    source = flat.detach().reshape(-1)
    for lo in range(0, source.numel(), _CHUNK):
        piece = source[lo:lo + _CHUNK]
        copied = piece
        if buffer is not None:
            copied = buffer[lo:lo + piece.numel()]
            copied.copy_(piece)
        for inspect in inspectors:
            inspect(lo, piece, copied)


# DeepSpeed's entry points that write the masters or the optimizer state outside a step (0.14-0.19.8): each
# waits for the copies in flight first. Those of the engine, then those of its ZeRO / bf16 / fp16 optimizer.
ENGINE_WRITERS = ("load_checkpoint", "_load_checkpoint", "_load_zero_checkpoint")
OPTIMIZER_WRITERS = ("load_state_dict", "refresh_fp32_params", "_restore_from_bit16_weights",
                     "_load_universal_checkpoint", "_load_legacy_checkpoint",
                     "load_hp_checkpoint_state_from_checkpoint_dir_stage3")


def new_staging(view: EngineView) -> Staging:
    """The staging of one background save of the engine ``view`` was inspected from: deferred to the
    background job, the next optimizer step held until it has run (by the engine's guard:
    :func:`guard_steps`, once per engine), where the steps can be held."""
    staging = Staging(view.state.pool, can_defer(view))
    if staging.deferred:
        view.state.guard.hold(staging)
    return staging


def can_defer(view: EngineView) -> bool:
    """Whether a background save's copies may wait for its job: every flat lies in host memory, there are
    steps to hold, and the optimizer changes the masters only in them."""
    parts = view.partitions
    on_host = parts is not None and all(flat.device.type == "cpu" for flat in parts.flats)
    return on_host and bool(view.steppers) and not view.writes_in_backward


def guard_steps(engine: Any, view: EngineView) -> None:
    """Once per engine (no-op after), before its first deferred save: its steps (and DeepSpeed's writers of
    the masters outside a step) held while a save's copies are taken. Every hook is in place before the
    guard is kept (a save never defers with nothing held); they are undone when the engine is collected."""
    if view.state.guard is not None or not can_defer(view):
        return
    guard = _StepGuard()
    undo: list[Callable[[], None]] = []
    try:
        for optimizer in view.steppers:
            undo.append(optimizer.register_step_pre_hook(guard).remove)
        undo += _wait_before(engine, ENGINE_WRITERS, guard)
        undo += _wait_before(getattr(engine, "optimizer", None), OPTIMIZER_WRITERS, guard)
    except BaseException:
        for remove in undo:
            remove()
        raise
    view.state.undo += undo
    view.state.guard = guard


def step_wait_seconds(engine: Any) -> float:
    """How long ``engine``'s optimizer steps have waited for copies still being taken (in total)."""
    guard = _guard_of(engine)
    return guard.waited if guard is not None else 0.0


def wait_for_copies(engine: Any) -> None:
    """Block until every copy of ``engine``'s partitions a save asked for is taken (before changing them
    other than by a step: a restore)."""
    guard = _guard_of(engine)
    if guard is not None:
        guard.wait()


class _StepGuard:
    """A step pre-hook: the step waits for the stagings in flight."""

    def __init__(self) -> None:
        self._held: list[Staging] = []
        self._lock = threading.Lock()
        self.waited = 0.0

    def hold(self, staging: Staging) -> None:
        with self._lock:
            self._held = [s for s in self._held if not s.done.is_set()] + [staging]

    def __call__(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """torch's step pre-hook signature; returns None (the step's arguments unchanged)."""
        self.wait()

    def wait(self) -> None:
        """Until every staging held so far has run (or was cancelled)."""
        with self._lock:
            held, self._held = self._held, []
        pending = [s for s in held if not s.done.is_set()]
        if pending:
            started = time.perf_counter()
            for staging in pending:
                staging.done.wait()
            self.waited += time.perf_counter() - started


def _guard_of(engine: Any) -> Optional[_StepGuard]:
    state = known_state(engine)
    return state.guard if state is not None else None


def _wait_before(owner: Any, names: tuple[str, ...], guard: _StepGuard) -> list[Callable[[], None]]:
    """Make each method of ``owner`` named in ``names`` wait for the guard's copies first (on the instance
    only); what undoes each."""
    undo: list[Callable[[], None]] = []
    for name in names:
        method = getattr(type(owner), name, None) if owner is not None else None
        if not callable(method) or name in vars(owner):  # absent, or already an instance attribute
            continue
        try:  # the wrapper holds its owner weakly: no reference cycle keeps an engine alive
            owner_ref: Callable[[], Any] = weakref.ref(owner)
        except TypeError:  # an object without weak references
            owner_ref = functools.partial(lambda o: o, owner)

        def waiting(*args: Any, __method: Callable = method, __owner: Callable = owner_ref, **kwargs: Any) -> Any:
            guard.wait()  # a background save still copying what this writes reads it first
            return __method(__owner(), *args, **kwargs)

        setattr(owner, name, functools.wraps(method)(waiting))
        undo.append(functools.partial(_remove_attribute, owner_ref, name))
    return undo


def _remove_attribute(owner_ref: Callable[[], Any], name: str) -> None:
    owner = owner_ref()
    if owner is not None and name in vars(owner):
        delattr(owner, name)
