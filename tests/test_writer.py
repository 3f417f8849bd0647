"""write_entries(): a torch.save file laid out from shapes, filled one tensor at a time (both writers)."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_state_dicts_equal
from wenet_hooks.file.publish import write_entries
from wenet_hooks.file.writer import Entry


# Every test runs against both writers: the streamed one (torch >= 2.6) and torch.save.
pytestmark = pytest.mark.usefixtures("writer")


def test_streamed_file_equals_torch_save_content(tmp_path):
    embed = torch.randn(5, 3)
    expected = {"embed": embed, "steps": torch.tensor(7), "half": torch.randn(2, 2).to(torch.bfloat16),
                "empty": torch.zeros(0, 4), "out": embed}
    entries = [Entry("embed", (5, 3)), Entry("steps", (), torch.int64), Entry("half", (2, 2), torch.bfloat16),
               Entry("empty", (0, 4)), Entry("out", alias_of="embed")]
    produced = []
    path = write_entries(entries, iter([expected[k] for k in ("embed", "steps", "half", "empty")]),
                          tmp_path / "x.pt", on_tensor=produced.append)
    loaded = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    assert list(loaded) == list(expected)
    assert_state_dicts_equal(loaded, expected)
    assert loaded["embed"].untyped_storage().data_ptr() == loaded["out"].untyped_storage().data_ptr()
    assert len(produced) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


def test_values_given_as_pieces_load_as_the_whole_tensors(tmp_path):
    """How the converter hands over a parameter (its ranks' slices, never assembled): both writers
    write the tensor the pieces make up, the verified manifest's checksums included."""
    from wenet_hooks.file.writer import Pieces

    weight, frozen = torch.randn(6, 4), torch.randn(5).to(torch.bfloat16)
    flat = torch.cat([weight.reshape(-1), torch.zeros(2)])  # one rank's partition, padded
    values = [Pieces((6, 4), torch.float32, (flat[:10], flat[10:24])), Pieces((5,), torch.bfloat16, (frozen,))]
    entries = [Entry("weight", (6, 4)), Entry("frozen", (5,), torch.bfloat16)]
    produced = []
    path = write_entries(entries, iter(values), tmp_path / "x.pt", on_tensor=produced.append)
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    assert_state_dicts_equal(loaded, {"weight": weight, "frozen": frozen})
    assert [v.nbytes for v in produced] == [96, 10]


def test_a_tensor_that_does_not_fit_its_layout_publishes_nothing(tmp_path):
    entries = [Entry("a", (2, 2)), Entry("b", (3,))]
    with pytest.raises(ValueError, match=r"^'b': produced torch.float32\[4\], laid out as torch.float32\[3\]$"):
        write_entries(entries, iter([torch.zeros(2, 2), torch.zeros(4)]), tmp_path / "x.pt")
    assert list(tmp_path.iterdir()) == []



def test_fragments_written_in_any_order_make_up_each_tensor(tmp_path):
    """How rank 0 writes a gather (each rank's fragment of a parameter where it belongs, as it
    arrives: the tail of one before its head, a parameter's pieces interleaved with another's):
    both writers give the whole tensors, the verified manifest's checksums included."""
    from wenet_hooks.file.publish import PendingFile

    weight, half = torch.randn(6, 4), torch.randn(9).to(torch.bfloat16)
    entries = [Entry("weight", (6, 4)), Entry("half", (9,), torch.bfloat16), Entry("tied", alias_of="weight")]
    pending = PendingFile(tmp_path / "x.pt", entries)
    flat = weight.reshape(-1)
    # Empty parts place nothing: before any run, inside one, where one ends, and once the tensor is whole.
    for key, start, end in [("weight", 8, 8), ("weight", 17, 24), ("half", 4, 9), ("weight", 0, 5), ("half", 0, 4),
                            ("weight", 3, 3), ("weight", 5, 5), ("weight", 5, 11), ("weight", 11, 17),
                            ("half", 2, 2)]:
        pending.write_part(key, start, (flat if key == "weight" else half)[start:end])
    path = pending.publish()
    loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    assert_state_dicts_equal(loaded, {"weight": weight, "half": half, "tied": weight})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pt"]


@pytest.mark.parametrize("parts, problem", [
    ([(0, 3), (2, 4)], r"its parts overlap \(more than its 16 bytes written\)"),
    ([(0, 2), (1, 3), (3, 4)], r"its parts overlap \(bytes from 4 written twice or more\)"),
    ([(0, 2), (0, 2)], r"its parts overlap \(bytes from 0 written twice or more\)"),
    ([(3, 5)], r"a part of torch.float32\[2\] at element 3; laid out as torch.float32\[4\] \(4 values\)"),
])
def test_fragments_that_overlap_or_overflow_publish_nothing(tmp_path, parts, problem):
    from wenet_hooks.file.publish import PendingFile

    pending = PendingFile(tmp_path / "x.pt", [Entry("w", (4,))])
    values = torch.arange(5.0)
    with pytest.raises(ValueError, match=rf"^'w': {problem}$"):
        for start, end in parts:
            pending.write_part("w", start, values[start:end])
        pending.publish()
    assert list(tmp_path.iterdir()) == []
