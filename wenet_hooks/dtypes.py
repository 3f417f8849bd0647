"""Dtype names, in one place.

Configs spell training precision as WeNet and DeepSpeed do (``fp32``, ``bf16``,
``fp16``); manifests and messages use torch's names (``float32``).
"""

from __future__ import annotations

import enum
from typing import Union

import torch


class Dtype(enum.Enum):
    """A floating dtype a consolidated file can hold (Hydra configs use these names)."""

    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"

    @property
    def torch(self) -> torch.dtype:
        return _TORCH[self]


_TORCH = {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}

DtypeLike = Union[str, Dtype, torch.dtype]


def resolve_dtype(dtype: DtypeLike) -> torch.dtype:
    """``"fp32"``/``"bf16"``/``"fp16"``, a :class:`Dtype` or one of those torch dtypes -> the torch dtype.

    Raises:
        ValueError: any other value, naming the choices.
    """
    if isinstance(dtype, Dtype):
        return dtype.torch
    if isinstance(dtype, torch.dtype) and dtype in _TORCH.values():
        return dtype
    if isinstance(dtype, str) and dtype in Dtype.__members__:
        return Dtype[dtype].torch
    raise ValueError(f"dtype: expected one of {', '.join(Dtype.__members__)}; found {dtype!r}")


def dtype_name(dtype: torch.dtype) -> str:
    """torch's name without the prefix: ``float32``, ``bfloat16``, ``int64``."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(name: str) -> torch.dtype:
    """The inverse of :func:`dtype_name` (``torch.`` prefix allowed)."""
    dtype = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype name {name!r}")
    return dtype
