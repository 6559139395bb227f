"""Adaptive CPU threads (src/models/threads.py): the governor's arithmetic on given tick counts, the
real /proc readings with a real competing process, and the fixed and adaptive modes."""
import os
import subprocess
import sys
import time

import pytest
import torch

from src.models import threads as th


@pytest.fixture()
def restore_threads():
    before, governor = torch.get_num_threads(), th._governor
    yield
    torch.set_num_threads(before)
    th._governor = governor


class Fake:
    """A clock and tick counters the test moves by hand."""

    def __init__(self):
        self.t, self.busy, self.own = 0.0, 0, 0

    def ticks(self):
        return self.busy, self.own

    def clock(self):
        return self.t

    def advance(self, seconds, own_cores, other_cores, tick):
        self.t += seconds
        self.own += round(own_cores * seconds * tick)
        self.busy += round((own_cores + other_cores) * seconds * tick)


def test_governor_follows_the_cores_others_use(restore_threads):
    fake = Fake()
    g = th.ThreadGovernor(max_threads=4, interval=2.0, ticks=fake.ticks, clock=fake.clock)
    tick = g._tick
    assert g.threads == 4 and torch.get_num_threads() == 4
    fake.advance(1.0, own_cores=4, other_cores=3, tick=tick)
    assert g.update() == 4  # within the interval: nothing re-measured
    fake.advance(1.0, own_cores=1, other_cores=3, tick=tick)
    assert g.update() == 1 and torch.get_num_threads() == 1 and g.others == pytest.approx(3.0)
    fake.advance(2.0, own_cores=1, other_cores=1.4, tick=tick)  # 2.6 cores free: round -> 3
    assert g.update() == 3 and torch.get_num_threads() == 3
    fake.advance(2.0, own_cores=3, other_cores=0.0, tick=tick)
    assert g.update() == 4
    fake.advance(2.0, own_cores=4, other_cores=9.0, tick=tick)  # never below one thread
    assert g.update() == 1
    # someone sets the count by hand: the governor stands down and never touches it again
    torch.set_num_threads(2)
    fake.advance(2.0, own_cores=2, other_cores=0.0, tick=tick)
    assert g.update() == 2 and not g.active
    fake.advance(2.0, own_cores=2, other_cores=0.0, tick=tick)
    assert g.update() == 2 and torch.get_num_threads() == 2


def test_configure_threads_fixed_auto_and_bad_values(restore_threads, monkeypatch):
    monkeypatch.setenv("CAI_NUM_THREADS", "1")
    assert th.configure_threads() == 1 and th.governor() is None
    assert th.adapt_threads() == 1
    monkeypatch.setenv("CAI_NUM_THREADS", "auto")
    th.configure_threads()
    assert th.governor() is not None and th.governor().max_threads == th.available_cpus()
    assert th.configure_threads(2) == 2 and th.governor() is None  # an explicit number wins over the variable
    monkeypatch.setenv("CAI_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="CAI_NUM_THREADS"):
        th.configure_threads()


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads /proc (Linux)")
def test_proc_readings_see_a_competing_process(restore_threads):
    g = th.ThreadGovernor(interval=0.0)
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        g.update()  # starts a window with the competitor running
        time.sleep(1.5)
        g.update()
    finally:
        spin.kill()
        spin.wait()
    # one busy process is about one core (more if the machine has other load; never much less)
    assert g.others >= 0.7, g.others
    assert g.threads == min(g.max_threads, max(1, round(g.max_threads - g.others)))
    if g.max_threads >= 2:
        assert g.threads < g.max_threads
