"""How busy the machine is with other work: the CPU time other processes used, read from Linux's /proc.

Two trainings sharing 2 cores do not run at half speed each but several times slower: the threads of a
parallel region wait for the slowest, and a thread that shares its core with another process is slow.
The training log warns once when it sees this (:class:`BusyMachine`); ``ssd demo`` trains with as many
threads as cores are free (:func:`free_cpus`). Where /proc is missing (macOS, Windows) both do nothing.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("ssd.train")

# other processes using more than this share of all CPUs over a log window: the run is slowed
BUSY_SHARE = 0.25


def _busy_ticks() -> int | None:
    """The machine's busy CPU time (clock ticks, all CPUs, steal included) since boot; None without /proc."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)


def _process_ticks(stat: str) -> tuple[int, int]:
    """``(ppid, utime + stime)`` of one /proc/PID/stat line (the name in parentheses may hold spaces)."""
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[11]) + int(fields[12])


def _own_ticks() -> int:
    """CPU time of this process and its live children (data-loader workers), in clock ticks."""
    pid, total = os.getpid(), 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid, ticks = _process_ticks((entry / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue  # ended meanwhile
        if int(entry.name) == pid or ppid == pid:
            total += ticks
    return total


class OtherLoad:
    """CPUs kept busy by other processes between two :meth:`sample` calls (0.0 = none, 2.0 = two CPUs)."""

    def __init__(self) -> None:
        self.cpus = os.cpu_count() or 1
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.last = self._read()

    def _read(self) -> tuple[float, int, int] | None:
        busy = _busy_ticks()
        return None if busy is None else (time.perf_counter(), busy, _own_ticks())

    def sample(self) -> float | None:
        """Other processes' busy CPUs since the last sample; None where /proc cannot tell."""
        now, last = self._read(), self.last
        self.last = now
        if now is None or last is None or now[0] - last[0] <= 0:
            return None
        others = (now[1] - last[1]) - (now[2] - last[2])
        return max(0.0, others / self.hz / (now[0] - last[0]))


def free_cpus(seconds: float = 0.5) -> tuple[int, float | None]:
    """``(CPUs not kept busy by other processes, their busy CPUs)`` over ``seconds``; all CPUs where
    /proc cannot tell."""
    load = OtherLoad()
    time.sleep(seconds)
    busy = load.sample()
    if busy is None:
        return load.cpus, None
    return max(1, load.cpus - round(busy)), busy


class BusyMachine:
    """Warns once when, over a log window, other processes used more than :data:`BUSY_SHARE` of the CPUs
    and left fewer free than the run has threads."""

    def __init__(self) -> None:
        self.load = OtherLoad()
        self.warned = False

    def check(self, iterations: int, threads: int) -> None:
        busy = self.load.sample()
        if self.warned or busy is None or busy <= BUSY_SHARE * self.load.cpus:
            return
        if busy + threads <= self.load.cpus + 0.5:  # the run's threads fit beside the others
            return
        self.warned = True
        log.warning(
            "other processes kept %.1f of this machine's %d CPUs busy over the last %d iterations, beside this "
            "run's %d threads: threads that wait for each other slow down several-fold. The result will be the "
            "same, only later (train alone, or set OMP_NUM_THREADS to the free cores)",
            busy,
            self.load.cpus,
            iterations,
            threads,
        )
