"""The bucketed gather's bookkeeping, without any process group: whether fragments
cover a parameter, and rank 0 placing chunks that cut fragments anywhere."""

from __future__ import annotations

import pytest
import torch

from wenet_hooks.gather.agreement import AgreedLayout, _covers
from wenet_hooks.gather.bucketed import _Receiver
from wenet_hooks.gather.masters import Fragment


def test_covers_exactly_once():
    assert _covers([Fragment(0, 0, 0, 0, 3), Fragment(0, 0, 3, 0, 2)], 5)
    assert not _covers([Fragment(0, 0, 0, 0, 3)], 5)  # a gap at the end
    assert not _covers([Fragment(0, 0, 0, 0, 3), Fragment(0, 0, 2, 0, 3)], 5)  # an overlap


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 8])
def test_receiver_places_every_fragment_whatever_the_chunk_size(chunk):
    """Two ranks, one flat group of 6 each; parameter 0 (2x4) is split across the ranks,
    parameter 1 (3,) lies wholly on rank 1, with padding between."""
    values = [torch.arange(8.0).view(2, 4), torch.tensor([10.0, 11.0, 12.0])]
    flats = [torch.tensor([0.0, 1, 2, 3, 4, -1]), torch.tensor([5.0, 6, 7, 10, 11, 12])]
    by_rank = [[Fragment(0, 0, 0, 0, 5)], [Fragment(0, 0, 5, 0, 3), Fragment(0, 1, 0, 3, 3)]]
    layout = AgreedLayout([6], by_rank, {0: [by_rank[0][0], by_rank[1][0]], 1: [by_rank[1][1]]})
    failures = []
    params = [torch.nn.Parameter(torch.empty(2, 4)), torch.nn.Parameter(torch.empty(3))]
    receiver = _Receiver(layout, params, torch.float32, lambda what, e: failures.append((what, e)))
    for lo in range(0, 6, chunk):
        numel = min(chunk, 6 - lo)
        received = [flats[rank][lo:lo + numel].clone() for rank in range(2)]
        receiver.place(0, lo, received)
    assert failures == []
    for index, value in enumerate(values):
        assert torch.equal(receiver.tensors[index], value)
