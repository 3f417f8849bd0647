"""Reading the folder that ``zero_to_fp32.py`` (DeepSpeed >= 0.15.3) leaves at ``<tag>.pt/``.

One ``pytorch_model.bin`` or ``model.safetensors``, or above ``max_shard_size``
several ``pytorch_model-0000k-of-0000n.bin`` / ``model-0000k-of-0000n.safetensors``
listed by a ``*.index.json`` (``{"weight_map": {key: file}}``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch

from wenet_hooks.errors import CheckpointReadError
from wenet_hooks.file.manifest import tensor_identity
from wenet_hooks.readers.safe_load import load_shard

SINGLE_FILES = ("pytorch_model.bin", "model.safetensors")
INDEX_FILES = ("pytorch_model.bin.index.json", "model.safetensors.index.json")


def is_folder_shaped(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in SINGLE_FILES + INDEX_FILES)


class FolderCheckpoint:
    """The weight files of a folder-shaped ``<tag>.pt/``, checked before reading."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.files = _weight_files(self.folder)

    def tensors(self, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` file by file; tensors sharing storage stay shared."""
        for path in self.files:
            cast: dict[tuple, torch.Tensor] = {}
            for key, tensor in _read_file(path):
                ident = tensor_identity(tensor)
                if ident not in cast:
                    cast[ident] = tensor.to(dtype) if tensor.is_floating_point() else tensor
                yield key, cast[ident]


def _weight_files(folder: Path) -> list[Path]:
    for index_name in INDEX_FILES:
        index = folder / index_name
        if index.is_file():
            return _files_from_index(index)
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointReadError(folder, "holds neither pytorch_model.bin, model.safetensors nor an index json; "
                              "HINT: this is not the output of DeepSpeed's zero_to_fp32")


def _files_from_index(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointReadError(index, f"is not a valid index json ({e}); HINT: restore it from the "
                                  "conversion that wrote it") from e
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if not (index.parent / name).is_file():
            raise CheckpointReadError(index, f"names {name}, which is missing from {index.parent}; HINT: restore "
                                      "that file, or convert from the sharded checkpoint instead")
    return [index.parent / name for name in names]


def _read_file(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except Exception as e:
            raise CheckpointReadError(path, f"cannot be read ({e}); HINT: the file is truncated or corrupt") from e
        return
    state_dict = load_shard(path)
    if not isinstance(state_dict, dict):
        raise CheckpointReadError(path, f"holds a {type(state_dict).__name__}, expected a state dict")
    yield from state_dict.items()
