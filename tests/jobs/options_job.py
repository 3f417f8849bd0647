"""torchrun worker: the DeepSpeed options users can set (tests/support/options.py), one case after another.

Usage: options_job.py OUT_DIR CASE [CASE ...]. Per case, under ``OUT_DIR/<case>/``:

- ``step_3/``: DeepSpeed's sharded checkpoint after 3 optimizer steps;
- ``step_3.pt`` + ``step_3.optim``: ours, from the same step (``save_consolidated``);
- ``module.pt``: the module's own training weights at that step (ZeRO-3: materialised
  with DeepSpeed's ``GatheredParameters``), the truth the masters must round to;
- ``results.json``: the losses of 2 more steps, uninterrupted and resumed from our files
  (a fresh engine loads ``step_3.pt`` as WeNet's ``--checkpoint`` does, then
  ``restore``), and, where those differ, resumed by DeepSpeed's own
  ``load_checkpoint``; or the reason our save refused the case, or DeepSpeed's
  error where it cannot train it here.

Special case ``shifted:<case>``: the same, with one fragment of the layout moved by one
element (a deliberately wrong layout). Our save must refuse it on every rank; then
the check is switched off, and the file written must fail the pytest side's oracles.
"""

from __future__ import annotations

import gc
import json
import sys
import traceback
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from support.options import AFTER, BY_NAME, D_MODEL, STEPS, Case
from support.tiny_model import build_model
from support.tiny_training import train_steps
from wenet_hooks import BackgroundWriter, SaveOptions, save_consolidated, settle_background
from wenet_hooks.dist import all_reports
from wenet_hooks.errors import WenetHooksError
from wenet_hooks.resume import restore

TAG = "step_3"


def engine_for(case: Case, weights: Path | None = None):
    import deepspeed

    gc.collect()  # DeepSpeed's arithmetic can depend on earlier engines still alive (see resume_job)
    model = build_model(d_model=D_MODEL)
    if weights is not None:  # what WeNet's --checkpoint does
        model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True), strict=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    params: list = trainable
    if case.groups == 2:
        decoder = {id(p) for p in model.decoder.parameters()}
        params = [{"params": [p for p in trainable if id(p) not in decoder]},
                  {"params": [p for p in trainable if id(p) in decoder], "lr": 5e-3, "weight_decay": 0.0}]
    optimizer = client_optimizer(case, params)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=params, optimizer=optimizer,
                                           config=case.config())
    return engine


def client_optimizer(case: Case, params):
    if case.client == "fused_adamw":
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, fused=True)
    if case.client == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(params, lr=1e-2, weight_decay=0.01, adamw_mode=True)
    return None


def train(engine, case: Case, steps: int, first: int) -> list[float]:
    """``steps`` optimizer steps (``accumulation`` micro-batches each): the loss of each micro-batch."""
    return train_steps(engine, steps * case.accumulation, first_step=first * case.accumulation)


def module_weights(engine) -> dict[str, torch.Tensor] | None:
    """Collective: the module's own training weights, full, on rank 0 (ZeRO-3: DeepSpeed's all-gather)."""
    module = engine.module
    params = list(module.parameters())
    if any(hasattr(p, "ds_id") for p in params):
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        with GatheredParameters(params, modifier_rank=None):
            return _cpu_state(module) if dist.get_rank() == 0 else None
    return _cpu_state(module) if dist.get_rank() == 0 else None


def _cpu_state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def run_case(name: str, out: Path) -> dict:
    shifted = name.startswith("shifted:")
    case = BY_NAME[name.split(":")[-1]]
    folder = out / name.replace(":", "-")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        engine = engine_for(case)
        losses = train(engine, case, STEPS, 0)
    except Exception as e:
        return {"cannot_train": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    engine.save_checkpoint(str(folder), tag=TAG)
    truth = module_weights(engine)
    if dist.get_rank() == 0:
        torch.save(truth, folder / "module.pt")
    if shifted:
        return run_shifted(engine, folder)
    try:
        save_consolidated(engine, folder, TAG, SaveOptions(optimizer=True))
    except WenetHooksError as e:
        return {"refused": str(e).splitlines()[0], "losses": losses}
    straight = train(engine, case, AFTER, STEPS)
    del engine
    resumed_engine = engine_for(case, folder / f"{TAG}.pt")
    restored = str(restore(resumed_engine, folder / f"{TAG}.pt", folder / f"{TAG}.optim"))
    resumed = train(resumed_engine, case, AFTER, STEPS)
    del resumed_engine
    # DeepSpeed's own resume is the bar only where ours departs from the uninterrupted run (on any
    # rank: each rank logs its own batches' losses, and every rank must take the same way).
    bar = deepspeed_resume(case, folder) if any(all_reports(resumed != straight)) else None
    return {"losses": losses, "straight": straight, "resumed": resumed, "restored": restored,
            "deepspeed_resumed": bar}


def deepspeed_resume(case: Case, folder: Path) -> list[float] | dict:
    """DeepSpeed's own resume of its sharded save of the same step: the bar for "exact"."""
    try:
        engine = engine_for(case)
        engine.load_checkpoint(str(folder), tag=TAG)
        return train(engine, case, AFTER, STEPS)
    except Exception as e:  # reported as a failure on the pytest side, never as "differs"
        return {"error": f"{type(e).__name__}: {e}"}


def run_shifted(engine, folder: Path) -> dict:
    """One fragment moved by one element: refused with the check, wrong (for the oracles) without it."""
    import wenet_hooks.gather.check as check
    import wenet_hooks.gather.masters as masters

    found = masters.find_partitions

    def shifted(engine_, params):
        parts = found(engine_, params)
        if parts is not None and dist.get_rank() == 0:
            first = parts.fragments[0]
            moved = first.offset + 1 if first.offset + first.numel < parts.flats[first.group].numel() else first.offset - 1
            parts.fragments[0] = replace(first, offset=moved)
        return parts

    masters.find_partitions = shifted
    try:
        try:
            save_consolidated(engine, folder, "refused", SaveOptions(optimizer=True))
            refused = None
        except WenetHooksError as e:
            refused = str(e).splitlines()[0]
        # A background save copies and checks in its job: refused there on every rank, nothing published.
        writer = BackgroundWriter()
        save_consolidated(engine, folder, "refused_background", SaveOptions(optimizer=True), writer=writer)
        try:
            settle_background(writer)
            refused_background = None
        except WenetHooksError as e:
            refused_background = str(e).splitlines()[0]
        published = sorted(p.name for p in folder.glob("refused*"))
        check.check_masters, original = (lambda *args: None), check.check_masters
        import wenet_hooks.gather as gather

        gather.check_masters = check.check_masters
        save_consolidated(engine, folder, TAG, SaveOptions(optimizer=True))
        gather.check_masters = original
    finally:
        masters.find_partitions = found
    return {"refused": refused, "shifted": True, "refused_background": refused_background, "published": published}


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(sys.argv[1])
    seen = {}
    for name in sys.argv[2:]:
        try:
            seen[name] = run_case(name, out)
        except Exception:
            traceback.print_exc()
            seen[name] = {"error": traceback.format_exc()}
        dist.barrier()
    if dist.get_rank() == 0:
        (out / "results.json").write_text(json.dumps(seen, indent=1))
    (out / f"refused-rank{dist.get_rank()}.json").write_text(
        json.dumps({k: v.get("refused") for k, v in seen.items()}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
