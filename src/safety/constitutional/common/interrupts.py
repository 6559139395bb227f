"""Ctrl-C during training: finish the current step, save a checkpoint, then stop.

A KeyboardInterrupt raised in the middle of a step would leave half-updated weights (PPO updates
several mini-batches per step) and advanced random states, so a checkpoint written from there would
not resume exactly. Instead the first SIGINT only sets a flag; the training loops look at it at each
step boundary (`should_stop`), write a checkpoint and raise KeyboardInterrupt. A second Ctrl-C
raises at once (nothing is saved then; the previous checkpoint is still intact).
"""
from __future__ import annotations

import logging
import signal
import threading

from . import distributed as ddp

log = logging.getLogger(__name__)


class GracefulInterrupt:
    """`with GracefulInterrupt() as stop: ... if stop.should_stop(): save(); raise KeyboardInterrupt`."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> "GracefulInterrupt":
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def install(self) -> "GracefulInterrupt":
        # signal handlers can only be installed from the main thread; elsewhere Ctrl-C acts as usual
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._handle)
        return self

    def restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.warning("interrupt: finishing this step, then saving a checkpoint and stopping "
                    "(Ctrl-C again to quit at once without saving)")

    def should_stop(self) -> bool:
        """True if any rank was interrupted (an all-reduce under torchrun, so all ranks stop together)."""
        return not ddp.all_true(not self.requested)


def interrupted(stage: str, step: int, where) -> KeyboardInterrupt:
    return KeyboardInterrupt(f"{stage} interrupted after step {step}; checkpoint saved in {where}: "
                             "rerun with resume to continue")
