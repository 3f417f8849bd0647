"""Strict, key-by-key checking of a written checkpoint against what was expected.

A :class:`Manifest` records, for every key, the shape, dtype and (optionally) a
CRC32 of the bytes, plus which keys must share one storage (tied weights).
:func:`verify` reopens the file the way WeNet does (``torch.load`` with
``mmap=True``, here also ``weights_only=True``) and reports every difference
at once.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from wenet_hooks.errors import VerificationError
from wenet_hooks.pages import release_pages


@dataclass(frozen=True)
class TensorSpec:
    """What one entry of a state dict must be."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    checksum: int | None = None  # CRC32 of the raw bytes; None: not checked

    def describe(self) -> str:
        return f"shape {list(self.shape)} {_dtype_name(self.dtype)}"


@dataclass(frozen=True)
class Manifest:
    """The expected content of a state-dict file, in key order.

    ``tied`` holds groups of keys that must be one tensor in the file (for
    example ``("decoder.embed.0.weight", "decoder.output_layer.weight")``).
    """

    tensors: dict[str, TensorSpec]
    tied: tuple[tuple[str, ...], ...] = field(default=())

    @classmethod
    def from_state_dict(cls, state_dict: Mapping[str, torch.Tensor], checksums: bool = True) -> Manifest:
        """Describe a state dict exactly: shapes, dtypes, CRC32 of the values, tied keys."""
        tensors: dict[str, TensorSpec] = {}
        by_storage: dict[tuple[int, int], list[str]] = {}
        for key, tensor in state_dict.items():
            crc = tensor_checksum(tensor) if checksums else None
            tensors[key] = TensorSpec(tuple(tensor.shape), tensor.dtype, crc)
            if tensor.numel():  # every empty tensor has the same null data pointer
                by_storage.setdefault(_storage_id(tensor), []).append(key)
        tied = tuple(tuple(keys) for keys in by_storage.values() if len(keys) > 1)
        return cls(tensors, tied)

    @classmethod
    def from_key_list(cls, keys: Mapping[str, Any]) -> Manifest:
        """From ``{key: [shape, dtype_name]}``, the format of ``expected_keys.json``."""
        tensors = {
            key: TensorSpec(tuple(int(d) for d in shape), _dtype_from_name(name))
            for key, (shape, name) in keys.items()
        }
        return cls(tensors)

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> Manifest:
        """Read a ``{key: [shape, dtype_name]}`` json file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_key_list(json.load(f))

    def to_key_list(self) -> dict[str, list[Any]]:
        """The ``{key: [shape, dtype_name]}`` form, for json."""
        return {k: [list(s.shape), _dtype_name(s.dtype)] for k, s in self.tensors.items()}


def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes in C order (any dtype, bf16 included)."""
    flat = tensor.detach().reshape(-1).contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    return zlib.crc32(raw.cpu().numpy().data)


def load_state_dict_file(path: Union[str, Path]) -> dict[str, torch.Tensor]:
    """Open a single-file checkpoint as WeNet does, but refusing arbitrary pickles.

    Raises:
        VerificationError: the file is missing, a folder, unreadable, needs
            more than ``weights_only=True`` allows, or is not a flat
            ``dict[str, Tensor]``.
    """
    path = Path(path)
    if path.is_dir():
        raise VerificationError(path, ["is a folder, expected one regular file"])
    try:
        obj = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError as e:
        raise VerificationError(path, ["does not exist"]) from e
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VerificationError(
            path, [f"cannot be loaded with torch.load(weights_only=True, mmap=True): {reason}"]
        ) from e
    problems = _flat_dict_problems(obj)
    if problems:
        raise VerificationError(path, problems)
    return obj


def verify(path: Union[str, Path], expected: Union[Manifest, Mapping[str, torch.Tensor]]) -> None:
    """Reopen ``path`` and check it key by key against ``expected``.

    Checks key set and order, shapes, dtypes, value checksums (where the
    manifest has them) and that tied keys share one storage.

    Args:
        path: the written single-file checkpoint.
        expected: a :class:`Manifest`, or a state dict to derive one from.

    Raises:
        VerificationError: listing every problem found, each naming its key.
    """
    if not isinstance(expected, Manifest):
        expected = Manifest.from_state_dict(expected)
    loaded = load_state_dict_file(path)
    problems = compare(loaded, expected, from_mapped_file=True)
    if problems:
        raise VerificationError(Path(path), problems)


def compare(state_dict: Mapping[str, torch.Tensor], expected: Manifest, *, from_mapped_file: bool = False) -> list[str]:
    """Every difference between ``state_dict`` and ``expected``, one line per problem.

    ``from_mapped_file``: the tensors come from ``torch.load(mmap=True)``; the
    pages of each are dropped once checksummed, so checking a 6 GB file does
    not keep 6 GB resident. Never set it for tensors in ordinary memory.
    """
    problems: list[str] = []
    for key, spec in expected.tensors.items():
        if key not in state_dict:
            problems.append(f"missing key '{key}' (expected {spec.describe()})")
            continue
        problems.extend(_tensor_problems(key, state_dict[key], spec, from_mapped_file))
    for key in state_dict:
        if key not in expected.tensors:
            found = state_dict[key]
            problems.append(
                f"unexpected key '{key}' ({TensorSpec(tuple(found.shape), found.dtype).describe()})"
            )
    if not problems and list(state_dict) != list(expected.tensors):
        problems.append("keys are all present but in a different order than the model's state_dict()")
    problems.extend(_tied_problems(state_dict, expected.tied))
    return problems


def _tensor_problems(key: str, tensor: torch.Tensor, spec: TensorSpec, from_mapped_file: bool) -> list[str]:
    problems = []
    if tuple(tensor.shape) != spec.shape:
        problems.append(f"'{key}': shape {list(tensor.shape)}, expected {list(spec.shape)}")
    if tensor.dtype != spec.dtype:
        problems.append(
            f"'{key}': dtype {_dtype_name(tensor.dtype)}, expected {_dtype_name(spec.dtype)}"
        )
    if not problems and spec.checksum is not None:
        found = tensor_checksum(tensor)
        if from_mapped_file:
            release_pages(tensor)
        if found != spec.checksum:
            problems.append(
                f"'{key}': values differ from those gathered (crc32 {found:08x}, expected {spec.checksum:08x})"
            )
    return problems


def _tied_problems(state_dict: Mapping[str, torch.Tensor], tied: tuple[tuple[str, ...], ...]) -> list[str]:
    problems = []
    for group in tied:
        present = [k for k in group if k in state_dict]
        if len({_storage_id(state_dict[k]) for k in present}) > 1:
            problems.append(f"tied keys {present} are separate copies, expected one shared tensor")
    return problems


def _flat_dict_problems(obj: object) -> list[str]:
    if not isinstance(obj, dict):
        return [f"holds a {type(obj).__name__}, expected a flat dict[str, Tensor] (a state_dict)"]
    return [
        f"entry {key!r} is a {type(value).__name__}, expected a Tensor under a str key"
        for key, value in obj.items()
        if not (isinstance(key, str) and isinstance(value, torch.Tensor))
    ]


def _storage_id(tensor: torch.Tensor) -> tuple[int, int]:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset())


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype
