"""The DeepSpeed options users can set, as cases of one real training job (tests/jobs/options_job.py).

Each case trains the tiny model with odd sizes (d_model 33: fragments straddle
partition boundaries at 2 and 3 ranks), a tied embedding and a frozen
weight, then saves DeepSpeed's sharded checkpoint and our files at the same
step. tests/test_options.py compares them with truths that do not share our
code: DeepSpeed's ``zero_to_fp32``, the module's own training weights, Adam's
moments reassembled by ``zero_to_fp32`` from DeepSpeed's shards, and
DeepSpeed's own ``load_checkpoint`` resume.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

D_MODEL = 33  # odd: parameters of odd sizes
STEPS = 3  # optimizer steps before the save
AFTER = 2  # optimizer steps after it, uninterrupted and resumed


@dataclass(frozen=True)
class Case:
    """One DeepSpeed configuration."""

    name: str
    stage: int
    zero: dict[str, Any] = field(default_factory=dict)  # extra zero_optimization keys
    precision: str = "fp32"
    groups: int = 1  # optimizer param groups (the second: the decoder, another lr and weight decay)
    client: Optional[str] = None  # an optimizer built by the user and handed to deepspeed.initialize
    accumulation: int = 1  # gradient_accumulation_steps
    needs: Optional[str] = None  # a feature that some torch/DeepSpeed pairs lack (see available())

    def config(self) -> dict[str, Any]:
        from support.tiny_training import ds_config

        config = ds_config(self.stage, self.precision, scheduler=True)
        config["zero_optimization"].update(self.zero)
        config["gradient_accumulation_steps"] = self.accumulation
        if self.client is not None:
            del config["optimizer"]
            config["zero_allow_untested_optimizer"] = True
        return config


CPU = {"device": "cpu"}
CASES = [
    Case("round_robin-z1-2groups", 1, {"round_robin_gradients": True}, groups=2),
    Case("round_robin-z2", 2, {"round_robin_gradients": True}),
    Case("round_robin-z2-2groups-bf16", 2, {"round_robin_gradients": True}, precision="bf16", groups=2),
    Case("round_robin-offload_optimizer-z2", 2, {"round_robin_gradients": True, "offload_optimizer": CPU}),
    Case("contiguous_gradients_off-accumulation-z2", 2, {"contiguous_gradients": False}, accumulation=2),
    Case("overlap_comm-z2", 2, {"overlap_comm": True}),
    Case("overlap_comm-accumulation-z3", 3, {"overlap_comm": True}, accumulation=2),
    Case("offload_optimizer-z1", 1, {"offload_optimizer": CPU}),
    Case("offload_optimizer-z2-bf16", 2, {"offload_optimizer": CPU}, precision="bf16"),
    Case("offload_param-offload_optimizer-z3", 3, {"offload_optimizer": CPU, "offload_param": CPU}),
    Case("sub_group_size-persistence_threshold_0-z3", 3,
         {"sub_group_size": 700, "stage3_param_persistence_threshold": 0}),
    Case("mics-z3", 3, {"mics_shard_size": 1, "mics_hierarchical_params_gather": False}, needs="mics"),
    Case("hpz-z3", 3, {"zero_hpz_partition_size": 2}, needs="hpz"),
    Case("2groups-z3-bf16", 3, precision="bf16", groups=2),
    Case("fused_adamw-z2", 2, client="fused_adamw", needs="fused_cpu"),
    Case("fused_adamw-z3", 3, client="fused_adamw", needs="fused_cpu"),
    Case("cpu_adam-z2", 2, {"offload_optimizer": CPU}, client="cpu_adam"),
]
BY_NAME = {case.name: case for case in CASES}


def unavailable(case: Case, world_size: int) -> Optional[str]:
    """Why this torch/DeepSpeed pair cannot run ``case`` at all (a declared skip), or None."""
    import deepspeed
    import torch

    if case.needs == "mics" and "mics_shard_size" not in _zero_fields():
        return f"DeepSpeed {deepspeed.__version__} has no MiCS (mics_shard_size was removed in 0.18)"
    if case.needs == "hpz" and world_size % 2:
        return "zero_hpz_partition_size 2 needs an even number of ranks"
    if case.needs == "fused_cpu" and tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) < (2, 4):
        return f"torch {torch.__version__} has no fused AdamW on the CPU (torch >= 2.4)"
    return None


def _zero_fields() -> set[str]:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    fields = getattr(DeepSpeedZeroConfig, "model_fields", None) or getattr(DeepSpeedZeroConfig, "__fields__", {})
    return set(fields)
