"""What every rank agrees on before a gather: the flat buffers' sizes and who holds which fragment.

Agreeing means every rank sends its fragment list to every other
(``all_gather_object``): O(world x parameters), once per engine. At the
following saves each rank only compares its own description with the one
agreed (which the engine keeps: :attr:`~wenet_hooks.gather.masters.EngineState.agreed`),
and the ranks vote on one boolean: the description is re-agreed only when
some rank's partitions changed (a new engine, DeepSpeed's
``offload_states``/``reload_states``). A save's plan makes that vote
(:func:`wenet_hooks.plan.plan_save`), and every gather of the save reads
the layout from the plan.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from wenet_hooks.dist import all_reports, log_rank0
from wenet_hooks.gather.masters import Fragment, Partitions, full_numel

logger = logging.getLogger(__name__)

Description = tuple[tuple[int, ...], tuple[Fragment, ...]]  # (flat sizes, fragments) of one rank


@dataclass(frozen=True)
class AgreedLayout:
    """What every rank agreed on: flat buffer sizes and who holds which fragment; and what this rank
    described (a later save reuses the layout while every rank still describes the same)."""

    flat_numels: list[int]
    by_rank: list[list[Fragment]]
    by_param: dict[int, list[Fragment]]
    described: Description  # this rank's description when it was agreed


agreements_made = 0  # full agreements (all_gather_object of every fragment list) in this process


def agree(parts: Optional[Partitions], params: Sequence[torch.nn.Parameter], kept: list[AgreedLayout],
          mine: Any = None) -> tuple[Optional[AgreedLayout], list[Any]]:
    """Collective: the layout of ``parts`` (this rank's partitions of ``params``) if every rank's is usable
    and complete, else None; and every rank's ``mine`` (a save's optimizer state keys), in rank order,
    exchanged in the same collective.

    One exchange while every rank's partitions are described as in ``kept`` (the engine's last
    agreement, :attr:`~wenet_hooks.gather.masters.EngineState.agreed`: empty, or that one layout, which
    is then returned); a second, of every rank's fragment list, when they are not (the first save of an
    engine, ``offload_states``...): a usable layout then replaces the one in ``kept``.
    """
    described = describe(parts)
    unchanged = described is not None and bool(kept) and kept[0].described == described
    reports = all_reports((unchanged, mine))
    theirs = [other for _, other in reports]
    if kept and all(same for same, _ in reports):
        return kept[0], theirs
    agreed = _agree_anew(described, params)
    if agreed is not None:
        kept[:] = [agreed]
    return agreed, theirs


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
    assert mine is not None  # (every report is one)
    return AgreedLayout(sizes, [list(r[1]) for r in reports], dict(by_param), mine)


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
