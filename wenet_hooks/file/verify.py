"""Strict, key-by-key checking of a written checkpoint against its :class:`Manifest`.

:func:`verify` reopens the file the way WeNet does (``torch.load`` with
``mmap=True``, here also ``weights_only=True``) and reports every difference
at once.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Mapping, Union

import torch

from wenet_hooks.errors import VerificationError, first_line
from wenet_hooks.file.manifest import Manifest, TensorSpec, spec_differences, tensor_checksum, tensor_identity
from wenet_hooks.file.pages import release_pages


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
        # str: torch 2.1-2.3 take mmap=True only with a file name, not a Path.
        obj = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    except FileNotFoundError as e:
        raise VerificationError(path, ["does not exist"]) from e
    except pickle.UnpicklingError as e:
        raise VerificationError(path, [f"holds objects that are not plain tensors and data ({refused_global(e)}); "
                                       "refused, nothing in it was run"]) from e
    except Exception as e:
        raise VerificationError(
            path, [f"cannot be loaded with torch.load(weights_only=True, mmap=True): {first_line(e)}; HINT: the "
                   "file is truncated or corrupt"]) from e
    problems = _flat_dict_problems(obj)
    if problems:
        raise VerificationError(path, problems)
    return obj


def refused_global(error: BaseException) -> str:
    """The part of a weights_only refusal that names the class (torch's message is long, and its
    wording differs: "Unsupported global: GLOBAL x.y", "unsupported GLOBAL x.y", "Unsupported class x.y")."""
    found = re.search(r"(Unsupported global: GLOBAL|unsupported GLOBAL|Unsupported class|Unsupported operand)"
                      r" [^\n]*", str(error))
    return found.group().strip() if found else first_line(error)


def verify(path: Union[str, Path], expected: Union[Manifest, Mapping[str, torch.Tensor]]) -> None:
    """Reopen ``path`` and check it key by key against ``expected``.

    Checks key set and order, shapes, dtypes, value checksums (where the
    manifest has them) and that tied keys share one tensor.

    Args:
        path: the written single-file checkpoint.
        expected: a :class:`Manifest`, or a state dict to derive one from.

    Raises:
        VerificationError: listing every problem found, each naming its key.
    """
    if not isinstance(expected, Manifest):
        expected = Manifest.from_state_dict(expected)
    problems = compare(load_state_dict_file(path), expected, from_mapped_file=True)
    if problems:
        raise VerificationError(Path(path), problems)


def compare(state_dict: Mapping[str, torch.Tensor], expected: Manifest, *, from_mapped_file: bool = False) -> list[str]:
    """Every difference between ``state_dict`` and ``expected``, one line per problem.

    ``from_mapped_file``: the tensors come from ``torch.load(mmap=True)``; the
    pages of each are dropped once checksummed, so checking a 6 GB file does
    not keep 6 GB resident. Never set it for tensors in ordinary memory.
    """
    found = {key: TensorSpec.of(tensor) for key, tensor in state_dict.items()}
    problems = spec_differences(found, expected)
    for key, spec in expected.tensors.items():
        if spec.checksum is None or key not in found or found[key] != TensorSpec(spec.shape, spec.dtype):
            continue
        checksum = tensor_checksum(state_dict[key])
        if from_mapped_file:
            release_pages(state_dict[key])
        if checksum != spec.checksum:
            problems.append(f"'{key}': values differ from those gathered (crc32 {checksum:08x}, "
                            f"expected {spec.checksum:08x})")
    if not problems and list(state_dict) != list(expected.tensors):
        problems.append("keys are all present but in a different order than the model's state_dict()")
    for group in expected.tied:
        present = [k for k in group if k in state_dict]
        if len({tensor_identity(state_dict[k]) for k in present}) > 1:
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
