"""The CRC-32 the writer and the verifier take: zlib's values, from the fastest library installed."""

from __future__ import annotations

import os
import platform
import zlib

import pytest
import torch

from wenet_hooks.file import crc
from wenet_hooks.file.crc import BACKEND, crc32, crc32_combine, first_available
from wenet_hooks.file.manifest import tensor_checksum


@pytest.mark.parametrize("size", [0, 1, 7, 4096, 3 << 20])
def test_the_same_values_as_zlib(size):
    data = os.urandom(size)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(data, 0x1234ABCD) == zlib.crc32(data, 0x1234ABCD)  # continued from a previous value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_a_tensors_checksum_is_zlibs_crc_of_its_bytes(dtype):
    tensor = (torch.randn(3, 5, 7) * 100).to(dtype)
    assert tensor_checksum(tensor) == zlib.crc32(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    assert tensor_checksum(tensor.mT) == zlib.crc32(tensor.mT.contiguous().view(torch.uint8).numpy().tobytes())
    assert tensor_checksum(torch.empty(0, dtype=dtype)) == 0


def test_where_isal_ships_wheels_the_installed_package_uses_it():
    # pyproject.toml requires isal on these machines: without it every checksum runs 5x slower.
    if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
        assert BACKEND == "isal.isal_zlib"


def test_falls_back_to_zlib_when_no_faster_library_imports():
    assert first_available((("no_such_module", "crc32"), ("zlib", "no_such_function"))) == ("zlib", zlib.crc32)
    assert first_available((("no_such_module", "crc32"), ("zlib", "crc32"))) == ("zlib", zlib.crc32)


@pytest.mark.parametrize("len_a, len_b", [(0, 0), (0, 9), (9, 0), (1, 1), (1000, 3), (7, 1 << 20), (3 << 20, 5)])
def test_combined_crcs_are_zlibs_crc_of_the_concatenation(len_a, len_b):
    """The CRC-32 of two runs of bytes written apart (a parameter's fragments from two ranks) is the
    CRC-32 of the whole: ISA-L's combine where installed and the one written here, both against
    zlib's CRC of the bytes put together."""
    a, b = os.urandom(len_a), os.urandom(len_b)
    whole = zlib.crc32(a + b)
    assert crc._combine(zlib.crc32(a), zlib.crc32(b), len_b) == whole
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len_b) == whole
