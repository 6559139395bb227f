"""Keep freed memory in the process (glibc): no page faults re-mapping the same blocks every step.

glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB: logits, the tied
embedding's gradient, under bf16 autocast every weight cast) with fresh mmaps and unmaps them when
freed, so every training step faults the same pages in again. Measured on a 2-vCPU VM: 20 s of
system time in a 70.8 s fp32 PPO iteration of the default model; a bf16 PPO iteration went from
35.6 s to 28.8 s (docs/performance.md). Telling glibc to keep freed memory (`MALLOC_MMAP_THRESHOLD_`,
`MALLOC_TRIM_THRESHOLD_`) removes that; the cost is that RSS stays at its high-water mark.

The variables must be in the environment when the process starts: setting them later through
`mallopt` was measured to take effect unreliably. So the scripts call `keep_freed_memory()` first
thing, which re-executes the same command once with them set. This module imports nothing heavy, so
the restart costs milliseconds. Code that imports the toolkit into its own process can export the
two variables itself. CAI_KEEP_FREED_MEMORY=0 turns this off.
"""
from __future__ import annotations

import os
import platform
import sys

ALLOCATOR_ENV = {"MALLOC_MMAP_THRESHOLD_": "1000000000000", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}


def freed_memory_kept() -> bool:
    """Did this process start with glibc told to keep freed memory?"""
    return all(os.environ.get(key) for key in ALLOCATOR_ENV)


def keep_freed_memory() -> bool:
    """Re-execute this process with `ALLOCATOR_ENV` unless it is already set (glibc Linux only).

    Returns False where nothing is to be done (already set, turned off, not glibc); never returns
    when it restarts the process.
    """
    if os.environ.get("CAI_KEEP_FREED_MEMORY", "1") == "0":
        return False
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    if freed_memory_kept():
        return False
    argv = list(getattr(sys, "orig_argv", []))
    if len(argv) < 2:
        return False  # an interactive or embedded interpreter: no command line to repeat
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], {**os.environ, **ALLOCATOR_ENV})
    return True  # not reached


__all__ = ["ALLOCATOR_ENV", "freed_memory_kept", "keep_freed_memory"]
