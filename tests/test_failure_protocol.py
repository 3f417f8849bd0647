"""The one failure protocol of a save (:func:`wenet_hooks.dist.collective_step`), in one process: a step
returns its value, or raises the SaveError every rank raises; a later vote shares the failing rank's own
report. Across ranks: tests/test_faults.py."""

from __future__ import annotations

import pytest

from wenet_hooks.dist import Failure, collective_step
from wenet_hooks.errors import PhaseError, SaveError


def test_a_step_returns_its_value():
    assert collective_step("step_1", "planning", lambda: 42) == 42


def test_a_failing_step_raises_a_save_error_naming_the_tag_the_rank_and_the_phase():
    def work():
        raise OSError("disk on fire")

    with pytest.raises(SaveError, match=r"^save 'step_1' failed on rank 0 while writing x\.pt: disk on fire$") as e:
        collective_step("step_1", "writing x.pt", work)
    assert e.value.remote_traceback == ""  # the failing rank logged its own


def test_a_phase_error_names_its_own_phase_and_its_cause():
    def work():
        raise PhaseError("gathering the optimizer state", ValueError("bad keys"))

    with pytest.raises(SaveError, match=r"^save 'step_2' failed on rank 0 while gathering the optimizer state: "
                                         r"bad keys$") as e:
        collective_step("step_2", "gathering the weights", work)
    # Shared again (settle_background's vote): the report is the failing rank's, where it raised.
    report = Failure.from_exception(e.value)
    assert (report.rank, report.phase, report.message) == (0, "gathering the optimizer state", "bad keys")
    assert "ValueError: bad keys" in report.traceback
    assert str(report.error("step_2", "gathering ... in the background")) == (
        "save 'step_2' failed on rank 0 while gathering ... in the background: bad keys")
