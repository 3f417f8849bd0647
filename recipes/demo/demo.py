"""The demo: real DeepSpeed ZeRO-2 and ZeRO-3 training, a recognize-ready file at each save.

Run on any machine, GPU or not (``make demo`` does this on 2 CPU ranks)::

    DS_ACCELERATOR=cpu PYTHONPATH=tests torchrun --standalone --nproc_per_node 2 recipes/demo/demo.py exp/demo

(``tests/support`` holds the tiny model and its DeepSpeed training loop,
shared with the tests.)

For each stage it trains the tiny model for a few optimizer steps, lets
DeepSpeed save its sharded checkpoint ``<model_dir>/<tag>/``, writes
``<model_dir>/<tag>.pt`` beside it through the core, verifies it, and checks
it against DeepSpeed's own ``zero_to_fp32`` reconstruction of the same step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
from pathlib import Path

import torch
import torch.distributed as dist

from support.tiny_model import build_model
from support.tiny_training import ds_config, init_engine, train_steps
from wenet_hooks import consolidate, write_state_dict

STEPS = 4


def save_both(engine, model_dir: Path, tag: str) -> Path | None:
    """Collective: DeepSpeed's sharded save, then our single file beside it."""
    engine.save_checkpoint(str(model_dir), tag=tag)
    state_dict = consolidate(engine)
    if state_dict is None:
        return None
    return write_state_dict(state_dict, model_dir / f"{tag}.pt")  # verified before it is published


def matches_zero_to_fp32(path: Path, model_dir: Path, tag: str) -> str:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        reference = get_fp32_state_dict_from_zero_checkpoint(str(model_dir), tag=tag)
    ours = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    same = [k for k in reference if k in ours and torch.equal(ours[k], reference[k].to(ours[k].dtype))]
    return f"{len(same)}/{len(reference)} tensors bit-identical"


def run_stage(stage: int, root: Path) -> list[str] | None:
    model_dir = root / f"zero{stage}"
    model_dir.mkdir(parents=True, exist_ok=True)
    engine = init_engine(build_model(), ds_config(stage))
    losses = train_steps(engine, STEPS)
    tag = f"step_{STEPS}"
    path = save_both(engine, model_dir, tag)
    if path is None:
        return None
    # write_state_dict verified the file before publishing it (or raised).
    keys = len(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    return [f"ZeRO-{stage}", f"{losses[0]:.3f} -> {losses[-1]:.3f}", str(path), str(keys),
            f"{path.stat().st_size / 1e3:.0f} kB", "yes", matches_zero_to_fp32(path, model_dir, tag)]


def print_table(rows: list[list[str]]) -> None:
    header = ["stage", "loss", "wrote", "tensors", "size", "verified", "vs DeepSpeed zero_to_fp32"]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", type=Path, nargs="?", default=Path("exp/demo"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo" if not torch.cuda.is_available() else "nccl")
    rows = [run_stage(stage, args.model_dir) for stage in (2, 3)]
    dist.barrier()
    if dist.get_rank() == 0:
        print_table([r for r in rows if r is not None])


if __name__ == "__main__":
    main()
