"""shared_support.wait_for, the one polling loop of the suite, fails when it should."""

from __future__ import annotations

import itertools

import pytest
from shared_support import wait_for


def test_returns_the_first_true_answer() -> None:
    answers = iter([None, 0, "", "ready", "later"])
    assert wait_for("an answer", lambda: next(answers), 5, interval=0.001) == "ready"


def test_times_out_naming_what_and_why() -> None:
    polls = itertools.count()
    with pytest.raises(pytest.fail.Exception) as info:
        wait_for("the door to open", lambda: next(polls) < 0, 0.05, interval=0.001,
                 explain=lambda: "still locked")
    assert str(info.value) == "timed out after 0s waiting for the door to open: still locked"
    assert next(polls) > 1  # it polled more than once before giving up
