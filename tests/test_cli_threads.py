"""The CLI's torch thread choice: explicit flag, then OMP_NUM_THREADS, then the cores left idle by the load."""

from __future__ import annotations

import os

import pytest

from b2diffurl import cli


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)


@pytest.mark.parametrize(("load", "want"), [(0.0, 2), (0.4, 2), (0.6, 1), (1.0, 1), (7.5, 1)])
def test_idle_cores_from_the_load_average(two_cores, monkeypatch, load, want):  # noqa: ARG001
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))
    assert cli.choose_threads(None) == want


def test_explicit_and_environment_win(two_cores, monkeypatch):  # noqa: ARG001
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    assert cli.choose_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert cli.choose_threads(None) is None  # torch already honours the variable
    with pytest.raises(cli.UsageError, match="--threads must be >= 1"):
        cli.choose_threads(0)


def test_train_logs_the_thread_count_it_runs_with(caplog):
    """``train`` says how many torch threads it got before any work (here: a config error right after)."""
    import logging

    import torch

    before = torch.get_num_threads()
    caplog.set_level(logging.INFO, logger="b2diffurl.cli")
    try:
        assert cli.main(["--threads", "1", "train", "--set", "stages=-1"]) == 2  # refused: one-line error
    finally:
        torch.set_num_threads(before)
    assert "torch CPU threads: 1" in caplog.text
