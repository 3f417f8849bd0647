"""What a state-dict file must hold, key by key, and the one notion of "the same tensor".

A :class:`Manifest` records, for every key, the shape, dtype and (optionally) a
CRC32 of the bytes, plus which keys must share one tensor (tied weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from wenet_hooks.dtypes import dtype_from_name, dtype_name
from wenet_hooks.file.crc import crc32

TensorIdentity = tuple


def tensor_identity(tensor: torch.Tensor) -> TensorIdentity:
    """Equal for two tensors exactly when they are the same values in memory.

    Tied weights (one tensor under two keys) share it and are stored once, as
    ``torch.save`` stores them; distinct views into one buffer differ. Empty
    tensors all have the same null data pointer, so callers skip them.
    """
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride(),
            tensor.dtype)


@dataclass(frozen=True)
class TensorSpec:
    """What one entry of a state dict must be."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    checksum: int | None = None  # CRC32 of the raw bytes; None: not checked

    @classmethod
    def of(cls, tensor: torch.Tensor, checksum: bool = False) -> TensorSpec:
        return cls(tuple(tensor.shape), tensor.dtype, tensor_checksum(tensor) if checksum else None)

    def __str__(self) -> str:
        return f"shape {list(self.shape)} {dtype_name(self.dtype)}"


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
        by_identity: dict[TensorIdentity, list[str]] = {}
        for key, tensor in state_dict.items():
            tensors[key] = TensorSpec.of(tensor, checksums)
            if tensor.numel():
                by_identity.setdefault(tensor_identity(tensor), []).append(key)
        tied = tuple(tuple(keys) for keys in by_identity.values() if len(keys) > 1)
        return cls(tensors, tied)

    @classmethod
    def from_key_list(cls, keys: Mapping[str, Any]) -> Manifest:
        """From ``{key: [shape, dtype_name]}``, the format of ``expected_keys.json``."""
        return cls({key: TensorSpec(tuple(int(d) for d in shape), dtype_from_name(name))
                    for key, (shape, name) in keys.items()})

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> Manifest:
        """Read a ``{key: [shape, dtype_name]}`` json file."""
        with open(path, encoding="utf-8") as f:
            return cls.from_key_list(json.load(f))

    def to_key_list(self) -> dict[str, list[Any]]:
        """The ``{key: [shape, dtype_name]}`` form, for json."""
        return {k: [list(s.shape), dtype_name(s.dtype)] for k, s in self.tensors.items()}

    def to_plain(self) -> dict[str, Any]:
        """Every field as json-able data (checksums and tied keys too), for another process:
        ``{"tensors": [[key, shape, dtype_name, crc32 or None], ...], "tied": [[key, ...], ...]}``."""
        return {"tensors": [[k, list(s.shape), dtype_name(s.dtype), s.checksum] for k, s in self.tensors.items()],
                "tied": [list(group) for group in self.tied]}

    @classmethod
    def from_plain(cls, plain: Mapping[str, Any]) -> Manifest:
        """The inverse of :meth:`to_plain`."""
        tensors = {key: TensorSpec(tuple(int(d) for d in shape), dtype_from_name(name), checksum)
                   for key, shape, name, checksum in plain["tensors"]}
        return cls(tensors, tuple(tuple(group) for group in plain["tied"]))


def spec_differences(found: Mapping[str, TensorSpec], expected: Manifest, *, dtypes: bool = True) -> list[str]:
    """Missing and unexpected keys, and shapes (and ``dtypes``) that differ: one line each."""
    problems = []
    for key, spec in expected.tensors.items():
        if key not in found:
            problems.append(f"missing key '{key}' (expected {spec})")
            continue
        if found[key].shape != spec.shape:
            problems.append(f"'{key}': shape {list(found[key].shape)}, expected {list(spec.shape)}")
        if dtypes and found[key].dtype != spec.dtype:
            problems.append(f"'{key}': dtype {dtype_name(found[key].dtype)}, expected {dtype_name(spec.dtype)}")
    problems += [f"unexpected key '{key}' ({spec})" for key, spec in found.items() if key not in expected.tensors]
    return problems


def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC32 of a tensor's bytes in C order (any dtype, bf16 included)."""
    flat = tensor.detach().reshape(-1).contiguous()
    raw = flat.view(torch.uint8) if flat.numel() else flat.new_empty(0, dtype=torch.uint8)
    return crc32(raw.cpu().numpy().data)
