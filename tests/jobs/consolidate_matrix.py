"""torchrun worker: real DeepSpeed training, then save_checkpoint and consolidate, per case.

Usage: consolidate_matrix.py OUT_DIR CASE [CASE ...], a CASE being
``z<stage>-<fp32|bf16>-<offload|nooffload>``. For each case it writes, under
``OUT_DIR/<case>/``: DeepSpeed's sharded checkpoint (tag ``step_3``), our
``step_3.pt`` (fp32) and ``step_3.bf16.pt`` (dtype="bf16"), the same weights
gathered parameter by parameter (``step_3.per_param.pt``, bucket_mb=0), in
buckets of 1 KiB that split parameters (``step_3.small_buckets.pt``), with the
collective NCCL runs (``step_3.all_gather.pt``), a second sharded
save ``step_4/`` one step later, the weights gathered after one element was set to -0.0
(``step_4.negative_zero.pt``, ZeRO-1/2/3), the engine's module output on a fixed batch
(``engine_out.pt``) and ``result.json``.
The pytest side compares them; this script only records.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from support.tiny_model import NEGATIVE_ZERO, build_model, make_batch
from support.tiny_training import ds_config, init_engine, train_steps
from wenet_hooks import Manifest, consolidate, write_state_dict
from wenet_hooks.errors import FirstError
from wenet_hooks.file.publish import PendingFile
from wenet_hooks.gather import agreement, prepare_consolidate
from wenet_hooks.gather import bucketed
from wenet_hooks.gather.bucketed import prepare_gather
from wenet_hooks.gather.masters import inspect_engine

TAG = "step_3"
NEXT_TAG = "step_4"
STEPS = 3


class DeepSpeedCannotTrain(Exception):
    """DeepSpeed itself failed to train the case here (some version pairs cannot on CPU/gloo)."""


def parse_case(case: str) -> tuple[int, str, bool]:
    stage, precision, offload = case.split("-")
    return int(stage[1:]), precision, offload == "offload"


def engine_output(engine) -> torch.Tensor:
    """Collective under ZeRO-3: the module's eval-mode output on a fixed batch."""
    feats, tokens, _ = make_batch(seed=1234)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    engine.module.eval()
    with torch.no_grad():
        out = engine.module(feats.to(dtype), tokens)
    engine.module.train()
    return out


def with_all_gather(gather):
    """The collective NCCL runs (all_gather_into_tensor over the partitions' group, every rank receiving),
    here on gloo, which runs both: the same bytes must arrive."""
    real = bucketed.use_all_gather
    bucketed.use_all_gather = lambda group: True
    try:
        return gather()
    finally:
        bucketed.use_all_gather = real


def with_negative_zero(engine):
    """Collective: element 0 of one parameter set to -0.0 in the fp32 masters (DeepSpeed's own setter) and
    in the training weight (the rank that holds it under ZeRO-3), then gathered: the file must keep the
    sign bit, which an all-reduce (DeepSpeed's per-parameter gather) loses."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    param = dict(engine.module.named_parameters())[NEGATIVE_ZERO]
    value = safe_get_full_fp32_param(param)
    value.view(-1)[0] = -0.0
    safe_set_full_fp32_param(param, value)
    with torch.no_grad():
        if hasattr(param, "ds_tensor"):
            if dist.get_rank() == 0:  # rank 0 holds elements [0, n) of every ZeRO-3 parameter
                param.ds_tensor.view(-1)[0] = -0.0
        else:
            param.data.view(-1)[0] = -0.0
    return consolidate(engine)


def run_case(case: str, out_dir: Path) -> None:
    stage, precision, offload = parse_case(case)
    case_dir = out_dir / case
    config = ds_config(stage, precision, offload_optimizer=offload, offload_param=offload and stage == 3)
    # ZeRO-3 otherwise swaps F.linear for its own matmul + add, whose bf16
    # rounding differs from a plain model's: the output comparison would then
    # test DeepSpeed's kernels, not the weights.
    config["zero_optimization"]["memory_efficient_linear"] = False
    try:
        engine = init_engine(build_model(), config)
        losses = train_steps(engine, STEPS)
    except Exception as e:
        raise DeepSpeedCannotTrain(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    engine.save_checkpoint(str(case_dir), tag=TAG)
    agreements = agreement.agreements_made
    fp32 = consolidate(engine)
    bf16 = consolidate(engine, dtype="bf16")
    trainable = [p for p in engine.module.parameters() if p.requires_grad]
    failure = FirstError()
    view = inspect_engine(engine)
    agreed, _ = agreement.agree(view.partitions, view.params, view.state.agreed)
    gather = prepare_gather(view.partitions, agreed, torch.float32, 2**20, failure)
    bucketed = gather.indices
    gather.release()
    assert not failure, (failure.what, failure.error)
    variants = {"per_param": consolidate(engine, bucket_mb=0), "small_buckets": consolidate(engine, bucket_mb=1 / 1024),
                "all_gather": with_all_gather(lambda: consolidate(engine, bucket_mb=1 / 1024))}
    agreements = agreement.agreements_made - agreements  # 5 bucketed gathers of one engine
    # Streamed into files as the hook writes them (each fragment to its place as it arrives, 1 KiB
    # buckets, so parameters are split across chunks and ranks), fp32 and bf16; rank 0's memory
    # counted by the receiver itself: what it held at most at once, against the parameters' sizes.
    peaks = []
    for dtype, name in (("fp32", "streamed"), ("bf16", "streamed_bf16")):
        view = inspect_engine(engine)
        agreed, _ = agreement.agree(view.partitions, view.params, view.state.agreed)  # the kept one: no exchange
        streamed = prepare_consolidate(view, agreed, dtype=dtype, bucket_mb=1 / 1024)
        file = PendingFile(case_dir / f"{TAG}.{name}.pt", streamed.entries) if dist.get_rank() == 0 else None
        streamed.finish(file.write if file else None, file.write_part if file else None)
        if file is not None:
            file.publish()
        peaks.append(streamed.peak_bytes)
    sizes = [p.numel() * 4 for p in trainable] if stage < 3 else [p.ds_numel * 4 for p in trainable]
    out = engine_output(engine)
    # One step more, saved too: tests of mixed-up shards take a file from here.
    train_steps(engine, 1, first_step=STEPS)
    engine.save_checkpoint(str(case_dir), tag=NEXT_TAG)
    negative_zero = with_negative_zero(engine) if stage > 0 else None
    if dist.get_rank() == 0:
        write_state_dict(fp32, case_dir / f"{TAG}.pt", expected=Manifest.from_state_dict(fp32))
        write_state_dict(bf16, case_dir / f"{TAG}.bf16.pt", expected=Manifest.from_state_dict(bf16))
        for name, state_dict in variants.items():
            write_state_dict(state_dict, case_dir / f"{TAG}.{name}.pt")
        torch.save(out, case_dir / "engine_out.pt")
        if negative_zero is not None:
            write_state_dict(negative_zero, case_dir / f"{NEXT_TAG}.negative_zero.pt")
        (case_dir / "result.json").write_text(json.dumps({
            "ok": True, "losses": losses, "bucketed": len(bucketed), "trainable": len(trainable),
            "agreements": agreements, "peak_bytes": peaks, "model_bytes": sum(sizes),
            "largest_bytes": max(sizes),
            "optimizer": type(engine.optimizer).__name__}))
    else:
        assert fp32 is None and bf16 is None and not any(variants.values()), "ranks other than 0 must receive None"
        assert negative_zero is None


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out_dir = Path(sys.argv[1])
    for case in sys.argv[2:]:
        # A DeepSpeed failure in one case (some versions cannot train some
        # cases on gloo) is recorded, and the next case still runs.
        try:
            run_case(case, out_dir)
        except Exception as e:
            traceback.print_exc()
            if dist.get_rank() == 0:
                (out_dir / case).mkdir(parents=True, exist_ok=True)
                (out_dir / case / "result.json").write_text(json.dumps({
                    "ok": False, "error": traceback.format_exc(),
                    "cannot_train": str(e) if isinstance(e, DeepSpeedCannotTrain) else None}))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
