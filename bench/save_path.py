"""The shape of one save, traced at run time: how many of the package's modules and classes a
model+optimizer background save runs through, how often it comes back to a module it had left,
and how many collectives the training thread makes.

    python bench/save_path.py                   # the installed wenet_hooks
    PYTHONPATH=/path/to/other/checkout python bench/save_path.py   # another version, for the same table

It launches itself on 2 CPU ranks (torchrun, gloo, the tiny model of tests/support), saves three
times with ``save_consolidated(..., SaveOptions(optimizer=True), writer=...)`` and traces the third
(the steady state: layout agreed, background group made) on rank 0, both threads:

- modules: the package's modules whose functions ran;
- entries: times the running code moved into a module of the package from another one (a call or a
  return), counted as the trace sees frames; returns: those entries into a module the save had left
  before;
- classes: the package's classes a method of which ran, or that were made;
- collectives: torch.distributed calls on the training thread during the save's call;
- the engine's path (the issue's measure): only the calls that are handed the engine or an object
  derived from it (one of the package's objects that a call handed the engine itself returned, or
  one holding such an object: the engine's view, its state, the save's plan, the save itself), in
  the order they run, and the returns from them: the modules entered, and the entries into a module
  the path had left before. Calls in loops count each time (two optimizer states: twice).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent / "tests"


def _module_of(frame) -> str | None:
    name = frame.f_globals.get("__name__", "")
    return name if name == "wenet_hooks" or name.startswith("wenet_hooks.") else None


class Trace:
    """A profile function for every thread: the package's module transitions and classes, in order."""

    def __init__(self) -> None:
        self.sequence: list[str] = []
        self.classes: set[str] = set()
        self.lock = threading.Lock()

    def __call__(self, frame, event, arg):
        if event not in ("call", "return"):
            return
        target = frame.f_back if event == "return" else frame
        module = _module_of(target) if target is not None else None
        if module is None:
            return
        if event == "call":
            owner = frame.f_locals.get("self") if frame.f_code.co_varnames[:1] == ("self",) else None
            if owner is not None and type(owner).__module__.startswith("wenet_hooks"):
                self.classes.add(f"{type(owner).__module__}.{type(owner).__qualname__}")
        with self.lock:
            if not self.sequence or self.sequence[-1] != module:
                self.sequence.append(module)

    def summary(self) -> dict:
        entries, returns = _moves(self.sequence)
        return {"modules": len(set(self.sequence)), "entries": entries, "returns": returns,
                "classes": len(self.classes), "class_names": sorted(self.classes)}


def _moves(sequence: list[str]) -> tuple[int, int]:
    """(moves from one module to another, moves into a module left before)."""
    left, entries, returns = set(), 0, 0
    for previous, module in zip(sequence, sequence[1:]):
        entries += 1
        left.add(previous)
        returns += module in left
    return entries, returns


class EnginePath:
    """A profile function: the modules of the calls handed the engine or an object derived from it."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self.derived = {id(engine)}
        self.made: set[int] = set()  # the frames of calls handed the engine itself
        self.frames: set[int] = set()  # the frames of such calls, to follow their returns
        self.sequence: list[str] = []

    def _is_derived(self, value) -> bool:
        if id(value) in self.derived:
            return True
        if type(value).__module__.startswith("wenet_hooks") and hasattr(value, "__dict__"):
            if any(id(v) in self.derived for v in vars(value).values()):
                self.derived.add(id(value))
                return True
        return False

    def _add(self, module: str | None) -> None:
        if module is not None and (not self.sequence or self.sequence[-1] != module):
            self.sequence.append(module)

    def __call__(self, frame, event, arg):
        if event == "call":
            code = frame.f_code
            names = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
            if _module_of(frame) and any(self._is_derived(frame.f_locals.get(n)) for n in names):
                self.frames.add(id(frame))
                if any(frame.f_locals.get(n) is self.engine for n in names):
                    self.made.add(id(frame))
                self._add(_module_of(frame))
        elif event == "return" and id(frame) in self.frames:
            self.frames.discard(id(frame))
            if id(frame) in self.made and type(arg).__module__.startswith("wenet_hooks"):
                self.derived.add(id(arg))  # made from the engine itself: derived (its view, its state...)
            self.made.discard(id(frame))
            if frame.f_back is not None:
                self._add(_module_of(frame.f_back))

    def summary(self) -> dict:
        entries, returns = _moves(self.sequence)
        return {"path_modules": len(set(self.sequence)), "path_returns": returns, "path": self.sequence}


def worker(out: Path) -> None:
    sys.path.insert(0, str(TESTS))
    import deepspeed
    import torch.distributed as dist

    from support.tiny_model import build_model
    from support.tiny_training import ds_config, init_engine, train_steps
    from wenet_hooks import BackgroundWriter, SaveOptions, save_consolidated
    from wenet_hooks.save import settle_background

    deepspeed.init_distributed(dist_backend="gloo")
    engine = init_engine(build_model(), ds_config(2))
    writer = BackgroundWriter()
    folder = out / "saves"
    folder.mkdir(parents=True, exist_ok=True)
    for n in range(3):
        train_steps(engine, 1, first_step=n)
        settle_background(writer)
        traced = n == 2 and dist.get_rank() == 0
        trace, path, collectives, real = Trace(), EnginePath(engine), [], dist.all_gather_object
        both = (lambda frame, event, arg: (trace(frame, event, arg), path(frame, event, arg))) if traced else None
        if n == 2:
            def counting(*args, **kwargs):
                if threading.current_thread() is threading.main_thread():
                    collectives.append("all_gather_object")
                return real(*args, **kwargs)
            dist.all_gather_object = counting
        if traced:
            threading.setprofile(both)
            sys.setprofile(both)
        save_consolidated(engine, folder, f"step_{n}", SaveOptions(optimizer=True), writer=writer)
        sys.setprofile(None)
        dist.all_gather_object = real
        settle_background(writer)  # the background job's frames were traced too (threading.setprofile)
        threading.setprofile(None)
        if traced:
            (out / "trace.json").write_text(json.dumps({**trace.summary(), **path.summary(),
                                                        "collectives": len(collectives)}))
    dist.barrier()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(Path(sys.argv[2]))
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        __file__, "--worker", tmp], check=True, env=env, capture_output=True)
        found = json.loads((Path(tmp) / "trace.json").read_text())
    import wenet_hooks

    print(f"wenet_hooks from {Path(wenet_hooks.__file__).parent}")
    print("| measure | value |\n| --- | --- |")
    for key in ("path_modules", "path_returns", "modules", "entries", "returns", "classes", "collectives"):
        print(f"| {key} | {found[key]} |")
    print("classes:", ", ".join(name.removeprefix("wenet_hooks.") for name in found["class_names"]))
    print("the engine's path:", " -> ".join(name.removeprefix("wenet_hooks.") for name in found["path"]))


if __name__ == "__main__":
    main()
