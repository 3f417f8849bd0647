"""A background save's host copies: taken in chunks with the check in the same pass, and the next
optimizer step held until they are taken (wenet_hooks/gather/staging.py)."""

from __future__ import annotations

import gc
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from wenet_hooks.gather.check import ChunkCheck
import wenet_hooks.gather.masters as masters
from wenet_hooks.gather.masters import Fragment, Partitions, known_state, state_of, torch_optimizers
from wenet_hooks.gather.snapshots import SnapshotPool
import wenet_hooks.gather.staging as staging_module
from wenet_hooks.gather.staging import Staging, step_wait_seconds, wait_for_copies


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(staging_module, "_CHUNK", 3)  # every fragment below straddles chunks


def checked(flat: torch.Tensor, weights: list[torch.Tensor]) -> ChunkCheck:
    # Two parameters in one flat, listed out of offset order, with 2 elements of padding between them.
    fragments = [Fragment(group=0, param=1, start=4, offset=9, numel=5),
                 Fragment(group=0, param=0, start=0, offset=0, numel=7)]
    return ChunkCheck(Partitions([flat], fragments, process_group=None, weights=weights), ["encoder.w", "decoder.b"])


def test_copies_every_chunk_and_finds_a_wrong_element_in_a_later_chunk(small_chunks):
    flat = torch.arange(14, dtype=torch.float32)
    good = [flat[9:14].clone(), flat[0:7].clone()]
    staging = Staging(SnapshotPool(), deferred=True)
    copy = staging.buffer_for(flat)
    staging.add_check(checked(flat, good))
    staging.run()
    assert staging.done.is_set() and not staging.failure and staging.problem() is None
    assert torch.equal(copy, flat)

    bad = [good[0].clone(), good[1].clone()]
    bad[0][-1] += 1  # decoder.b's last element, in the flat's last chunk
    staging = Staging(SnapshotPool(), deferred=True)
    staging.buffer_for(flat)
    staging.add_check(checked(flat, bad))
    staging.run()
    assert staging.problem().startswith("rank 0: the fp32 masters read for 1 parameter(s) do not equal the "
                                        "module's own training weights once cast to their dtype: 'decoder.b' "
                                        "(elements 4..9); nothing was written or restored.")


def test_checks_bf16_weights_against_the_masters_rounded(small_chunks):
    flat = torch.randn(14)
    weights = [flat[9:14].to(torch.bfloat16), flat[0:7].to(torch.bfloat16)]
    staging = Staging(SnapshotPool(), deferred=True)
    staging.add_check(checked(flat, weights))  # read only: nothing copied
    staging.run()
    assert staging.problem() is None


def test_an_error_while_copying_is_kept_and_still_releases_the_steps():
    staging = Staging(SnapshotPool(), deferred=True)
    staging.buffer_for(torch.zeros(4))
    staging._buffers[next(iter(staging._buffers))] = torch.zeros(3)  # a buffer too small: copy_ raises
    staging.run()
    assert isinstance(staging.failure.error, RuntimeError) and staging.done.is_set()


class Engine:
    """What new_staging needs of a DeepSpeed engine: its optimizer, wrapping torch's (as ZeRO's does)."""

    def __init__(self) -> None:
        self.param = torch.nn.Parameter(torch.ones(3))
        self.optimizer = SimpleNamespace(optimizer=torch.optim.SGD([self.param], lr=0.5))


def new_staging(engine, on_host: bool, steppers: list, writes_in_backward: bool = False) -> Staging:
    """staging.new_staging with the parts of an EngineView it reads: the engine's state, its partitions
    (in host memory, or not), the optimizers whose steps can be held."""
    flat = torch.zeros(1, device="cpu" if on_host else "meta")
    view = SimpleNamespace(state=state_of(engine), partitions=SimpleNamespace(flats=[flat]), steppers=steppers,
                           writes_in_backward=writes_in_backward)
    staging_module.guard_steps(engine, view)
    return staging_module.new_staging(view)


def test_the_next_step_waits_until_the_copies_are_taken():
    engine = Engine()
    base = engine.optimizer.optimizer
    assert torch_optimizers(engine) == [base]
    staging = new_staging(engine, True, torch_optimizers(engine))
    assert staging.deferred
    copy = staging.buffer_for(engine.param.data)
    late = threading.Thread(target=lambda: (time.sleep(0.3), staging.run()))
    late.start()
    engine.param.grad = torch.ones(3)
    base.step()  # would change the parameter before the copy was taken
    late.join()
    assert torch.equal(copy, torch.ones(3)) and torch.equal(engine.param.data, torch.full((3,), 0.5))
    assert step_wait_seconds(engine) >= 0.25
    base.step()  # nothing in flight: no wait
    assert step_wait_seconds(engine) < 0.6


def test_a_cancelled_staging_releases_the_steps_and_the_hook_goes_with_the_engine():
    engine = Engine()
    base = engine.optimizer.optimizer
    staging = new_staging(engine, True, torch_optimizers(engine))
    staging.cancel()
    started = time.perf_counter()
    wait_for_copies(engine)
    base.step()
    assert time.perf_counter() - started < 0.2
    assert len(base._optimizer_step_pre_hooks) == 1
    del engine, staging
    gc.collect()
    assert len(base._optimizer_step_pre_hooks) == 0


def test_taken_at_the_save_when_the_flats_are_not_in_host_memory_or_no_step_can_be_held():
    assert not new_staging(Engine(), False, [torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)]).deferred
    assert not new_staging(Engine(), True, []).deferred


def test_a_hook_that_cannot_be_registered_publishes_no_guard_and_leaves_no_hook():
    """Every hook is in place before the guard is published: else a later save would defer its copies
    with no step held."""
    engine = Engine()
    first = engine.optimizer.optimizer
    second = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)

    def refuse(hook):
        raise RuntimeError("no hooks here")

    second.register_step_pre_hook = refuse
    with pytest.raises(RuntimeError, match="^no hooks here$"):
        new_staging(engine, True, [first, second])
    state = known_state(engine)
    assert (state is None or state.guard is None) and len(first._optimizer_step_pre_hooks) == 0
    assert "load_checkpoint" not in vars(engine)  # nothing wrapped either


class ZeroOptimizer:
    """What DeepSpeed's ZeRO optimizer has: torch's optimizer inside, and a writer of the masters."""

    def __init__(self, param: torch.nn.Parameter) -> None:
        self.optimizer = torch.optim.SGD([param], lr=0.5)
        self.calls: list[float] = []

    def refresh_fp32_params(self) -> None:
        self.calls.append(time.perf_counter())


class LoadingEngine(Engine):
    def __init__(self) -> None:
        super().__init__()
        self.optimizer = ZeroOptimizer(self.param)
        self.calls: list[float] = []

    def load_checkpoint(self, load_dir: str, tag: str) -> None:
        self.calls.append(time.perf_counter())


def test_deepspeeds_writers_outside_a_step_wait_for_the_copies_and_are_unwrapped_with_the_engine():
    engine = LoadingEngine()
    wrapper = engine.optimizer
    waited = []
    for owner, write in ((engine, lambda: engine.load_checkpoint("exp", "A")),
                         (wrapper, lambda: wrapper.refresh_fp32_params())):
        staging = new_staging(engine, True, torch_optimizers(engine))
        threading.Thread(target=lambda: (time.sleep(0.3), staging.run())).start()
        started = time.perf_counter()
        write()
        waited.append(owner.calls[-1] - started)
        staging.release()
    assert min(waited) >= 0.25, waited  # each waited for the copies in flight
    assert "load_checkpoint" in vars(engine) and "refresh_fp32_params" in vars(wrapper)
    del engine
    gc.collect()
    assert "refresh_fp32_params" not in vars(wrapper)  # DeepSpeed's own method again


def test_saves_of_optimizers_that_write_the_masters_during_backward_take_their_copies_at_the_call():
    """SuperOffload (its CPU sub-groups stepped in a worker process during backward) and ZenFlow (masters
    overwritten in backward_prologue): DeepSpeed's own classes, recognised by name across versions."""
    from declared_skips import write_during_backward_classes

    classes = write_during_backward_classes()
    if not classes:
        pytest.skip("this DeepSpeed has neither SuperOffload nor ZenFlow")
    for cls in classes:
        engine = Engine()
        engine.optimizer = object.__new__(cls)  # the class is what is read; nothing of it runs
        assert masters.writes_masters_during_backward(engine)
        assert not new_staging(engine, True, [torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1)],
                               masters.writes_masters_during_backward(engine)).deferred
    assert not masters.writes_masters_during_backward(Engine())


@pytest.fixture
def world_of_one(tmp_path):
    """torch.distributed in this process, one rank (gloo): what a background save's group needs."""
    import torch.distributed as dist

    from wenet_hooks.dist import release_background_group

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield
    finally:
        release_background_group()
        dist.destroy_process_group()


def test_a_save_refused_at_the_call_holds_no_step(tmp_path, monkeypatch, world_of_one):
    """A background save that fails before its job starts (no model_dir; a failure while preparing)
    leaves the next optimizer step free: nothing registered, or what was registered released."""
    import wenet_hooks.plan as plan
    import wenet_hooks.save as save
    from wenet_hooks import BackgroundWriter, SaveOptions, save_consolidated
    from wenet_hooks.errors import SaveError

    model = torch.nn.Linear(2, 2)
    model.optimizer = SimpleNamespace(optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    inspect = masters.inspect_engine

    def on_host(engine):  # as DeepSpeed's CPU partitions are
        view = inspect(engine)
        view.partitions = Partitions([p.data for p in model.parameters()], [], None, [])
        return view

    monkeypatch.setattr(plan, "inspect_engine", on_host)
    writer = BackgroundWriter()
    with pytest.raises(TypeError):
        save_consolidated(model, None, "step_1", SaveOptions(), writer=writer)

    def refuse(*args, **kwargs):
        raise MemoryError("injected: no memory for the gather")

    monkeypatch.setattr(save, "prepare_consolidate", refuse)
    with pytest.raises(SaveError, match=r"^save 'step_2' failed on rank 0 while gathering the weights: injected"):
        save_consolidated(model, tmp_path, "step_2", SaveOptions(), writer=writer)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    step = threading.Thread(target=model.optimizer.optimizer.step)
    step.start()
    step.join(timeout=5)
    assert not step.is_alive(), "the next step waits for copies that no job will take"
    assert writer.wait() is None and sorted(p.name for p in tmp_path.iterdir()) == ["store"]
