"""The one failure protocol of a save (:func:`wenet_hooks.dist.collective_step`), in one process: a step
goes on, or raises the SaveError every rank raises; a later vote shares the failing rank's own report.
Across ranks: tests/test_faults.py."""

from __future__ import annotations

import pytest

from wenet_hooks.dist import Failure, collective_step
from wenet_hooks.errors import PhaseError, SaveError


def test_a_step_that_succeeds_goes_on():
    done = []
    with collective_step("step_1", "planning"):
        done.append(42)
    assert done == [42]


def test_a_failing_step_raises_a_save_error_naming_the_tag_the_rank_and_the_phase():
    with pytest.raises(SaveError, match=r"^save 'step_1' failed on rank 0 while writing x\.pt: disk on fire$") as e:
        with collective_step("step_1", "writing x.pt"):
            raise OSError("disk on fire")
    assert e.value.remote_traceback == ""  # the failing rank logged its own


def test_a_phase_error_names_its_own_phase_and_its_cause():
    with pytest.raises(SaveError, match=r"^save 'step_2' failed on rank 0 while gathering the optimizer state: "
                                         r"bad keys$") as e:
        with collective_step("step_2", "gathering the weights"):
            raise PhaseError("gathering the optimizer state", ValueError("bad keys"))
    # Shared again (settle_background's vote): the report is the failing rank's, where it raised.
    report = Failure.from_exception(e.value)
    assert (report.rank, report.phase, report.message) == (0, "gathering the optimizer state", "bad keys")
    assert "ValueError: bad keys" in report.traceback
    assert str(report.error("step_2", "gathering ... in the background")) == (
        "save 'step_2' failed on rank 0 while gathering ... in the background: bad keys")
