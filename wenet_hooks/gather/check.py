"""The run-time check that the fp32 masters read are the right ones.

The truth it checks against does not come from the layout it checks: after
every optimizer step DeepSpeed copies its fp32 masters into the training
weights (``copy_``: bit for bit in fp32, rounded to nearest even in bf16 and
fp16), and before the first step the masters are copies of those weights. So,
at every ZeRO stage and precision, each fragment's masters cast to the
training dtype must equal the module's own weight elements the fragment claims
to hold. Each rank checks the fragments it owns, where the data lies (its
ZeRO-3 partition of the weights, or its slice of the full ZeRO-1/2 weights),
and the ranks vote, so a wrong layout raises on every rank before anything is
written or restored.

Not checked, because no independent copy exists: frozen parameters (no master:
the file holds the weight itself) and ZeRO-0 in fp32 (the weight is the master).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable, Optional

import torch
import torch.distributed as dist

from wenet_hooks.dist import Failure, first_failure, get_rank
from wenet_hooks.errors import ConsolidationError
from wenet_hooks.gather.masters import Fragment, Partitions

# Elements compared at a time: bounds the temporary cast (and its device copy) whatever the parameter's size.
_CHUNK = 1 << 22
_NAMED = 5  # parameters named in a message; the count says how many more
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_after_cast(master: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``master`` cast to ``weight``'s dtype is ``weight``, bit for bit (any NaN equals any NaN)."""
    if master.numel() != weight.numel():
        return False
    if _aliases(master, weight):
        return True  # the masters are the weights themselves (ZeRO-3 in fp32 keeps one buffer)
    master, weight = master.reshape(-1), weight.reshape(-1)
    bits = _BITS[weight.element_size()]
    for lo in range(0, weight.numel(), _CHUNK):
        w = weight[lo:lo + _CHUNK]
        m = master[lo:lo + _CHUNK].to(device=w.device, dtype=w.dtype)
        if not _same_bytes(m, w) and not _equal_but_nan(m, w, bits):
            return False
    return True


def _aliases(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.device == b.device


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one dtype hold the same bits. In host memory with libc's ``memcmp``, which
    runs at memory speed (``torch.equal`` compares element by element at about a third of it)."""
    if _memcmp is not None and a.device.type == b.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
        return _memcmp(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    bits = _BITS[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def _libc_memcmp() -> Optional[Callable[[int, int, int], int]]:
    name = ctypes.util.find_library("c")
    try:
        memcmp = ctypes.CDLL(name).memcmp if name else None
    except (OSError, AttributeError):  # no C library to load (torch.equal then)
        return None
    if memcmp is not None:
        memcmp.restype, memcmp.argtypes = ctypes.c_int, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    return memcmp


_memcmp = _libc_memcmp()


def _equal_but_nan(m: torch.Tensor, w: torch.Tensor, bits: torch.dtype) -> bool:
    # NaN payloads may change in a cast; a NaN weight still has a NaN master.
    return bool(((m.view(bits) == w.view(bits)) | (m.isnan() & w.isnan())).all())


def mismatched(parts: Partitions, names: list[str],
               source: Optional[Callable[[Fragment], torch.Tensor]] = None) -> list[str]:
    """The fragments of ``parts`` whose values (the masters, or ``source(fragment)``) do not equal the
    training weights once cast: one line each, naming the parameter and the elements."""
    found = []
    for fragment, weight in zip(parts.fragments, parts.weights):
        value = (source(fragment) if source is not None
                 else parts.flats[fragment.group].narrow(0, fragment.offset, fragment.numel))
        if not same_after_cast(value, weight):
            found.append(_line(names, fragment))
    return found


def _line(names: list[str], fragment: Fragment) -> str:
    return f"'{names[fragment.param]}' (elements {fragment.start}..{fragment.start + fragment.numel})"


def check_masters(parts: Optional[Partitions], names: list[str], what: str = "the fp32 masters read") -> None:
    """Collective: every rank checks its fragments of the masters (``parts``, None: no partitions) against
    its training weights (``names``: each parameter's key, for the message).

    Raises:
        ConsolidationError: on every rank when any rank found a mismatch,
            naming the rank and the parameters.
    """
    mine = None
    if parts is not None:
        try:
            wrong = mismatched(parts, names)
            mine = Failure(get_rank(), mismatch_message(wrong, what)) if wrong else None
        except Exception as e:  # reading the weights failed: say so on every rank, never hang one
            mine = Failure.from_exception(e)
    failure = first_failure(mine)
    if failure is not None:
        raise ConsolidationError(failure.message)


class ChunkCheck:
    """:func:`check_masters`' comparison, chunk by chunk, as a background save copies the masters
    (:class:`wenet_hooks.gather.staging.Staging`): each chunk is compared as copied, so what is
    checked is what is sent, and the masters are read once for both. The ranks' vote is the
    caller's (the save's background job)."""

    def __init__(self, parts: Optional[Partitions], names: list[str], what: str = "the fp32 masters read") -> None:
        self._parts, self._names, self._what = parts, names, what
        self._wrong: dict[int, str] = {}  # index of the fragment -> its line

    def inspectors(self) -> dict[int, tuple[torch.Tensor, Callable[[int, torch.Tensor, torch.Tensor], None]]]:
        """id(flat) -> (the flat, what compares each of its chunks with the training weights)."""
        if self._parts is None:
            return {}
        return {id(flat): (flat, self._inspector(group)) for group, flat in enumerate(self._parts.flats)}

    def problem(self) -> Optional[str]:
        """One line naming the parameters whose masters differ, or None."""
        wrong = [self._wrong[i] for i in sorted(self._wrong)]
        return mismatch_message(wrong, self._what) if wrong else None

    def _inspector(self, group: int) -> Callable[[int, torch.Tensor, torch.Tensor], None]:
        parts = self._parts
        mine = sorted((i for i, f in enumerate(parts.fragments) if f.group == group),
                      key=lambda i: parts.fragments[i].offset)
        first = [0]  # fragments before it end before the chunks still to come (they arrive in order)

        def inspect(lo: int, source: torch.Tensor, copied: torch.Tensor) -> None:
            hi = lo + copied.numel()
            while first[0] < len(mine) and _end(parts.fragments[mine[first[0]]]) <= lo:
                first[0] += 1
            for i in mine[first[0]:]:
                fragment, weight = parts.fragments[i], parts.weights[i]
                if fragment.offset >= hi:
                    break
                a, b = max(lo, fragment.offset), min(hi, _end(fragment))
                if b <= a or i in self._wrong:
                    continue
                trained = weight.reshape(-1)[a - fragment.offset:b - fragment.offset]
                if _aliases(source[a - lo:b - lo], trained):
                    continue  # the masters are the weights themselves (ZeRO-3 in fp32 keeps one buffer)
                if not same_after_cast(copied[a - lo:b - lo], trained):
                    self._wrong[i] = _line(self._names, fragment)

        return inspect


def _end(fragment: Fragment) -> int:
    return fragment.offset + fragment.numel


def mismatch_message(wrong: list[str], what: str, hint: str = "") -> str:
    """One line: which parameters' masters differ from the training weights, and what it means."""
    named = ", ".join(wrong[:_NAMED]) + (f" and {len(wrong) - _NAMED} more" if len(wrong) > _NAMED else "")
    hint = hint or ("DeepSpeed lays its partitions out in a way wenet_hooks does not read correctly here; its "
                    "sharded checkpoint is unaffected (convert it with wenet-hooks-convert), and please report "
                    "your DeepSpeed config")
    return (f"rank {get_rank()}: {what} for {len(wrong)} parameter(s) do not equal the module's own training "
            f"weights once cast to their dtype: {named}; nothing was written or restored. HINT: {hint}")


def rank_slice(param: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(this rank's elements of the full master, the training weight elements they must equal)``
    for a parameter gathered whole (DeepSpeed's per-parameter path)."""
    partition = getattr(param, "ds_tensor", None)
    if partition is None:  # ZeRO-0/1/2: every rank holds the whole weight
        return full.reshape(-1), param.data.reshape(-1)
    size = partition.ds_numel if hasattr(partition, "ds_numel") else partition.numel()
    start = dist.get_rank(group=getattr(param, "ds_process_group", None)) * size
    numel = max(0, min(size, param.ds_numel - start))
    return full.reshape(-1).narrow(0, start, numel), partition.reshape(-1).narrow(0, 0, numel)
