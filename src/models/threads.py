"""CPU threads: as many as the cores other processes leave free, re-measured while the job runs.

Why not simply one thread per core: every torch op ends at an OpenMP barrier that waits for its
slowest thread, and libgomp's waiting threads spin. When another process takes one of two cores, one
of our two threads is descheduled for a whole time slice while the other spins at the barrier.
Measured on this project's 2-vCPU machine (a generation batch of 8 x 24 tokens plus a forward and
backward of SmolLM2-135M, median of 3, `/work` notes in docs/performance.md "Shared machines"):

    threads   alone    with one other single-threaded process
    2         4.6 s    17.7 s   (3.8x)
    1         5.9 s     6.0 s
    2, OMP_WAIT_POLICY=PASSIVE   6.6 s  7.1 s  (no spinning, but slower than 1 thread even alone)

So the best count is "the cores nobody else is using", which changes while a run lasts. In auto mode
(`configure_threads()` with no number and no $CAI_NUM_THREADS) a `ThreadGovernor` reads the
machine's busy time (/proc/stat) minus this process's own (/proc/self/stat) over the last few
seconds and sets torch's intra-op threads to round(free cores), between 1 and the cores this process
may use. The loops call `adapt_threads()` at natural boundaries (each generation batch, each optimiser
step); it costs a clock read unless `interval` seconds have passed. A fixed count ($CAI_NUM_THREADS=N
or `configure_threads(N)`) turns the governor off, and so does anyone else calling
`torch.set_num_threads` (the governor stands down rather than fight them).

The price: torch's fp32 reductions round differently at different thread counts (one PPO step of
the tiny test model: value loss 1.3805582746863365 with 1 thread, 1.380558155477047 with 2), so a
run whose thread count changed is reproducible only to rounding, and a run killed and resumed under
different load matches the uninterrupted one to rounding, not bit for bit. On a quiet machine the
count never changes and exact resume holds as before; for bitwise reproducibility under changing
load, fix the count with $CAI_NUM_THREADS=N (the test suite does).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional, Set

import torch

log = logging.getLogger(__name__)

__all__ = ["ThreadGovernor", "adapt_threads", "available_cpus", "configure_threads", "governor"]


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. under taskset or a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def _allowed_cpus() -> Optional[Set[int]]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def busy_jiffies(cpus: Optional[Set[int]] = None, stat: str = "/proc/stat") -> int:
    """Busy clock ticks since boot summed over `cpus` (all when None): everything but idle and iowait.

    Steal time counts as busy: on a VM it is a core someone else is using."""
    total = 0
    with open(stat) as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *values = line.split()
            if name == "cpu" or (cpus is not None and int(name[3:]) not in cpus):
                continue
            ticks = [int(v) for v in values[:8]]
            total += sum(ticks) - ticks[3] - ticks[4]
    return total


def own_jiffies(stat: str = "/proc/self/stat") -> int:
    """This process's user + system clock ticks (all its threads)."""
    with open(stat) as f:
        text = f.read()
    fields = text[text.rindex(")") + 2:].split()  # the command name may contain spaces
    return int(fields[11]) + int(fields[12])


class ThreadGovernor:
    """Keeps torch's intra-op threads at the number of cores other processes leave free.

    `update()` is cheap to call often: it re-measures only when `interval` seconds have passed, over
    the window since the last measurement, and returns the current thread count.

    `ticks` (a function returning (machine busy ticks, own ticks)) and `clock` are for tests.
    """

    def __init__(self, max_threads: Optional[int] = None, interval: float = 2.0, ticks=None, clock=time.monotonic):
        self.cpus = _allowed_cpus()
        self.max_threads = max(1, max_threads or available_cpus())
        self.interval = interval
        self.threads = self.max_threads
        self.active = ticks is not None or (os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat"))
        self.others = 0.0  # cores other processes used over the last window
        self._tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._ticks, self._clock = ticks or self._proc_ticks, clock
        self._mark = (clock(), *self._ticks()) if self.active else None
        torch.set_num_threads(self.threads)

    def _proc_ticks(self):
        return busy_jiffies(self.cpus), own_jiffies()

    def update(self) -> int:
        if not self.active:
            return torch.get_num_threads()
        if torch.get_num_threads() != self.threads:  # someone chose a count by hand: theirs wins
            log.info("torch threads set to %d by other code: adaptive threads off", torch.get_num_threads())
            self.active = False
            return torch.get_num_threads()
        t = self._clock()
        if t - self._mark[0] < self.interval:  # the common case: one clock read
            return self.threads
        busy, own = self._ticks()
        t0, busy0, own0 = self._mark
        self._mark = (t, busy, own)
        self.others = max(0.0, ((busy - busy0) - (own - own0)) / self._tick / (t - t0))
        want = min(self.max_threads, max(1, round(self.max_threads - self.others)))
        if want != self.threads:
            log.info("other processes use %.1f of %d cores: torch threads %d -> %d",
                     self.others, self.max_threads, self.threads, want)
            self.threads = want
            torch.set_num_threads(want)
        return self.threads


_governor: Optional[ThreadGovernor] = None


def governor() -> Optional[ThreadGovernor]:
    """The process's governor when threads are adaptive, else None."""
    return _governor


def configure_threads(num_threads: Optional[int] = None) -> int:
    """Set torch's CPU threads for this process: `num_threads`, else $CAI_NUM_THREADS, else adaptive.

    A positive number fixes the count. None with $CAI_NUM_THREADS unset, empty, 0 or "auto" starts
    the adaptive mode described above (one thread per available core while the machine is quiet).
    Returns the thread count now.
    """
    global _governor
    if num_threads is None:
        value = os.environ.get("CAI_NUM_THREADS", "").strip().lower()
        if value not in ("", "0", "auto") and not value.isdigit():
            raise ValueError(f"CAI_NUM_THREADS must be a positive integer or 'auto', got {value!r}")
        num_threads = int(value) if value.isdigit() else 0
    if num_threads > 0:
        _governor = None
        torch.set_num_threads(num_threads)
    else:
        _governor = ThreadGovernor()
    return torch.get_num_threads()


def adapt_threads() -> int:
    """At a step boundary: let the governor re-check the machine's load (no-op with a fixed count)."""
    return _governor.update() if _governor is not None else torch.get_num_threads()
