"""verify(): every kind of difference is reported, naming its key."""

from __future__ import annotations

import os
import pickle
import re
from collections import OrderedDict

import pytest
import torch

from wenet_hooks import Manifest, VerificationError, verify


@pytest.fixture
def state_dict():
    embed = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    return OrderedDict(
        [
            ("embed.weight", embed),
            ("cmvn.mean", torch.tensor([0.5, -0.5])),
            ("output.weight", embed),
            ("norm.num_batches_tracked", torch.tensor(7)),
        ]
    )


def write(path, obj):
    torch.save(obj, path)
    return path


def problems_of(path, expected):
    with pytest.raises(VerificationError) as info:
        verify(path, expected)
    assert info.value.path == path
    return info.value.problems


def test_identical_file_passes(tmp_path, state_dict):
    verify(write(tmp_path / "a.pt", state_dict), state_dict)


def test_manifest_records_tied_keys(state_dict):
    assert Manifest.from_state_dict(state_dict).tied == (("embed.weight", "output.weight"),)


def test_missing_key(tmp_path, state_dict):
    saved = OrderedDict((k, v) for k, v in state_dict.items() if k != "cmvn.mean")
    assert problems_of(write(tmp_path / "a.pt", saved), state_dict) == [
        "missing key 'cmvn.mean' (expected shape [2] float32)"
    ]


def test_unexpected_key(tmp_path, state_dict):
    saved = OrderedDict(state_dict, **{"module.extra": torch.zeros(3, dtype=torch.float16)})
    assert problems_of(write(tmp_path / "a.pt", saved), state_dict) == [
        "unexpected key 'module.extra' (shape [3] float16)"
    ]


def test_wrong_shape_and_wrong_dtype(tmp_path, state_dict):
    saved = OrderedDict(state_dict)
    saved["cmvn.mean"] = torch.zeros(3)
    saved["norm.num_batches_tracked"] = torch.tensor(7, dtype=torch.int32)
    assert problems_of(write(tmp_path / "a.pt", saved), state_dict) == [
        "'cmvn.mean': shape [3], expected [2]",
        "'norm.num_batches_tracked': dtype int32, expected int64",
    ]


def test_changed_value(tmp_path, state_dict):
    saved = OrderedDict(state_dict)
    saved["cmvn.mean"] = torch.tensor([0.5, -0.25])
    (problem,) = problems_of(write(tmp_path / "a.pt", saved), state_dict)
    assert re.fullmatch(r"'cmvn.mean': values differ from those gathered \(crc32 [0-9a-f]{8}, expected [0-9a-f]{8}\)", problem)


def test_untied_copy_is_reported(tmp_path, state_dict):
    saved = OrderedDict(state_dict)
    saved["output.weight"] = state_dict["embed.weight"].clone()
    assert problems_of(write(tmp_path / "a.pt", saved), state_dict) == [
        "tied keys ['embed.weight', 'output.weight'] are separate copies, expected one shared tensor"
    ]


def test_every_problem_is_listed_in_one_error(tmp_path, state_dict):
    saved = OrderedDict([("embed.weight", torch.zeros(3, 4)), ("extra", torch.zeros(1))])
    path = write(tmp_path / "a.pt", saved)
    with pytest.raises(VerificationError, match=r"a\.pt failed verification \(5 problem\(s\)\)"):
        verify(path, state_dict)


def test_key_order_is_checked(tmp_path, state_dict):
    saved = OrderedDict(reversed(list(state_dict.items())))
    assert problems_of(write(tmp_path / "a.pt", saved), state_dict) == [
        "keys are all present but in a different order than the model's state_dict()"
    ]


def test_expected_keys_json_without_checksums(tmp_path, state_dict):
    manifest = Manifest.from_key_list(Manifest.from_state_dict(state_dict).to_key_list())
    saved = OrderedDict(state_dict)
    saved["cmvn.mean"] = torch.tensor([9.0, 9.0])  # values are not checked without checksums
    verify(write(tmp_path / "a.pt", saved), manifest)


def test_not_a_state_dict(tmp_path, state_dict):
    path = write(tmp_path / "a.pt", {"model": state_dict, "epoch": 3})
    assert problems_of(path, state_dict) == [
        "entry 'model' is a OrderedDict, expected a Tensor under a str key",
        "entry 'epoch' is a int, expected a Tensor under a str key",
    ]


def test_folder_and_missing_file(tmp_path, state_dict):
    assert problems_of(tmp_path, state_dict) == ["is a folder, expected one regular file"]
    assert problems_of(tmp_path / "nope.pt", state_dict) == ["does not exist"]


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_pickle_is_refused_without_running_it(tmp_path, state_dict):
    marker = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"embed.weight": torch.zeros(1), "x": _RunsCode(marker)}, path, pickle_module=pickle)
    (problem,) = problems_of(path, state_dict)
    assert re.fullmatch(r"holds objects that are not plain tensors and data \((Unsupported global: GLOBAL|unsupported "
                        r"GLOBAL|Unsupported class) (posix|os)\.mkdir.*\); refused, nothing in it was run", problem), problem
    assert not os.path.exists(marker)


def test_truncated_file_says_so(tmp_path, state_dict):
    path = write(tmp_path / "a.pt", state_dict)
    path.write_bytes(path.read_bytes()[:200])
    (problem,) = problems_of(path, state_dict)
    assert re.fullmatch(r"cannot be loaded with torch.load\(weights_only=True, mmap=True\): .*; HINT: the file is "
                        r"truncated or corrupt", problem), problem
