"""What the package keeps for each DeepSpeed engine between saves, in one weak registry.

An engine's saves share three things: the host buffers its background
gathers send (:class:`~wenet_hooks.gather.snapshots.SnapshotPool`), the step
guard that holds its next optimizer step until a save's copies are taken
(:mod:`wenet_hooks.gather.staging`), and the layout its ranks last agreed on
(:mod:`wenet_hooks.gather.agreement`). They live in one :class:`EngineState`
per engine, made at the first save that needs it and dropped, with whatever
it installed on the engine undone, when the engine is collected.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from wenet_hooks.gather.snapshots import SnapshotPool


@dataclass
class EngineState:
    """One engine's state kept between saves."""

    pool: SnapshotPool = field(default_factory=SnapshotPool)  # host buffers of its background gathers
    guard: Any = None  # its step guard (staging._StepGuard), once a save deferred its copies
    agreed: Any = None  # (this rank's description, the AgreedLayout) of its last agreement
    undo: list[Callable[[], None]] = field(default_factory=list)  # what to undo when the engine goes

    def forget(self) -> None:
        for undo in self.undo:
            undo()
        self.undo = []
        self.pool.clear()


_STATES: dict[int, EngineState] = {}  # id(engine) -> its state, dropped when the engine is collected


def state_of(engine: Any) -> EngineState:
    """``engine``'s state, made on first use (kept for the process's life if it has no weak references)."""
    key = id(engine)
    if key not in _STATES:
        _STATES[key] = EngineState()
        try:
            weakref.finalize(engine, _forget, key)
        except TypeError:
            pass
    return _STATES[key]


def known_state(engine: Any) -> Optional[EngineState]:
    """``engine``'s state if a save made one, else None (nothing is made)."""
    return _STATES.get(id(engine))


def snapshot_pool(engine: Any) -> SnapshotPool:
    """The host buffers kept for ``engine``'s background gathers; freed when the engine is collected."""
    return state_of(engine).pool


def _forget(key: int) -> None:
    state = _STATES.pop(key, None)
    if state is not None:
        state.forget()
