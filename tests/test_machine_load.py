"""Other processes' CPU load (ssd.engine.machine_load): read from /proc, measured against real busy processes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ssd.demo import fit_threads_to_free_cpus
from ssd.engine import machine_load

pytestmark = [
    pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="reads Linux's /proc"),
    # the other test workers would be the strangers these tests measure: scripts/test.sh runs them alone after
    pytest.mark.skipif(bool(os.environ.get("PYTEST_XDIST_WORKER")), reason="needs the machine to itself"),
]

SPIN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"


def spin_orphan(seconds: float) -> None:
    """A busy loop for ``seconds`` in a process that is not ours (its parent exits at once: init adopts it)."""
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {SPIN.format(seconds=seconds)!r}])"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_busy_child_is_our_own_load_and_a_busy_stranger_is_not():
    child = subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=1.5)])
    load = machine_load.OtherLoad()
    time.sleep(1.0)
    ours = load.sample()
    child.wait()
    spin_orphan(1.5)
    time.sleep(0.2)  # the stranger has started
    load.sample()
    time.sleep(1.0)
    stranger = load.sample()
    assert ours is not None and stranger is not None
    assert ours < 0.5 <= stranger <= load.cpus + 0.1  # one busy CPU, give or take the scheduler


def test_the_warning_names_the_busy_cpus_once_and_not_when_the_threads_fit(caplog):
    busy = machine_load.BusyMachine()
    spin_orphan(3.5)
    time.sleep(0.2)
    busy.load.sample()
    with caplog.at_level(logging.WARNING, logger="ssd.train"):
        time.sleep(0.8)
        busy.check(50, busy.load.cpus - 1)  # room for the run's threads beside the busy CPU: nothing to say
        assert caplog.records == []
        for _ in range(2):
            time.sleep(0.8)
            busy.check(50, 2)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) <= 1
    if os.cpu_count() == 2:  # the developers' machines; elsewhere 2 threads may fit beside one busy CPU
        assert (
            len(warnings) == 1 and "CPUs busy over the last 50 iterations, beside this run's 2 threads" in warnings[0]
        )
        assert "The result will be the same, only later" in warnings[0]


def test_the_demo_trains_with_the_free_cpus_unless_omp_num_threads_chooses(monkeypatch, caplog):
    threads = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spin_orphan(1.5)
    time.sleep(0.2)
    try:
        with caplog.at_level(logging.WARNING, logger="ssd.demo"):
            fit_threads_to_free_cpus()
        assert torch.get_num_threads() == min(threads, machine_load.OtherLoad().cpus - 1)  # one CPU taken
        assert (torch.get_num_threads() < threads) == bool(caplog.records)
        monkeypatch.setenv("OMP_NUM_THREADS", str(threads))
        torch.set_num_threads(threads)
        time.sleep(0.2)
        fit_threads_to_free_cpus()  # the user's choice stands
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
