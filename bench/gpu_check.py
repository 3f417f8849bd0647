"""`make gpu-check`: what only a GPU can show, in one command (about 6 minutes on one H200).

    python bench/gpu_check.py               # a GPU machine with torch (CUDA), DeepSpeed and this package
    python bench/gpu_check.py --cpu-smoke   # the same script on the CPU (gloo, tiny), to check the script

One rank under torchrun (NCCL), a tiny model (tests/support/tiny_model.py), each check PASS or FAIL with
its figures, then bench/gpu.py (a Whisper-large-shaped model, ZeRO-3 bf16):

1. nccl-gather: ZeRO-2 and ZeRO-3 bf16 gathered with 1 KiB buckets (all_gather_into_tensor on NCCL), bit
   for bit against DeepSpeed's zero_to_fp32 of its own save of the same step;
2. fused / capturable: exact resume with a client AdamW(fused=True) and AdamW(capturable=True) at ZeRO-2:
   the resumed run's losses are the uninterrupted run's (torch wants ``step`` on the GPU there);
3. partial-offload: ZeRO-3 with offload_optimizer ratio 0.5 (sub-groups kept on the GPU step with
   DeepSpeed's backup optimizer): the weights exact, no optimizer file, one warning;
4. offload-background: ZeRO-2 bf16 with the optimizer offloaded (masters in host memory, weights on the
   GPU): a background save, whose copies and check are taken by its job (the check reads the GPU weights
   from that thread) while the next steps run, resumes exactly;
5. pinned: host buffers of 5 background saves: the pool's bytes do not grow, equal what torch's caching
   host allocator holds for them, and are freed with the engine.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["nccl-gather", "fused", "capturable", "partial-offload", "offload-background", "pinned"]
sys.path.insert(0, str(ROOT / "tests"))


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="gloo" if args.cpu_smoke else "nccl")
    checks = {"nccl-gather": nccl_gather, "fused": lambda o, s: resume_with(o, s, "fused"),
              "capturable": lambda o, s: resume_with(o, s, "capturable"), "partial-offload": partial_offload,
              "offload-background": offload_background, "pinned": pinned}
    assert list(checks) == CHECKS
    results = []
    for name, check in checks.items():
        gc.collect()
        if name == "capturable" and args.cpu_smoke:
            results.append((name, "SKIP", "torch's capturable Adam runs on accelerators only"))
            continue
        try:
            results.append((name, "PASS", check(args.out / name, args.cpu_smoke)))
        except Exception as e:  # every check runs; each failure is shown with its cause
            traceback.print_exc()
            results.append((name, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
        if dist.get_rank() == 0:  # after each check: a run stopped at its time limit still shows what it did
            (args.out / "results.json").write_text(json.dumps(results))
            print(f"gpu_check: {name}: {results[-1][1]}", file=sys.stderr, flush=True)
    dist.destroy_process_group()


def engine_for(stage: int, smoke: bool, optimizer=None, zero: dict | None = None, weights: Path | None = None):
    import deepspeed
    import torch

    from support.tiny_model import build_model
    from support.tiny_training import ds_config

    model = build_model(d_model=33)
    if weights is not None:
        model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True), strict=False)
    config = ds_config(stage, "fp32" if smoke else "bf16", scheduler=True)
    config["zero_optimization"].update(zero or {})
    trainable = [p for p in model.parameters() if p.requires_grad]
    if optimizer is not None:
        del config["optimizer"]
        config["zero_allow_untested_optimizer"] = True
        optimizer = optimizer(trainable)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=trainable, optimizer=optimizer, config=config)
    return engine


def nccl_gather(out: Path, smoke: bool) -> str:
    import torch

    from helpers import deepspeed_reference, state_dict_differences
    from support.tiny_model import build_model
    from support.tiny_training import train_steps
    from wenet_hooks import consolidate

    figures = []
    for stage in (2, 3):
        engine = engine_for(stage, smoke)
        train_steps(engine, 3)
        engine.save_checkpoint(str(out), tag=f"z{stage}")
        ours = consolidate(engine, bucket_mb=1 / 1024)
        reference = deepspeed_reference(out, f"z{stage}", build_model(d_model=33))
        trainable = [k for k, p in build_model(d_model=33).named_parameters() if p.requires_grad]
        wrong = state_dict_differences({k: ours[k] for k in trainable}, {k: reference[k].float() for k in trainable})
        if wrong:
            raise AssertionError(f"ZeRO-{stage}: {wrong[:3]}")
        figures.append(f"ZeRO-{stage}: {len(trainable)} tensors bit-identical")
        del engine
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return "; ".join(figures)


def resume_with(out: Path, smoke: bool, flag: str) -> str:
    import torch

    from support.tiny_training import train_steps
    from wenet_hooks import SaveOptions, restore, save_consolidated

    def make(params):
        return torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01, **{flag: True})

    out.mkdir(parents=True, exist_ok=True)
    engine = engine_for(2, smoke, optimizer=make)
    train_steps(engine, 3)
    save_consolidated(engine, out, "step_3", SaveOptions(optimizer=True))
    straight = train_steps(engine, 2, first_step=3)
    del engine
    resumed_engine = engine_for(2, smoke, optimizer=make, weights=out / "step_3.pt")
    restore(resumed_engine, out / "step_3.pt", out / "step_3.optim")
    step = next(iter(resumed_engine.optimizer.optimizer.state.values()))["step"]
    resumed = train_steps(resumed_engine, 2, first_step=3)
    if resumed != straight:
        raise AssertionError(f"resumed {resumed} != uninterrupted {straight}")
    return f"losses {resumed} equal; step on {step.device} ({step.dtype})"


def partial_offload(out: Path, smoke: bool) -> str:
    import logging

    from helpers import deepspeed_reference, state_dict_differences
    from support.tiny_model import build_model
    from support.tiny_training import train_steps
    from wenet_hooks import SaveOptions, save_consolidated

    warnings = []
    handler = logging.Handler()
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("wenet_hooks").addHandler(handler)
    zero = {"offload_optimizer": {"device": "cpu", "ratio": 0.5}, "sub_group_size": 2000}
    engine = engine_for(3, smoke, zero=zero)
    train_steps(engine, 3)
    engine.save_checkpoint(str(out), tag="z3")
    for tag in ("a", "b"):
        save_consolidated(engine, out, tag, SaveOptions(optimizer=True))
    reference = deepspeed_reference(out, "z3", build_model(d_model=33))
    ours = __import__("torch").load(str(out / "a.pt"), weights_only=True)
    trainable = [k for k, p in build_model(d_model=33).named_parameters() if p.requires_grad]
    wrong = state_dict_differences({k: ours[k] for k in trainable}, {k: reference[k].float() for k in trainable})
    said = [w for w in warnings if "no <tag>.optim is written" in w]
    optimizer_files = sorted(p.name for p in out.glob("*.optim"))
    backup = any(device != "cpu" for device in (getattr(engine.optimizer, "subgroup_to_device", None) or {}).values())
    if wrong or (backup and (optimizer_files or len(said) != 1)):
        raise AssertionError(f"wrong {wrong[:3]}, optimizer files {optimizer_files}, warnings {said}")
    return (f"weights exact; backup optimizer in use: {backup}; optimizer files: {optimizer_files or 'none'}; "
            f"warning: {said[0][:90] if said else 'none'}")


def offload_background(out: Path, smoke: bool) -> str:
    from support.tiny_training import train_steps
    from wenet_hooks import BackgroundWriter, SaveOptions, restore, save_consolidated, settle_background
    from wenet_hooks.gather.staging import step_wait_seconds

    zero = {"offload_optimizer": {"device": "cpu"}}
    out.mkdir(parents=True, exist_ok=True)
    engine = engine_for(2, smoke, zero=zero)
    train_steps(engine, 3)
    writer = BackgroundWriter()
    save_consolidated(engine, out, "step_3", SaveOptions(optimizer=True), writer=writer)
    straight = train_steps(engine, 2, first_step=3)  # the first step waits for the save's copies
    settle_background(writer)
    held = step_wait_seconds(engine)
    del engine
    resumed_engine = engine_for(2, smoke, zero=zero, weights=out / "step_3.pt")
    restore(resumed_engine, out / "step_3.pt", out / "step_3.optim")
    resumed = train_steps(resumed_engine, 2, first_step=3)
    if resumed != straight:
        raise AssertionError(f"resumed {resumed} != uninterrupted {straight}")
    return f"losses {resumed} equal; the next step waited {held:.3f} s for the copies"


def pinned(out: Path, smoke: bool) -> str:
    import torch

    from support.tiny_training import train_steps
    from wenet_hooks import BackgroundWriter, SaveOptions, save_consolidated, settle_background
    from wenet_hooks.gather.masters import state_of

    out.mkdir(parents=True, exist_ok=True)
    engine = engine_for(2, smoke)
    writer = BackgroundWriter()
    sizes = []
    for i in range(5):
        train_steps(engine, 1, first_step=i)
        save_consolidated(engine, out, f"s{i}", SaveOptions(optimizer=True), writer=writer)
        settle_background(writer)
        sizes.append(state_of(engine).pool.nbytes)
    held = _pinned_bytes()
    pool = state_of(engine).pool
    del engine, pool
    gc.collect()
    after = _pinned_bytes()
    if len(set(sizes)) != 1:
        raise AssertionError(f"the pool grew: {sizes}")
    if not smoke and torch.cuda.is_available() and held is not None and held < sizes[-1]:
        raise AssertionError(f"the allocator holds {held} pinned bytes, the pool counts {sizes[-1]}")
    return f"pool {sizes[-1] / 2**20:.2f} MiB at each of 5 saves; allocator held {held} B, after the engine {after} B"


def _pinned_bytes():
    import torch

    stats = getattr(torch.cuda, "host_memory_stats", None) if torch.cuda.is_available() else None
    return stats().get("allocated_bytes.current", stats().get("allocated_bytes", {}).get("current")) if stats else None


def stop(torchrun: subprocess.Popen) -> None:
    """End a torchrun and its workers: on SIGTERM it stops them itself (SIGKILL would leave them running)."""
    torchrun.terminate()
    try:
        torchrun.wait(timeout=30)
    except subprocess.TimeoutExpired:
        torchrun.kill()
        torchrun.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/wenet_hooks_gpu_check"))
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny, on the CPU with gloo: checks the script")
    parser.add_argument("--no-bench", action="store_true", help="skip bench/gpu.py")
    parser.add_argument("--timeout", type=float, default=420, help="seconds the checks may take in all")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    if args.cpu_smoke:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
           "--worker", "--out", str(args.out)] + (["--cpu-smoke"] if args.cpu_smoke else [])
    # The worker's log (DeepSpeed's, each check's outcome, tracebacks) streams to stderr as it runs; stdout
    # keeps the table alone.
    proc = subprocess.Popen(cmd, env=env, stdout=sys.stderr)
    try:
        returncode: int | None = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:  # what the checks did so far is in results.json
        stop(proc)
        returncode = None
    results = json.loads((args.out / "results.json").read_text()) if (args.out / "results.json").exists() else []
    done = {r[0] for r in results}
    results += [(name, "TIMEOUT" if returncode is None else "NOT RUN", f"not reached in {args.timeout:.0f} s"
                 if returncode is None else f"the worker exited {returncode} before it") for name in CHECKS
                if name not in done]
    print("| check | result | figures |\n| --- | --- | --- |")
    for name, result, figures in results:
        print(f"| {name} | {result} | {figures} |")
    failed = returncode != 0 or any(r[1] not in ("PASS", "SKIP") for r in results)
    if not args.no_bench:
        bench = [sys.executable, str(ROOT / "bench" / "gpu.py"), "--repeats", "1" if args.cpu_smoke else "3"]
        failed |= subprocess.run(bench + (["--cpu-smoke"] if args.cpu_smoke else []), timeout=900).returncode != 0
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
