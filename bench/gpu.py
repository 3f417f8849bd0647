"""Question 5 (GPU): a Whisper-large-v3-sized model (bench/whisper_large.py, ~1.6 B parameters)
under ZeRO-3 bf16 on one GPU.

    python bench/gpu.py [--repeats 3] [--out /tmp/wh-gpu]        # on a machine with a GPU
    python bench/gpu.py --cpu-smoke                                # checks the script on a CPU, tiny model

Launches itself under torchrun (1 rank, NCCL) and prints one table: the gather
(``consolidate``) time and the extra GPU memory it takes, the blocking time of a
model+optimizer save with the hook (the gather; rank 0 writes in the background)
next to ``save_checkpoint`` alone, the write throughput, and, on the same
checkpoint, DeepSpeed's ``save_16bit_model`` and ``zero_to_fp32.py``. Medians of
``--repeats``; the compared saves alternate.
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
    from wenet_hooks.save import save_consolidated, settle_background

    smoke = args.cpu_smoke
    deepspeed.init_distributed(dist_backend="gloo" if smoke else "nccl")
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    with deepspeed.zero.Init(config_dict_or_path=ds_config(smoke)):
        model = WhisperLarge(blocks=2 if smoke else 32, vocab=1000 if smoke else 51866)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config(smoke))
    one_step(engine, device, smoke)
    params = sum(p.ds_numel for p in engine.module.parameters())
    out, writer = args.out, BackgroundWriter()
    rows: dict[str, list[float]] = {k: [] for k in (
        "save_checkpoint", "gather", "gather_mem", "hook_blocking", "background_write", "write_mbps",
        "save_16bit_model", "zero_to_fp32")}

    def sync() -> None:
        if not smoke:
            torch.cuda.synchronize()
        os.sync()
        dist.barrier()

    def plain(i: int) -> None:
        with timer(rows["save_checkpoint"]):
            engine.save_checkpoint(str(out), tag=f"a{i}")
            sync()

    def hooked(i: int) -> None:
        engine.save_checkpoint(str(out), tag=f"b{i}")
        sync()
        with timer(rows["hook_blocking"]):
            save_consolidated(engine, out, f"b{i}", writer=writer)
        with timer(rows["background_write"]):
            settle_background(writer)

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

    def sixteen_bit(i: int) -> None:
        with timer(rows["save_16bit_model"]):
            engine.save_16bit_model(str(out / f"d{i}"), "model16.bin")
            sync()

    def deepspeed_converter(i: int) -> None:
        with timer(rows["zero_to_fp32"]):
            subprocess.run([sys.executable, str(out / "zero_to_fp32.py"), str(out), str(out / f"e{i}"),
                            "-t", f"a{i}"], check=True, capture_output=True)

    for i in range(args.repeats):
        order = [plain, hooked, gather_and_write, sixteen_bit, deepspeed_converter]
        for run in order if i % 2 == 0 else [hooked, plain, sixteen_bit, gather_and_write, deepspeed_converter]:
            sync()
            run(i)
        for name in (f"a{i}", f"b{i}", f"b{i}.pt", f"c{i}.pt", f"d{i}", f"e{i}"):
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    m = {k: median(v) if v else float("nan") for k, v in rows.items()}
    print(table(
        ["model", "gather (s)", "extra GPU memory in gather (GiB)", "save_checkpoint (s)", "hook blocking (s)",
         "blocking / save_checkpoint", "background write (s)", "write MB/s", "save_16bit_model (s)",
         "zero_to_fp32.py (s)"],
        [[f"{params / 1e9:.2f} B, ZeRO-3 bf16", f"{m['gather']:.2f}", f"{m['gather_mem']:.2f}",
          f"{m['save_checkpoint']:.2f}", f"{m['hook_blocking']:.2f}",
          f"{m['hook_blocking'] / m['save_checkpoint']:.2f}", f"{m['background_write']:.2f}",
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
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"bench/gpu.py worker failed:\n{proc.stderr[-4000:]}")
    print("\n".join(line for line in proc.stdout.splitlines() if line.startswith("|")))
    shutil.rmtree(args.out, ignore_errors=True)


if __name__ == "__main__":
    main()
