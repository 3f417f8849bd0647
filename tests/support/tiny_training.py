"""Real DeepSpeed training of the tiny model, shared by the demo, the tests and bench/."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from support.tiny_model import make_batch

PRECISIONS = ("fp32", "bf16")


def ds_config(stage: int, precision: str = "fp32", offload_optimizer: bool = False,
              offload_param: bool = False, scheduler: bool = False) -> dict[str, Any]:
    """A DeepSpeed config in the shape of WeNet's ``conf/ds_stage*.json`` (``scheduler``: a warm-up
    learning rate, as WeNet's WarmupLR, so a resume must restore its state too)."""
    zero: dict[str, Any] = {"stage": stage}
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_param:
        zero["offload_param"] = {"device": "cpu"}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 5.0,
        "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01}},
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
    }
    if scheduler:
        config["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 1e-2,
                                                              "warmup_num_steps": 8}}
    if precision == "bf16":
        # Without it fp32 buffers meet bf16 weights on CPU ("expected m1 and m2
        # to have the same dtype").
        config["data_types"] = {"buffer_dtype": "bf16"}
    return config


def init_engine(model: nn.Module, config: dict[str, Any]) -> Any:
    """``deepspeed.initialize`` over the trainable parameters, as WeNet does."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=config,
    )
    return engine


def train_steps(engine: Any, steps: int, first_step: int = 0) -> list[float]:
    """Run ``steps`` real optimizer steps on deterministic per-rank batches."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    engine.train()
    losses = []
    for step in range(first_step, first_step + steps):
        feats, tokens, targets = (t.to(engine.device) for t in make_batch(step * world + rank))
        feats = feats.to(_input_dtype(engine))
        logits = engine(feats, tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _input_dtype(engine: Any) -> torch.dtype:
    return torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
