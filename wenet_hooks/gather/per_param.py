"""DeepSpeed's own per-parameter gather, and rank 0's host copies of what is gathered.

Used for everything the bucketed path (:mod:`wenet_hooks.gather.bucketed`)
does not cover: a partition layout it does not know, ``bucket_mb=0``, frozen
parameters, buffers, and the unpartitioned masters of ZeRO-0 in 16 bits.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from wenet_hooks.dist import Failure, first_failure, get_rank
from wenet_hooks.errors import ConsolidationError, FirstError, error_text
from wenet_hooks.gather.check import mismatch_message, rank_slice, same_after_cast
from wenet_hooks.gather.masters import full_shape


class ToHost:
    """Gathered tensors moved to rank 0's host memory (in the file's dtype), and this rank's first failure.

    A failure here (host memory exhausted, say) must not leave the other ranks
    alone in the next collective: it is recorded, the gather goes on with the
    collectives only, and it is raised once every rank has left the loop.
    """

    def __init__(self, target: torch.dtype, enabled: bool) -> None:
        self.target = target
        self.enabled = enabled
        self.failure = FirstError()  # this gather's, its bucketed collectives' included

    def __call__(self, key: str, tensor: torch.Tensor, fresh: bool) -> Optional[torch.Tensor]:
        if not self.enabled or self.failure:
            return None
        try:
            return _to_cpu(tensor, self.target, fresh)
        except Exception as e:
            self.failure.record(f"copying '{key}' to host memory", e)
            return None

    def raise_if_failed(self) -> None:
        if self.failure:
            e = self.failure.error
            raise ConsolidationError(f"rank {get_rank()}: {self.failure.what} failed: {error_text(e)}") from e

    def raise_if_failed_anywhere(self) -> None:
        """Collective: :meth:`raise_if_failed`, then on every other rank too (the failing rank's message)."""
        try:
            self.raise_if_failed()
            mine = None
        except ConsolidationError as e:
            mine = Failure.from_exception(e)
        failure = first_failure(mine)
        if failure is not None:
            raise ConsolidationError(failure.message)


class PerParameterChecks:
    """The masters gathered whole (DeepSpeed's per-parameter path, FP16_Optimizer's unpartitioned
    masters), each checked on every rank against its own elements of the training weight."""

    def __init__(self, hint: str = "") -> None:
        self.checked = 0  # the same on every rank: every rank takes the same path for each parameter
        self.wrong: list[str] = []
        self.hint = hint  # what to do instead, when the cause is known

    def check(self, key: str, param: torch.Tensor, master: torch.Tensor) -> None:
        self.checked += 1
        mine, weight = rank_slice(param, master)
        if not same_after_cast(mine, weight):
            self.wrong.append(f"'{key}'")

    def raise_if_any(self) -> None:
        """Collective (when anything was checked): raise on every rank if any rank found a mismatch."""
        if not self.checked:
            return
        wrong = self.wrong
        failure = first_failure(Failure(get_rank(), mismatch_message(wrong, "the fp32 masters gathered", self.hint))
                                if wrong else None)
        if failure is not None:
            raise ConsolidationError(failure.message)


def gather_entry(key: str, tensor: torch.Tensor, master: Optional[torch.Tensor],
                 host: ToHost, checks: PerParameterChecks) -> Optional[torch.Tensor]:
    """Collective for parameters: the full value of one state-dict entry as a CPU tensor on rank 0."""
    try:
        if master is not None:
            checks.check(key, tensor, master)
            return host(key, master, fresh=False)
        if isinstance(tensor, nn.Parameter):
            return _gather_parameter(key, tensor, host, checks)
        # Buffers are never partitioned; rank 0's copy is the one to keep
        # (BatchNorm statistics differ between ranks).
        return host(key, tensor, fresh=False)
    except Exception as e:
        raise ConsolidationError(
            f"rank {get_rank()}: gathering '{key}' (shape {list(full_shape(tensor))}) failed: {error_text(e)}"
        ) from e


def _gather_parameter(key: str, param: nn.Parameter, host: ToHost,
                      checks: PerParameterChecks) -> Optional[torch.Tensor]:
    """Collective: the fp32 master weight if DeepSpeed holds one, else the module's full value."""
    from deepspeed.utils import safe_get_full_fp32_param

    master = safe_get_full_fp32_param(param)
    if master is not None:
        # (An all-reduce under ZeRO-1/2 through param._hp_mapping, which round_robin_gradients mislinks.)
        checks.check(key, param, master)
        return host(key, master.view(full_shape(param)), fresh=True)
    if hasattr(param, "ds_id"):
        # A ZeRO-3 parameter without a master copy (frozen): materialise it
        # from the partitions, in training precision, while the context lasts.
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters([param], modifier_rank=None):
            return host(key, param.data, fresh=False)
    # ZeRO-0/1/2 keep every parameter whole on every rank.
    return host(key, param, fresh=False)


def _to_cpu(tensor: torch.Tensor, target: torch.dtype, fresh: bool) -> torch.Tensor:
    """A contiguous CPU tensor that owns its storage.

    ``fresh`` says the tensor is already a private buffer (a gather result);
    anything else may be a view into DeepSpeed's flat buffer (which torch.save
    would write whole) and keeps changing as training goes on, so it is copied.
    """
    dtype = target if tensor.is_floating_point() else tensor.dtype
    owns_storage = tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    out = tensor.detach().to(device="cpu", dtype=dtype, copy=not (fresh and owns_storage))
    return out.contiguous()
