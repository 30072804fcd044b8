"""The default thread count follows the load (see fedhet/threads.py for the measurement behind it)."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from fedhet import threads


@pytest.mark.parametrize(("load", "expected"), [(0.1, 2), (0.9, 1), (1.4, 1), (3.0, 1)])
def test_the_default_uses_the_idle_cores(monkeypatch: pytest.MonkeyPatch, load: float, expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: {0, 1})
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert threads.idle_cores() == expected


def test_a_configured_count_is_used_and_zero_is_chosen_and_said(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "idle_cores", lambda: 1)
    try:
        with caplog.at_level(logging.INFO, logger="fedhet.threads"):
            assert threads.use_threads(0, "sim.threads") == 1 and torch.get_num_threads() == 1
            assert "sim.threads=0: 1 torch threads" in caplog.text
            assert threads.use_threads(2, "sim.threads") == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
