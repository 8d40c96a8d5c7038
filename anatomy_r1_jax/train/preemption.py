"""Stopping a run cleanly: SIGTERM / SIGINT end it after the step in flight, with a checkpoint of that
step on every host, and every deliberate stop ends in one line and a documented exit code.

Schedulers stop jobs with SIGTERM (SLURM at the time limit with `--signal`, GCE / GKE with a
preemption notice about 30 s ahead), a multi-host job on every host at once. The handler only
records the request; the loop asks `StopSignals.should_stop(step)` at each step boundary:
  one process:  whether a signal arrived;
  several:      `multihost_utils.reached_preemption_sync_point(step)`: jax's preemption service
                (on by default with `jax.distributed`; its C++ notifier owns SIGTERM, so this
                module leaves SIGTERM to it) spreads a notice one host got to all and names the
                same step to every host (the largest step any host reached, plus one).
SIGINT is handed to that notifier as a SIGTERM of this process, so Ctrl-C stops every host alike.
A second signal while the checkpoint is written only sets the flag again: nothing is interrupted.

Exit codes (train.py): 0 finished; EXIT_STOPPED (75, sysexits' EX_TEMPFAIL: "try again") stopped
by a signal after saving, run the same command to resume; EXIT_NO_CHECKPOINT (2) checkpoints exist
but none restores; 1 any other stop (disk full, an unreadable image under data.on_error=raise,
too many non-finite updates in a row), each with one line saying what.
"""

from __future__ import annotations

import os
import signal

import jax
from jax.experimental import multihost_utils

EXIT_STOPPED = 75
EXIT_NO_CHECKPOINT = 2
EXIT_ERROR = 1


class RunStopped(Exception):
    """A deliberate end of the run: `str(self)` is the one line to log, `exit_code` the process's."""

    def __init__(self, message: str, exit_code: int = EXIT_ERROR):
        super().__init__(message)
        self.exit_code = exit_code


class StopSignals:
    """SIGTERM / SIGINT -> a stop at the next step boundary (see the module docstring). Use as a
    context manager around the loop; the previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: str | None = None  # the first signal's name
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        for sig in self.SIGNALS:
            if sig == signal.SIGTERM and self.distributed:
                continue  # jax's preemption notifier handles it on every host
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def distributed(self) -> bool:
        return jax.process_count() > 1

    def _handle(self, signum, frame) -> None:
        del frame
        first = self.received is None
        self.received = self.received or signal.Signals(signum).name
        if first and self.distributed:  # SIGINT: tell the other hosts through jax's notifier
            os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, step: int) -> bool:
        """Whether the run stops after step `step` (the same answer on every host). Call it at
        every step, on every host, with increasing steps."""
        if self.distributed:
            stop = multihost_utils.reached_preemption_sync_point(step)
            if stop and self.received is None:
                self.received = "SIGTERM"  # on this host or another one
            return stop
        return self.received is not None
