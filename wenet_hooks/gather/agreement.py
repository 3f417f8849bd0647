"""What every rank agrees on before a gather: the flat buffers' sizes and who holds which fragment.

Agreeing means every rank sends its fragment list to every other
(``all_gather_object``): O(world x parameters), once per engine. At the
following saves each rank only compares its own description with the one
agreed, and the ranks vote on one boolean: the description is re-agreed only
when some rank's partitions changed (a new engine, DeepSpeed's
``offload_states``/``reload_states``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from wenet_hooks.dist import all_reports, log_rank0
from wenet_hooks.gather.masters import EngineView, Fragment, Partitions, full_numel

logger = logging.getLogger(__name__)

Description = tuple[tuple[int, ...], tuple[Fragment, ...]]  # (flat sizes, fragments) of one rank


@dataclass(frozen=True)
class AgreedLayout:
    """What every rank agreed on: flat buffer sizes and who holds which fragment."""

    flat_numels: list[int]
    by_rank: list[list[Fragment]]
    by_param: dict[int, list[Fragment]]


agreements_made = 0  # full agreements (all_gather_object of every fragment list) in this process


def agree(view: EngineView) -> Optional[AgreedLayout]:
    """Collective (unless this save agreed already): the layout if every rank's description is usable and
    complete, else None.

    Reused from the engine's last agreement while every rank's partitions are
    still described the same; agreed anew (and remembered) otherwise. Within one
    save (one ``view``) the ranks agree once: the save's plan
    (:func:`agree_with`), or the first gather that asks.
    """
    if not view.agreed:
        agree_with(view, None)
    return view.agreed[0]


def agree_with(view: EngineView, mine: Any) -> list[Any]:
    """Collective: agree on the layout as :func:`agree` does, exchanging each rank's ``mine`` in the same
    collective (a save's plan: its optimizer state keys); every rank's ``mine``, in rank order.

    One exchange while every rank's partitions are described as at the
    engine's last agreement; a second, of every rank's fragment list, when
    they are not (the first save of an engine, ``offload_states``...).
    """
    described = describe(view.partitions)
    state = view.state  # the engine's last agreement is kept with it
    known = state.agreed
    unchanged = described is not None and known is not None and known[0] == described
    reports = all_reports((unchanged, mine))
    if known is not None and all(same for same, _ in reports):
        agreed: Optional[AgreedLayout] = known[1]
    else:
        agreed = _agree_anew(described, view.params)
        if agreed is not None and described is not None:
            state.agreed = (described, agreed)
    view.agreed[:] = [agreed]
    return [theirs for _, theirs in reports]


def describe(parts: Optional[Partitions]) -> Optional[Description]:
    """This rank's description of its partitions (None: not one the gather knows)."""
    return None if parts is None else (tuple(f.numel() for f in parts.flats), tuple(parts.fragments))


def _agree_anew(mine: Optional[Description], params: Sequence[torch.nn.Parameter]) -> Optional[AgreedLayout]:
    global agreements_made
    agreements_made += 1
    reports = all_reports(mine)
    if any(r is None for r in reports):
        return None
    sizes = list(reports[0][0])
    if any(list(r[0]) != sizes for r in reports):
        return _unusable("flat fp32 partitions differ in size between ranks")
    by_param: dict[int, list[Fragment]] = defaultdict(list)
    for _, fragments in reports:
        for f in fragments:
            by_param[f.param].append(f)
    for index, fragments in by_param.items():
        if not _covers(fragments, full_numel(params[index])):
            return _unusable(f"fragments of parameter {index} do not cover it exactly once")
    return AgreedLayout(sizes, [list(r[1]) for r in reports], dict(by_param))


def _covers(fragments: list[Fragment], numel: int) -> bool:
    end = 0
    for f in sorted(fragments, key=lambda f: f.start):
        if f.start != end:
            return False
        end += f.numel
    return end == numel


def _unusable(why: str) -> None:
    log_rank0(logger, logging.WARNING, "wenet_hooks: gathering parameter by parameter: %s", why)
    return None
