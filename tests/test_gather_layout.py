"""The bucketed gather's bookkeeping, without any process group: whether fragments
cover a parameter, and rank 0 placing chunks that cut fragments anywhere."""

from __future__ import annotations

import pytest
import torch

from wenet_hooks.gather.agreement import AgreedLayout, _covers
from wenet_hooks.errors import FirstError
from wenet_hooks.file.writer import Entry, InMemory
from wenet_hooks.gather.bucketed import _Receiver
from wenet_hooks.gather.masters import Fragment


def test_covers_exactly_once():
    assert _covers([Fragment(0, 0, 0, 0, 3), Fragment(0, 0, 3, 0, 2)], 5)
    assert not _covers([Fragment(0, 0, 0, 0, 3)], 5)  # a gap at the end
    assert not _covers([Fragment(0, 0, 0, 0, 3), Fragment(0, 0, 2, 0, 3)], 5)  # an overlap


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_receiver_places_every_fragment_into_the_sink_whatever_the_chunk_size(chunk):
    """Two ranks, one flat group of 6 each; parameter 0 (2x4) is split across the ranks,
    parameter 1 (3,) lies wholly on rank 1, with padding between. The sink is consolidate()'s
    in-memory one, filled by the same protocol as a file (receive_part)."""
    values, flats, agreed, _ = two_ranks()
    failure = FirstError()
    sink = InMemory([Entry("a", (2, 4)), Entry("b", (3,)), Entry("tied", alias_of="a")])
    receiver = _Receiver(agreed, torch.float32, failure)
    receiver.on_fragment = lambda index, start, piece: sink.receive_part("ab"[index], start, piece)
    for lo in range(0, 6, chunk):
        numel = min(chunk, 6 - lo)
        received = [flats[rank][lo:lo + numel].clone() for rank in range(2)]
        receiver.place(0, lo, received)
    assert not failure
    state = sink.state_dict()
    assert list(state) == ["a", "b", "tied"] and state["tied"] is state["a"]
    assert torch.equal(state["a"], values[0]) and torch.equal(state["b"], values[1])


def two_ranks():
    """The layout of the test above: what rank 0 receives chunk by chunk, and the truth."""
    values = [torch.arange(8.0).view(2, 4), torch.tensor([10.0, 11.0, 12.0])]
    flats = [torch.tensor([0.0, 1, 2, 3, 4, -1]), torch.tensor([5.0, 6, 7, 10, 11, 12])]
    by_rank = [[Fragment(0, 0, 0, 0, 5)], [Fragment(0, 0, 5, 0, 3), Fragment(0, 1, 0, 3, 3)]]
    agreed = AgreedLayout([6], by_rank, {0: [by_rank[0][0], by_rank[1][0]], 1: [by_rank[1][1]]}, ((6,), ()))
    params = [torch.nn.Parameter(torch.empty(2, 4)), torch.nn.Parameter(torch.empty(3))]
    return values, flats, agreed, params


@pytest.mark.parametrize("target", [torch.float32, torch.bfloat16])
def test_receiver_hands_each_fragment_over_as_it_arrives_and_holds_one_chunk(target):
    """With on_fragment (a file's receive_part) nothing is assembled: each fragment, cast to the file's
    dtype, goes to its element offset; the receiver holds at most one cast fragment at a time."""
    values, flats, agreed, params = two_ranks()
    failure, parts = FirstError(), []
    receiver = _Receiver(agreed, target, failure)
    receiver.on_fragment = lambda index, start, piece: parts.append((index, start, piece.clone()))
    for lo in range(0, 6, 4):
        receiver.place(0, lo, [flats[rank][lo:lo + 4].clone() for rank in range(2)])
    assert not failure
    for index, value in enumerate(values):
        got = torch.empty(value.numel(), dtype=target)
        for i, start, piece in (p for p in parts if p[0] == index):
            assert piece.dtype == target
            got[start:start + piece.numel()] = piece
        assert torch.equal(got, value.reshape(-1).to(target))
    assert receiver.peak_bytes <= (0 if target == torch.float32 else 4 * 2)  # one cast fragment (<= a chunk)


def test_receiver_keeps_the_first_failure_and_drops_what_follows():
    _, flats, agreed, _ = two_ranks()
    failure, parts = FirstError(), []
    # A chunk that cannot be placed (here: the sink refuses it) is recorded once; what follows is dropped.
    broken = _Receiver(agreed, torch.float32, failure)

    def refuse(index, start, piece):
        parts.append(index)
        raise OSError("no space left on device")

    broken.on_fragment = refuse
    broken.place(0, 0, [flats[rank][0:3].clone() for rank in range(2)])
    broken.place(0, 3, [flats[rank][3:6].clone() for rank in range(2)])
    assert failure.what == "copying gathered weights (partition 0, offset 0) to host memory" and parts == [0]
    assert isinstance(failure.error, OSError)


def partitions(fragments):
    """This rank's partitions of the two parameters below, as the agreement reads them."""
    from wenet_hooks.gather.masters import Partitions

    flat = torch.zeros(11)
    return Partitions([flat], fragments, None, [flat[:8], flat[8:]])


def test_the_plan_is_one_exchange_and_the_agreement_is_kept_while_unchanged():
    """agree exchanges each rank's word (the optimizer state keys) with its "unchanged" in one collective
    (one process here: a world of one); the fragments are agreed anew only when they change."""
    from wenet_hooks.gather import agreement

    params = [torch.nn.Parameter(torch.empty(2, 4)), torch.nn.Parameter(torch.empty(3))]
    whole = [Fragment(0, 0, 0, 0, 8), Fragment(0, 1, 0, 8, 3)]
    made, kept = agreement.agreements_made, []  # kept: the engine's (EngineState.agreed)
    first, words = agreement.agree(partitions(whole), params, kept, ["exp_avg", "exp_avg_sq"])
    assert words == [["exp_avg", "exp_avg_sq"]] and kept == [first]
    assert agreement.agreements_made == made + 1 and first.flat_numels == [11]
    again, words = agreement.agree(partitions(whole), params, kept)
    assert words == [None] and again is first and agreement.agreements_made == made + 1  # kept
    # Fragments that no longer cover parameter 1: agreed anew, and the gather falls back (None).
    changed, _ = agreement.agree(partitions([Fragment(0, 0, 0, 0, 8), Fragment(0, 1, 0, 8, 2)]), params, kept)
    assert agreement.agreements_made == made + 2 and changed is None and kept == [first]
