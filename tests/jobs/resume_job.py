"""torchrun worker for exact resume from ``<tag>.pt`` + ``<tag>.optim``.

Usage: resume_job.py OUT_DIR MODE=ARG [MODE=ARG ...], run in order; what each
mode records goes to ``OUT_DIR/rank<r>.json`` under the mode's name. Modes:

- ``exact=CASE+CASE...``: per case (``z<stage>-<fp32|bf16>-<offload|nooffload>``), an
  uninterrupted run of 6 steps saving both files after step 3 (the optimizer
  state gathered in the background while steps 4-6 run), and a resumed
  run: a fresh model loads ``step_3.pt`` (as WeNet's ``--checkpoint`` does),
  ``deepspeed.initialize``, ``restore``, then steps 4-6. Records both runs'
  losses and learning rates, and those of DeepSpeed's own resume from its
  sharded save of the same step.
- ``write=FOLDER``: ZeRO-2 and ZeRO-3 runs of 3 steps, each saving DeepSpeed's
  sharded ``step_3/`` and both files in ``FOLDER/zero<stage>/`` (for a job of
  another world size to restore, and the offline command to convert).
- ``restore=FOLDER``: for each (saved stage, this run's stage) of 2 and 3:
  restore FOLDER/zero<saved>/step_3.*, save DeepSpeed's own sharded checkpoint
  of what was restored (``OUT_DIR/ds-<saved>-<stage>/``), gather the masters and
  optimizer state again into ``OUT_DIR/again-<saved>-<stage>.*``, then train
  one more step.
- ``fresh=CASE``: files saved before the first step, resumed (nothing to restore but counters).
- ``zero0=``: a ZeRO-0 save asked for an optimizer file (it has none to give).
- ``votes=``: the collectives a model+optimizer background save makes on the training thread (ZeRO-2 and
  ZeRO-3, three saves of one engine).
- ``reload=``: a background save, then at once ``engine.load_checkpoint`` of an earlier tag:
  whether the files hold the save's state (ZeRO-2 and ZeRO-3).
- ``refuse=FOLDER``: bad files offered to a ZeRO-2 run: each error message, and
  whether anything changed.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from support.tiny_model import build_model
from support.tiny_training import ds_config, init_engine, train_steps
from wenet_hooks import BackgroundWriter, SaveOptions, consolidate, save_consolidated, write_state_dict
from wenet_hooks.dist import all_reports
from wenet_hooks.errors import RestoreError
from wenet_hooks.file.optimizer_file import meta_tensor, to_file_dict
from wenet_hooks.gather.masters import inspect_engine
from wenet_hooks.gather.optimizer import consolidate_optimizer, prepare_optimizer, state_keys
from wenet_hooks.gather.staging import Staging, step_wait_seconds
from wenet_hooks.resume import restore
from wenet_hooks.save import settle_background

TAG = "step_3"
SLOW_COPIES_S = 0.5


def engine_for(case: str, weights: Path | None = None):
    stage, precision, offload = case.split("-")
    stage = int(stage[1:])
    config = ds_config(stage, precision, offload_optimizer=offload == "offload",
                       offload_param=offload == "offload" and stage == 3, scheduler=True)
    model = build_model()
    if weights is not None:  # what WeNet's --checkpoint does: the fp32 weights into the model
        model.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True), strict=False)
    return init_engine(model, config)


def lr(engine) -> float:
    return float(engine.optimizer.param_groups[0]["lr"])


def fresh_engine(case: str, weights: Path | None = None):
    """An engine built as in a process of its own, as near as one process allows.

    DeepSpeed's arithmetic can depend on what else lives in the process: with
    DeepSpeed 0.16.9 at ZeRO-3 + offload the previous cases' engines, collected
    by the garbage collector at some step or kept alive, changed the third
    loss of an uninterrupted run. So every engine starts after a collection.
    """
    gc.collect()
    return engine_for(case, weights)


def exact(out: Path, cases: list[str]) -> dict:
    seen = {}
    for case in cases:
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        try:
            engine = fresh_engine(case)
            train_steps(engine, 3)
            engine.save_checkpoint(str(folder), tag=TAG)  # for DeepSpeed's own resume below
            # As the WeNet hook saves: the optimizer state is gathered in the background while
            # training goes on, from the copy each rank took at the save.
            writer = BackgroundWriter()
            with slow_copies():
                save_consolidated(engine, folder, TAG, SaveOptions(optimizer=True), writer=writer)
                # (its own group: the save's background gather is using the package's)
                view = inspect_engine(engine)
                keys = state_keys(view.partitions, view.optimizer, view.wrapper)
                late = prepare_optimizer(view, view.state.agreed[0], keys,  # the layout the save agreed on
                                         background_group=dist.new_group(backend="gloo"))
                straight = train_steps(engine, 1, first_step=3)  # its step waits for the save's slow copies
            held = step_wait_seconds(engine)
            late_state = late.in_memory()
            straight += train_steps(engine, 2, first_step=4)
            settle_background(writer)
            straight_lr = lr(engine)
            snapshot_kept = same_as_file(late_state, folder / f"{TAG}.optim") if dist.get_rank() == 0 else None
            del engine
            resumed_engine = fresh_engine(case, folder / f"{TAG}.pt")
            restored = restore(resumed_engine, folder / f"{TAG}.pt", folder / f"{TAG}.optim")
            resumed = train_steps(resumed_engine, 3, first_step=3)
            resumed_lr = lr(resumed_engine)
            del resumed_engine
            # WeNet's resume without the optimizer file: weights only, Adam restarts.
            weights_only = train_steps(fresh_engine(case, folder / f"{TAG}.pt"), 3, first_step=3)
            # DeepSpeed's own resume is the bar only where ours departs from the uninterrupted run (on
            # any rank: each logs its own batches' losses, and every rank must take the same way).
            bar = deepspeed_resume(case, folder) if any(all_reports(resumed != straight)) else None
            seen[case] = {"straight": straight, "resumed": resumed, "weights_only": weights_only,
                          "lr": [straight_lr, resumed_lr], "restored": str(restored), "snapshot": snapshot_kept,
                          "deepspeed_resumed": bar, "step_held_s": held}
        except Exception:
            traceback.print_exc()
            seen[case] = {"error": traceback.format_exc()}
        dist.barrier()
    return seen


@contextlib.contextmanager
def slow_copies():
    """Each save's host copies start late (taken by its background job): a step that did not wait for
    them would change the masters and moments first, and the file would hold the next step's state."""
    real = Staging.run

    def late(self):
        time.sleep(SLOW_COPIES_S)
        real(self)

    Staging.run = late
    try:
        yield
    finally:
        Staging.run = real


def same_as_file(gathered, path: Path) -> bool | str:
    """Whether a gather prepared at the save and finished a step later holds the file's state, bit for bit
    (else what differs)."""
    saved = torch.load(str(path), weights_only=True)
    # The file's meta also names its save (its weights' fingerprint), which a separate gather lacks.
    meta = json.loads(bytes(saved["meta"].numpy()).decode())
    if not meta.pop("weights", None):
        return f"no weights fingerprint in the meta: {meta}"
    meta.pop("format")
    saved["meta"] = meta_tensor(meta)
    mine = to_file_dict(gathered.state, gathered.meta)
    if saved.keys() != mine.keys():
        return f"keys {sorted(saved.keys() ^ mine.keys())}"
    differ = [k for k in saved if not torch.equal(
        saved[k].view(torch.uint8) if saved[k].is_floating_point() else saved[k],
        mine[k].view(torch.uint8) if mine[k].is_floating_point() else mine[k])]
    if "meta" in differ:
        return f"meta {meta} != {gathered.meta}"
    return not differ or f"differ: {differ}"


def deepspeed_resume(case: str, folder: Path) -> list[float] | str:
    """Steps 4-6 after DeepSpeed's own ``load_checkpoint`` of the same save at the same world size:
    the bar for "exact" (where it differs from the uninterrupted run, so does DeepSpeed); its error
    as text, which the test reports as a failure."""
    try:
        engine = fresh_engine(case)
        engine.load_checkpoint(str(folder), tag=TAG)
        return train_steps(engine, 3, first_step=3)
    except Exception as e:
        return f"{type(e).__name__}: {e}"


def fresh(out: Path, case: str) -> dict:
    """Files saved before the first step (WeNet's init save: no optimizer state yet), then resumed."""
    folder = out / "fresh"
    folder.mkdir(parents=True, exist_ok=True)
    engine = engine_for(case)
    save_consolidated(engine, folder, "init", SaveOptions(optimizer=True))
    straight = train_steps(engine, 3)
    resumed_engine = engine_for(case, folder / "init.pt")
    restored = restore(resumed_engine, folder / "init.pt", folder / "init.optim")
    return {"straight": straight, "resumed": train_steps(resumed_engine, 3), "restored": str(restored)}


def zero0(out: Path) -> dict:
    """ZeRO-0 keeps no partitioned optimizer state: the save goes on without an optimizer file, and
    removes a stale one of the same tag (under its name and under wenet_hooks 0.2.0's)."""
    folder = out / "zero0"
    folder.mkdir(parents=True, exist_ok=True)
    if dist.get_rank() == 0:
        (folder / f"{TAG}.optim").write_bytes(b"an older save's optimizer file")
        (folder / f"{TAG}.optim.pt").write_bytes(b"an older save's optimizer file, named by wenet_hooks 0.2.0")
    dist.barrier()
    engine = engine_for("z0-fp32-nooffload")
    train_steps(engine, 3)
    save_consolidated(engine, folder, TAG, SaveOptions(optimizer=True))
    return {"files": sorted(p.name for p in folder.iterdir())}


def write(folder: Path) -> dict:
    for stage in (2, 3):
        engine = engine_for(f"z{stage}-fp32-nooffload")
        train_steps(engine, 3)
        (folder / f"zero{stage}").mkdir(parents=True, exist_ok=True)
        engine.save_checkpoint(str(folder / f"zero{stage}"), tag=TAG)  # for the offline command
        save_consolidated(engine, folder / f"zero{stage}", TAG, SaveOptions(optimizer=True))
        dist.barrier()
    return {}


def restore_elsewhere(out: Path, folder: Path) -> dict:
    seen = {}
    for saved in (2, 3):
        for stage in (2, 3):
            weights = folder / f"zero{saved}" / f"{TAG}.pt"
            engine = engine_for(f"z{stage}-fp32-nooffload", weights)
            restored = restore(engine, weights, folder / f"zero{saved}" / f"{TAG}.optim")
            # DeepSpeed's own sharded save of what was restored: its zero_to_fp32 is the test's oracle.
            engine.save_checkpoint(str(out / f"ds-{saved}-{stage}"), tag=TAG)
            again = consolidate(engine)
            optim = consolidate_optimizer(engine)
            if dist.get_rank() == 0:
                write_state_dict(again, out / f"again-{saved}-{stage}.pt")
                write_state_dict(to_file_dict(optim.state, optim.meta), out / f"again-{saved}-{stage}.optim")
            losses = train_steps(engine, 1, first_step=3)
            seen[f"{saved}->{stage}"] = {"restored": str(restored), "loss": losses[0]}
            dist.barrier()
    return seen


class Payload:
    """A crafted pickle: loading it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def make_bad_files(folder: Path) -> None:
    """Rank 0: optimizer files that must be refused, made from the good one."""
    good = torch.load(str(folder / f"{TAG}.optim"), weights_only=True)
    meta = json.loads(bytes(good["meta"].numpy()).decode())
    state = {}
    for key, value in good.items():
        if key != "meta":
            name, _, param = key.partition("/")
            state.setdefault(param, {})[name] = value
    other = {p: dict(v) for p, v in state.items()}
    other["encoder.encoders.0.linear.weight"]["exp_avg"] = torch.zeros(3, 3)
    other["encoder.extra.weight"] = {"exp_avg": torch.zeros(2), "exp_avg_sq": torch.zeros(2)}
    torch.save(to_file_dict(other, meta), folder / "bad-another-model.optim")
    sgd = {p: {"momentum_buffer": v["exp_avg"]} for p, v in state.items()}
    torch.save(to_file_dict(sgd, {**meta, "optimizer": "SGD", "state_keys": ["momentum_buffer"]}),
               folder / "bad-sgd.optim")
    raw = (folder / f"{TAG}.optim").read_bytes()
    (folder / "bad-truncated.optim").write_bytes(raw[: len(raw) // 2])
    torch.save({"meta": good["meta"], "payload": Payload(folder / "crafted-ran")}, folder / "bad-crafted.optim")
    # Saved at step 3 with no state: the state was kept where the save did not read it.
    torch.save(to_file_dict({}, {**meta, "state_keys": []}), folder / "bad-nostate.optim")
    incomplete = {k: v for k, v in meta.items() if k not in ("step", "param_groups")}
    flat = to_file_dict(state, {})
    flat["meta"] = torch.frombuffer(bytearray(json.dumps(incomplete).encode()), dtype=torch.uint8)
    torch.save(flat, folder / "bad-incomplete.optim")
    weights = torch.load(str(folder / f"{TAG}.pt"), weights_only=True)
    torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in weights.items()},
               folder / "bf16-weights.pt")
    # The weights of another save (one value moved by an ulp), beside this save's optimizer file.
    first = next(k for k, v in weights.items() if v.is_floating_point())
    weights[first] = weights[first].clone()
    weights[first].view(-1)[0] = torch.nextafter(weights[first].view(-1)[0], torch.tensor(1e9))
    torch.save(weights, folder / "other-save.pt")


def refuse(folder: Path) -> dict:
    if dist.get_rank() == 0:
        make_bad_files(folder)
    dist.barrier()
    engine = engine_for("z2-fp32-nooffload", folder / f"{TAG}.pt")
    before = consolidate(engine)
    seen = {}
    attempts = [(f"{TAG}.pt", p.name) for p in sorted(folder.glob("bad-*.optim"))]
    attempts += [("bf16-weights.pt", f"{TAG}.optim"), ("other-save.pt", f"{TAG}.optim")]
    for weights, optim in attempts:
        try:
            restore(engine, folder / weights, folder / optim)
            seen[optim if weights == f"{TAG}.pt" else weights] = "restored"
        except RestoreError as e:
            seen[optim if weights == f"{TAG}.pt" else weights] = str(e)
    after = consolidate(engine)
    if dist.get_rank() == 0:
        seen["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
        seen["crafted ran"] = (folder / "crafted-ran").exists()
    return seen


def reload(out: Path) -> dict:
    """A background save of B, then at once DeepSpeed's ``load_checkpoint`` of an earlier A (a roll-back
    after a loss spike) while B's copies are still to be taken: B's files must hold B's state."""
    seen = {}
    for stage in (2, 3):
        folder = out / f"reload{stage}"
        folder.mkdir(parents=True, exist_ok=True)
        engine = engine_for(f"z{stage}-fp32-nooffload")
        train_steps(engine, 2)
        engine.save_checkpoint(str(folder), tag="A")
        train_steps(engine, 2, first_step=2)
        truth = consolidate(engine)  # B's weights, gathered in the foreground (every rank takes part)
        truth_optim = consolidate_optimizer(engine)
        writer = BackgroundWriter()
        with slow_copies():
            save_consolidated(engine, folder, "B", SaveOptions(optimizer=True), writer=writer)
            engine.load_checkpoint(str(folder), tag="A")  # writes the masters in place, outside any step
        settle_background(writer)
        rolled_back = consolidate(engine)
        if dist.get_rank() == 0:
            saved = torch.load(str(folder / "B.pt"), weights_only=True)
            optim = torch.load(str(folder / "B.optim"), weights_only=True)
            expected = to_file_dict(truth_optim.state, truth_optim.meta)
            seen[stage] = {
                "B holds B": sorted(k for k in truth if torch.equal(saved[k], truth[k])) == sorted(truth),
                "B.optim holds B": all(torch.equal(optim[k], expected[k]) for k in expected if k != "meta"),
                "rolled back": any(not torch.equal(rolled_back[k], truth[k]) for k in truth),
            }
        dist.barrier()
    return seen


COLLECTIVES = ("all_gather_object", "all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "gather",
               "scatter", "reduce_scatter_tensor", "barrier", "new_group")


@contextlib.contextmanager
def collectives_on_this_thread(counted: list[str]):
    """Every torch.distributed collective this thread calls, by name, into ``counted``."""
    main, real = threading.current_thread(), {name: getattr(dist, name) for name in COLLECTIVES}

    def counting(name):
        def call(*args, **kwargs):
            if threading.current_thread() is main:
                counted.append(name)
            return real[name](*args, **kwargs)
        return call

    for name in COLLECTIVES:
        setattr(dist, name, counting(name))
    try:
        yield
    finally:
        for name, function in real.items():
            setattr(dist, name, function)


def votes(out: Path) -> dict:
    """The collectives a model+optimizer background save makes on the training thread: at an engine's first
    save (its layout agreed, the background group made) and at the next ones."""
    folder = out / "votes"
    folder.mkdir(parents=True, exist_ok=True)
    seen = {}
    for stage in (2, 3):
        engine = engine_for(f"z{stage}-fp32-nooffload")
        writer = BackgroundWriter()
        for n, name in enumerate(("first", "second", "third")):
            train_steps(engine, 1, first_step=n)
            counted: list[str] = []
            with collectives_on_this_thread(counted):
                save_consolidated(engine, folder, f"z{stage}_{name}", SaveOptions(optimizer=True), writer=writer)
            seen[f"z{stage} {name}"] = counted
        settle_background(writer)
        dist.barrier()
    return seen


def main() -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    seen = {}
    for token in sys.argv[2:]:
        mode, _, arg = token.partition("=")
        if mode == "exact":
            seen[mode] = exact(out, arg.split("+"))
        elif mode == "write":
            seen[mode] = write(Path(arg))
        elif mode == "restore":
            seen[mode] = restore_elsewhere(out, Path(arg))
        elif mode == "fresh":
            seen[mode] = fresh(out, arg)
        elif mode == "zero0":
            seen[mode] = zero0(out)
        elif mode == "reload":
            seen[mode] = reload(out)
        elif mode == "votes":
            seen[mode] = votes(out)
        else:
            seen[mode] = refuse(Path(arg))
    (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(seen))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
