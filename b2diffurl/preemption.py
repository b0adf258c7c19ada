"""Stopping a run on SIGTERM / SIGINT within a bounded time, without losing finished work.

Schedulers send SIGTERM before they kill a job; a user presses Ctrl-C (SIGINT). Both only *request* a stop:
the trainer and the algorithms poll :attr:`StopSignal.requested` (through ``RunContext.check_stop``) between
sampling batches and optimizer steps, save, and exit with :data:`EXIT_INTERRUPTED`. Two things bound the
time to exit when a poll never comes (a reward that blocks, a very long step):

* a watchdog: ``timeout_s`` after the first signal the process exits with :data:`EXIT_INTERRUPTED` without
  saving — every file is written atomically, so the last checkpoint stays intact and resumable;
* a second SIGINT raises :class:`KeyboardInterrupt` at once (the user insists).
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger("b2diffurl.preemption")

# EX_TEMPFAIL from sysexits.h: "try again later". Requeue-on-failure schedulers requeue the job, and
# `b2diffurl train --resume DIR` continues it.
EXIT_INTERRUPTED = 75


class StopSignal:
    """``with StopSignal(timeout_s) as stop: ... stop.requested ...`` — handlers for SIGTERM and SIGINT while
    the block runs (only in the main thread: elsewhere Python allows no handlers and nothing is installed)."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.requested = False
        self._previous: dict[int, object] = {}
        self._watchdog: threading.Timer | None = None

    def _handle(self, signum, frame):  # noqa: ARG002
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt(f"second {name}: stopping without saving")
        if self.requested:
            return
        self.requested = True
        log.warning(
            "%s: saving at the next sampling batch or optimizer step, then exiting (at most %.0f s; "
            "Ctrl-C again to stop at once)",
            name,
            self.timeout_s,
        )
        self._watchdog = threading.Timer(self.timeout_s, self._expire, args=(name,))
        self._watchdog.daemon = True
        self._watchdog.start()

    def _expire(self, name: str) -> None:
        log.error(
            "%s: no safe stopping point within stop_timeout_s=%.0f s; exiting without saving "
            "(the last checkpoint is intact: resume from it)",
            name,
            self.timeout_s,
        )
        logging.shutdown()
        os._exit(EXIT_INTERRUPTED)

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
