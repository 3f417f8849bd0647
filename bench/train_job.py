"""torchrun worker of the in-training benchmarks (questions 1 and 2 of bench/README.md).

    torchrun --standalone --nproc_per_node 2 bench/train_job.py --params 53e6 --stage 2 --out /tmp/b

Alternates, ``--repeats`` times each, and prints one table row per question:
1. blocking time of a save with ``save_states: model+optimizer``: DeepSpeed's
   ``save_checkpoint`` alone vs ``save_checkpoint`` + this package's save as the
   hook makes it (gather, then rank 0 writes in the background); the extra is
   also timed directly around the package's call;
2. ``model_only``: WeNet's current path (``save_checkpoint`` + DeepSpeed's
   ``convert_zero_checkpoint_to_fp32_state_dict`` on rank 0 + removal) vs this
   package, time to a recognize-ready file and bytes written;
3. exact resume: the extra blocking when the hook also writes ``<tag>.optim``
   (its gather in the background, as the hook does, and gathered first);
   ``<tag>.pt`` + ``<tag>.optim`` INSTEAD of DeepSpeed's sharded save (blocking
   time and bytes against ``save_checkpoint``); and what restoring them costs at
   start-up.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # support.tiny_training
from common import median, sized_model, table, timer  # noqa: E402

from support.tiny_training import ds_config, init_engine  # noqa: E402
from wenet_hooks.background import BackgroundWriter  # noqa: E402
from wenet_hooks.resume import restore  # noqa: E402
from wenet_hooks.save import SaveOptions, save_consolidated, settle_background  # noqa: E402


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def quiet_disk() -> None:
    """Every rank waits until earlier writes have reached the disk."""
    os.sync()
    dist.barrier()


def one_step(engine) -> None:
    x = torch.randn(2, engine.module[0].in_features)
    loss = F.mse_loss(engine(x), torch.zeros_like(x))
    engine.backward(loss)
    engine.step()


def wenet_model_only(engine, out: Path, tag: str) -> int:
    from deepspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict

    engine.save_checkpoint(str(out), tag=tag)
    written = 0
    if dist.get_rank() == 0:
        written = folder_bytes(out / tag)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            convert_zero_checkpoint_to_fp32_state_dict(str(out), str(out / f"{tag}.pt"), tag=tag)
        written += folder_bytes(out / f"{tag}.pt")
        shutil.rmtree(out / tag)
    dist.barrier()
    return written


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params", type=float, default=53e6)
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--save_only", metavar="TAG", help="only save a sharded checkpoint (for bench/offline.py)")
    args = parser.parse_args()
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    config = ds_config(args.stage)
    config["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4}}
    engine = init_engine(sized_model(args.params), config)
    one_step(engine)
    if args.save_only:
        engine.save_checkpoint(str(args.out), tag=args.save_only)
        return
    nparams = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    writer = BackgroundWriter()
    sharded, hooked, hook_part, background, wenet, ours, wenet_bytes, our_bytes = [], [], [], [], [], [], [], []
    optim_part, files_only, files_background, restores, sharded_bytes, files_bytes = [], [], [], [], [], []
    optim_sync_part, optim_background, optim_gather_background = [], [], []

    def plain_save(i: int) -> None:
        with timer(sharded):
            engine.save_checkpoint(str(args.out), tag=f"a{i}")
            dist.barrier()

    def hooked_save(i: int) -> None:
        with timer(hooked):  # what the hook does at a model+optimizer save
            engine.save_checkpoint(str(args.out), tag=f"b{i}")
            with timer(hook_part):  # the extra alone, timed directly
                save_consolidated(engine, args.out, f"b{i}", writer=writer)
                dist.barrier()
        with timer(background):  # training would run meanwhile; waited for here to keep runs apart
            settle_background(writer)

    def hooked_with_optimizer(i: int) -> None:
        engine.save_checkpoint(str(args.out), tag=f"e{i}")
        with timer(optim_part):  # the hook's extra blocking when it also writes <tag>.optim
            save_consolidated(engine, args.out, f"e{i}", SaveOptions(optimizer=True), writer=writer)
            dist.barrier()
        with timer(optim_gather_background):  # training would run meanwhile: the gather, then the write
            settle_background(writer)
        if dist.get_rank() == 0:
            sharded_bytes.append(folder_bytes(args.out / f"e{i}"))
        remove(f"e{i}", f"e{i}.pt", f"e{i}.optim")

    def remove(*names: str) -> None:
        """Rank 0 removes a measured save's files at once: at 256M one repeat would fill 20 GB."""
        if dist.get_rank() == 0:
            for name in names:
                path = args.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        dist.barrier()

    def hooked_with_optimizer_gathered_first(i: int) -> None:
        engine.save_checkpoint(str(args.out), tag=f"g{i}")
        with timer(optim_sync_part):  # the same, the optimizer state gathered before the call returns
            save_consolidated(engine, args.out, f"g{i}", SaveOptions(optimizer=True, background_gather=False),
                              writer=writer)
            dist.barrier()
        with timer(optim_background):
            settle_background(writer)
        remove(f"g{i}", f"g{i}.pt", f"g{i}.optim")

    def files_instead_of_sharded(i: int) -> None:
        with timer(files_only):  # <tag>.pt + <tag>.optim and no sharded save at all
            save_consolidated(engine, args.out, f"f{i}", SaveOptions(optimizer=True), writer=writer)
            dist.barrier()
        with timer(files_background):
            settle_background(writer)
        if dist.get_rank() == 0:
            files_bytes.append(folder_bytes(args.out / f"f{i}.pt") + folder_bytes(args.out / f"f{i}.optim"))
        dist.barrier()
        with timer(restores):  # what a resume costs at start-up (every rank reads both files)
            restore(engine, args.out / f"f{i}.pt", args.out / f"f{i}.optim")
            dist.barrier()
        remove(f"f{i}.pt", f"f{i}.optim")

    def wenet_path(i: int) -> None:
        with timer(wenet):
            wenet_bytes.append(wenet_model_only(engine, args.out, f"c{i}"))

    def our_path(i: int) -> None:
        with timer(ours):
            save_consolidated(engine, args.out, f"d{i}")
            dist.barrier()
        our_bytes.append(folder_bytes(args.out / f"d{i}.pt"))

    for i in range(args.repeats):
        # The two sides alternate which goes first, and each starts with the
        # page cache flushed, so neither pays for the other's dirty pages.
        for run in ([plain_save, hooked_save, wenet_path, our_path, hooked_with_optimizer,
                     hooked_with_optimizer_gathered_first, files_instead_of_sharded]
                    if i % 2 == 0 else
                    [hooked_save, plain_save, our_path, wenet_path, files_instead_of_sharded,
                     hooked_with_optimizer_gathered_first, hooked_with_optimizer]):
            quiet_disk()
            run(i)
        if dist.get_rank() == 0:
            for name in (f"a{i}", f"b{i}", f"b{i}.pt", f"c{i}.pt", f"d{i}.pt"):
                path = args.out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        quiet_disk()
    if dist.get_rank() != 0:
        return
    size = f"{nparams / 1e6:.0f}M, ZeRO-{args.stage}"
    extra = median(hook_part)
    print(table(["model", "save_checkpoint (s)", "+ wenet_hooks (s)", "difference (s)", "extra blocking (s)",
                 "extra / save_checkpoint", "background write after (s)"],
                [[size, f"{median(sharded):.2f}", f"{median(hooked):.2f}", f"{median(hooked) - median(sharded):.2f}",
                  f"{extra:.2f}", f"{extra / median(sharded):.2f}", f"{median(background):.2f}"]]))
    print()
    print(table(["model", "WeNet model_only (s)", "wenet_hooks (s)", "time ratio", "WeNet bytes written",
                 "wenet_hooks bytes", "bytes ratio"],
                [[size, f"{median(wenet):.2f}", f"{median(ours):.2f}", f"{median(ours) / median(wenet):.2f}",
                  f"{median(wenet_bytes) / 1e9:.2f} GB", f"{median(our_bytes) / 1e9:.2f} GB",
                  f"{median(our_bytes) / median(wenet_bytes):.2f}"]]))
    print()
    plain = median(sharded)
    with_optim = median(optim_part)
    print(table(["model", "save_checkpoint (s)", "blocking, .pt (s)", "blocking, .pt + .optim (s)",
                 "extra for .optim (s)", "extra for .optim / save_checkpoint",
                 "background gather + write after (s)", "blocking, optimizer gathered first (s)",
                 "its extra / save_checkpoint"],
                [[size, f"{plain:.2f}", f"{extra:.2f}", f"{with_optim:.2f}", f"{with_optim - extra:.2f}",
                  f"{(with_optim - extra) / plain:.2f}", f"{median(optim_gather_background):.2f}",
                  f"{median(optim_sync_part):.2f}", f"{(median(optim_sync_part) - extra) / plain:.2f}"]]))
    print()
    print(table(["model", "files only, blocking (s)", "files only / save_checkpoint",
                 "files only, background gather + write (s)", "sharded bytes", "files bytes",
                 "restore at start-up (s)"],
                [[size, f"{median(files_only):.2f}", f"{median(files_only) / plain:.2f}",
                  f"{median(files_background):.2f}", f"{median(sharded_bytes) / 1e9:.2f} GB",
                  f"{median(files_bytes) / 1e9:.2f} GB", f"{median(restores):.2f}"]]))


if __name__ == "__main__":
    main()
