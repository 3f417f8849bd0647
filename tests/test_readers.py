"""The readers of existing checkpoints, on their own: real WeNet fixtures, read in one process.

Also the loader's two ways of refusing code in a file: torch's scoped allow-list
(torch >= 2.5) and, where torch has none, our restricted unpickler, which is
exercised here on any torch by switching the allow-list off.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

import wenet_hooks.readers.safe_load as safe_load
from helpers import assert_state_dicts_equal
from wenet_hooks.errors import CheckpointReadError
from wenet_hooks.file.manifest import Manifest
from wenet_hooks.readers.folder import FolderCheckpoint
from wenet_hooks.readers.sharded import ShardedCheckpoint

from conftest import FIXTURES
SHARDED = ["t_z1_model_optimizer", "t_z2_model_optimizer", "t_z3_model_optimizer", "t_z1_lora"]


@pytest.fixture(params=["allow-list", "restricted unpickler"])
def loader(request, monkeypatch):
    if request.param == "restricted unpickler":
        monkeypatch.setattr(safe_load, "safe_globals_context", lambda: None)
    elif safe_load.safe_globals_context() is None:
        pytest.skip("torch < 2.5 has no safe_globals")
    return request.param


def expected_keys(name: str) -> Manifest:
    return Manifest.from_json_file(FIXTURES / name / "expected_keys.json")


@pytest.mark.parametrize("name", SHARDED)
def test_sharded_fixture_reads_every_key_of_the_model(loader, name):
    checkpoint = ShardedCheckpoint(FIXTURES / name / "epoch_0")
    tensors = dict(checkpoint.tensors(torch.float32))
    expected = expected_keys(name)
    assert list(tensors) == list(expected.tensors)
    assert {k: tuple(t.shape) for k, t in tensors.items()} == {k: s.shape for k, s in expected.tensors.items()}
    assert checkpoint.world_size == 2 and checkpoint.zero_stage == int(name[3])


def test_both_loaders_read_the_same_values(monkeypatch):
    folder = FIXTURES / "t_z3_model_optimizer" / "epoch_0"
    first = dict(ShardedCheckpoint(folder).tensors(torch.float32))
    monkeypatch.setattr(safe_load, "safe_globals_context", lambda: None)
    assert_state_dicts_equal(dict(ShardedCheckpoint(folder).tensors(torch.float32)), first)


def test_folder_shaped_fixture(loader):
    tensors = dict(FolderCheckpoint(FIXTURES / "t_z2_model_only" / "epoch_0.pt").tensors(torch.float32))
    # zero_to_fp32 writes buffers first: the same keys, in its own order.
    assert sorted(tensors) == sorted(expected_keys("t_z2_model_only").tensors)


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_crafted_pickle_runs_nothing_with_either_loader(loader, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": Payload(marker)}, path)
    with pytest.raises(CheckpointReadError, match="refused by weights_only loading .*Unsupported global"):
        safe_load.load_shard(path)
    assert not marker.exists()


def test_truncated_file_with_either_loader(loader, tmp_path):
    path = tmp_path / "cut.pt"
    torch.save({"weight": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointReadError, match="cannot be read .*HINT: the file is truncated or corrupt"):
        safe_load.load_shard(path)


def test_restricted_unpickler_refuses_any_global_it_does_not_know():
    unpickler = safe_load._RestrictedUnpickler(__import__("io").BytesIO(b""))
    with pytest.raises(pickle.UnpicklingError, match="os.system was not an allowed global"):
        unpickler.find_class("os", "system")
    assert unpickler.find_class("collections", "OrderedDict").__name__ == "OrderedDict"


@pytest.mark.parametrize("name", ["t_z2_model_optimizer", "t_z3_model_optimizer"])
def test_trainable_parameters_are_handed_over_as_views_of_the_mapped_shards(name):
    """The converter never assembles a parameter: its value is the ranks' slices, views into the
    memory-mapped partitions (no copy), which together hold, bit for bit, what DeepSpeed's own
    zero_to_fp32 reconstructs."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from wenet_hooks.file.writer import Pieces

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        truth = get_fp32_state_dict_from_zero_checkpoint(str(FIXTURES / name), tag="epoch_0")
    checkpoint = ShardedCheckpoint(FIXTURES / name / "epoch_0")
    mapped = {flat.untyped_storage().data_ptr() for rank in range(checkpoint.world_size)
              for flat in checkpoint._flats(rank)}
    entries = checkpoint.entries(torch.float32)
    owners = [e for e in entries if not e.alias_of]
    trainable = set(checkpoint.trainable_names())
    seen = 0
    for e, value in zip(owners, checkpoint.values(entries, torch.float32)):
        if e.key in trainable:
            assert isinstance(value, Pieces), e.key
            assert all(p.untyped_storage().data_ptr() in mapped for p in value.parts), e.key
            assert torch.equal(value.tensor().view(torch.int32), truth[e.key].view(torch.int32)), e.key
            seen += 1
    assert seen == len(trainable) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "cast to bf16"])
def test_every_parameters_mapped_pages_are_released_once_consumed(monkeypatch, dtype):
    """Reading a checkpoint must not keep the shards resident: each trainable parameter's slices are
    handed back to the kernel after the writer is done with the value, also when the value is a cast
    copy (dtype=bf16), and only then (the value written is still intact when the writer gets it)."""
    import wenet_hooks.readers.sharded as sharded

    released = []
    monkeypatch.setattr(sharded, "release_pages", lambda t: released.append(t.data_ptr()))
    checkpoint = ShardedCheckpoint(FIXTURES / "t_z3_model_optimizer" / "epoch_0")
    entries = checkpoint.entries(dtype)
    owners = [e for e in entries if not e.alias_of]
    trainable = set(checkpoint.trainable_names())
    expected = []
    values = checkpoint.values(entries, dtype)
    for e, value in zip(owners, values):
        assert value.dtype == (dtype if e.dtype.is_floating_point else e.dtype)
        if e.key in trainable:
            parts = checkpoint._trainable_slices()[e.key]().parts
            assert not set(p.data_ptr() for p in parts) & set(released), f"{e.key} released before it was written"
            expected += [p.data_ptr() for p in parts]
    assert next(values, None) is None  # the consumer is done with the last value
    assert sorted(released) == sorted(expected) and expected
