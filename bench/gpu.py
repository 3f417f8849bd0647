"""Question 5 (GPU): a Whisper-large-v3-sized model (bench/whisper_large.py, ~1.6 B parameters)
under ZeRO-3 bf16 on one GPU.

    python bench/gpu.py [--repeats 3] [--out /tmp/wh-gpu]        # on a machine with a GPU
    python bench/gpu.py --cpu-smoke                                # checks the script on a CPU, tiny model

Launches itself under torchrun (1 rank, NCCL) and prints one table: the gather
(``consolidate``) time and the extra GPU memory it takes; the blocking time of a
model+optimizer save with the hook as ``sharded: false`` makes it (the call, and
what the next optimizer step waits for the save's copies; the gather and the
writes run in the background) next to ``save_checkpoint`` alone; the first such
save's call (the gloo group, the layout, the host copies' allocation); the write
throughput; and DeepSpeed's ``save_16bit_model`` and ``zero_to_fp32.py`` on its
own save. Medians of ``--repeats`` after the first save; the compared saves
alternate; each output is removed once measured (at 1.6 B parameters DeepSpeed's
sharded save alone is 22 GB).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, table, timer  # noqa: E402


def ds_config(smoke: bool) -> dict:
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**6,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": 3, "stage3_gather_16bit_weights_on_model_save": True,
                              **({"memory_efficient_linear": False} if smoke else {})},
    }


def one_step(engine, device, smoke: bool) -> None:
    import torch

    feats = torch.randn(1, 64 if smoke else 3000, 128, device=device, dtype=torch.bfloat16)
    tokens = torch.randint(0, 1000, (1, 16), device=device)
    loss = engine(feats, tokens)
    engine.backward(loss)
    engine.step()


def worker(args: argparse.Namespace) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist

    from whisper_large import WhisperLarge
    from wenet_hooks import consolidate, write_state_dict
    from wenet_hooks.background import BackgroundWriter
    from wenet_hooks.gather.staging import step_wait_seconds
    from wenet_hooks.save import SaveOptions, save_consolidated, settle_background

    smoke = args.cpu_smoke
    deepspeed.init_distributed(dist_backend="gloo" if smoke else "nccl")
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    with deepspeed.zero.Init(config_dict_or_path=ds_config(smoke)):
        model = WhisperLarge(blocks=2 if smoke else 32, vocab=1000 if smoke else 51866)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(smoke))
    one_step(engine, device, smoke)
    params = sum(p.ds_numel for p in engine.module.parameters())
    out, writer = args.out, BackgroundWriter()
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[float]] = {k: [] for k in (
        "save_checkpoint", "gather", "gather_mem", "hook_blocking", "step_held", "background_write",
        "write_mbps", "save_16bit_model", "zero_to_fp32")}
    first_save: list[float] = []

    def sync() -> None:
        if not smoke:
            torch.cuda.synchronize()
        os.sync()
        dist.barrier()

    def remove(*names: str) -> None:
        # Each output goes once measured: at 1.6 B parameters a sharded save alone is 22 GB (the disk: 64 GiB).
        for name in names:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)

    def plain(i: int) -> None:
        """DeepSpeed's save, then its own converter on it (what a user runs today before recognize.py)."""
        with timer(rows["save_checkpoint"]):
            engine.save_checkpoint(str(out), tag=f"a{i}")
            sync()
        with timer(rows["zero_to_fp32"]):
            subprocess.run([sys.executable, str(out / "zero_to_fp32.py"), str(out), str(out / f"e{i}"),
                            "-t", f"a{i}"], check=True, capture_output=True)
        remove(f"a{i}", f"e{i}")

    def hooked(i: int, times: list[float]) -> None:
        """The model+optimizer save of ``sharded: false``: <tag>.pt and <tag>.optim, no sharded folder.
        Blocking: the call, then what the next optimizer step waits for the save's copies."""
        with timer(times):
            save_consolidated(engine, out, f"b{i}", SaveOptions(optimizer=True), writer=writer)
        waited = step_wait_seconds(engine)
        one_step(engine, device, smoke)
        rows["step_held"].append(step_wait_seconds(engine) - waited)
        with timer(rows["background_write"]):
            settle_background(writer)
        remove(f"b{i}.pt", f"b{i}.optim")

    def gather_and_write(i: int) -> None:
        if not smoke:
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with timer(rows["gather"]):
            state_dict = consolidate(engine)
        if not smoke:
            rows["gather_mem"].append((torch.cuda.max_memory_allocated() - before) / 2**30)
        started = time.perf_counter()
        path = write_state_dict(state_dict, out / f"c{i}.pt")
        rows["write_mbps"].append(path.stat().st_size / 1e6 / (time.perf_counter() - started))
        del state_dict
        remove(f"c{i}.pt")

    def sixteen_bit(i: int) -> None:
        with timer(rows["save_16bit_model"]):
            engine.save_16bit_model(str(out / f"d{i}"), "model16.bin")
            sync()
        remove(f"d{i}")

    def progress(what: str) -> None:  # each figure as it is taken: a run stopped at a time limit keeps them
        print(f"bench/gpu.py: {what}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in rows.items() if v),
              file=sys.stderr, flush=True)

    print(f"bench/gpu.py: {params / 1e9:.2f} B parameters, one step taken", file=sys.stderr, flush=True)
    # The first save also makes the package's gloo group, agrees the layout and allocates the host copies.
    hooked(-1, first_save)
    print(f"bench/gpu.py: first save's call {first_save[0]:.3f} s", file=sys.stderr, flush=True)
    rows["step_held"].clear()
    for i in range(args.repeats):
        order = [plain, lambda i: hooked(i, rows["hook_blocking"]), gather_and_write, sixteen_bit]
        for run in order if i % 2 == 0 else order[::-1]:
            sync()
            run(i)
            progress(f"repeat {i + 1}")
    m = {k: median(v) if v else float("nan") for k, v in rows.items()}
    blocking = m["hook_blocking"] + m["step_held"]
    print(table(
        ["model", "gather (s)", "extra GPU memory in gather (GiB)", "save_checkpoint (s)",
         "hook, model+optimizer: call (s)", "next step held (s)", "blocking / save_checkpoint",
         "first save's call (s)", "background left after the step (s)", "write MB/s", "save_16bit_model (s)",
         "zero_to_fp32.py (s)"],
        [[f"{params / 1e9:.2f} B, ZeRO-3 bf16", f"{m['gather']:.2f}", f"{m['gather_mem']:.2f}",
          f"{m['save_checkpoint']:.2f}", f"{m['hook_blocking']:.3f}", f"{m['step_held']:.3f}",
          f"{blocking / m['save_checkpoint']:.3f}", f"{first_save[0]:.2f}", f"{m['background_write']:.2f}",
          f"{m['write_mbps']:.0f}", f"{m['save_16bit_model']:.2f}", f"{m['zero_to_fp32']:.2f}"]]))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/wenet_hooks_bench_gpu"))
    parser.add_argument("--cpu-smoke", action="store_true", help="a 2-block model on the CPU, to check the script")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    shutil.rmtree(args.out, ignore_errors=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    if args.cpu_smoke:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", __file__,
           "--worker", "--repeats", str(args.repeats), "--out", str(args.out)]
    if args.cpu_smoke:
        cmd.append("--cpu-smoke")
    # The worker's log, each figure as it is taken included, streams to stderr; stdout keeps the table alone.
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/gpu.py worker failed (exit {proc.returncode}): its log is above")
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|")))
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
