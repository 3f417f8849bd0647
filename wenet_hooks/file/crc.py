"""CRC-32 of a file's bytes: the zip format's checksum, which ``torch.save`` files carry for every record.

Every file the package writes is checksummed twice: while it is written (the
zip records' CRC-32, and the manifest's) and when it is read back to verify
it. Python's ``zlib.crc32`` runs at about 4 GB/s here; ISA-L's (``isal``,
installed with this package where it ships wheels: x86-64 and ARM64) computes
the same CRC-32 at about 20 GB/s, so checksumming a 1 GB file costs 0.05 s
instead of 0.25 s, twice. Elsewhere ``zlib``'s is used; the values are the same.

A tensor whose bytes arrive out of order (a gather writing each rank's
fragment of it where it belongs) gets a CRC-32 per run of consecutive bytes;
:func:`crc32_combine` joins two runs' values into the whole's, as zlib's C
function of that name does (ISA-L's where installed; else the same
algorithm here: a few hundred integer operations, whatever the lengths).
"""

from __future__ import annotations

import importlib
import zlib
from typing import Callable

Crc32 = Callable[..., int]  # (data: a buffer, value: int = 0) -> int, as zlib.crc32
Combine = Callable[[int, int, int], int]  # (crc of A, crc of B, len(B)) -> crc of A + B

# The module and function names, fastest first; the last is always there.
_CANDIDATES = (("isal.isal_zlib", "crc32"), ("zlib_ng.zlib_ng", "crc32"), ("zlib", "crc32"))


def first_available(candidates: tuple[tuple[str, str], ...] = _CANDIDATES) -> tuple[str, Crc32]:
    """The first CRC-32 in ``candidates`` that imports: (its module's name, the function)."""
    for module, name in candidates:
        try:
            return module, getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    return "zlib", zlib.crc32


BACKEND, crc32 = first_available()

# zlib's crc32.c: the CRC-32 polynomial, reflected; x^(2^k) modulo it, for k = 0..31.
_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a(x) * b(x) modulo the CRC polynomial (bit-reflected, as zlib's ``multmodp``)."""
    m, product = 1 << 31, 0
    while True:
        if a & m:
            product ^= b
            if not a & (m - 1):
                return product
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table, p = [], 1 << 30  # x^1
    for _ in range(32):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()


def _x8nmodp(nbytes: int) -> int:
    """x^(8 * nbytes) modulo the CRC polynomial (zlib's ``x2nmodp(len, 3)``)."""
    p, k = 1 << 31, 3  # x^0
    while nbytes:
        if nbytes & 1:
            p = _multmodp(_X2N[k & 31], p)
        nbytes >>= 1
        k += 1
    return p


def _combine(crc_a: int, crc_b: int, len_b: int) -> int:
    """zlib's ``crc32_combine``: the CRC-32 of A followed by B, from A's, B's and B's length."""
    return _multmodp(_x8nmodp(len_b), crc_a) ^ crc_b


def _first_combine() -> Combine:
    try:
        return importlib.import_module("isal.isal_zlib").crc32_combine
    except (ImportError, AttributeError):
        return _combine


crc32_combine: Combine = _first_combine()
