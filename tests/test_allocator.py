"""The scripts restart once with glibc told to keep freed memory (src/allocator.py)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.allocator import ALLOCATOR_ENV

ROOT = Path(__file__).resolve().parents[1]
PROBE = ("import os; print('start', flush=True); "
         "from src.allocator import keep_freed_memory; keep_freed_memory(); "
         "print(os.environ.get('MALLOC_TRIM_THRESHOLD_'), os.environ.get('MALLOC_MMAP_THRESHOLD_'))")


def _run(**env_changes):
    env = {k: v for k, v in os.environ.items() if k not in ALLOCATOR_ENV}
    env.update(env_changes)
    out = subprocess.run([sys.executable, "-c", PROBE.format(root=str(ROOT))], env=env, capture_output=True,
                         text=True, check=True, timeout=60)
    return out.stdout.split("\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_restarts_once_with_the_variables_set():
    lines = _run()
    # the command ran twice (once before the restart), and the second run had the variables
    assert lines[:3] == ["start", "start", f"{ALLOCATOR_ENV['MALLOC_TRIM_THRESHOLD_']} {ALLOCATOR_ENV['MALLOC_MMAP_THRESHOLD_']}"]


def test_no_restart_when_set_or_turned_off():
    assert _run(**ALLOCATOR_ENV)[:2] == ["start", "1000000000000 1000000000000"]
    assert _run(CAI_KEEP_FREED_MEMORY="0")[:2] == ["start", "None None"]
