"""Preemption: SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) stop the run at a step boundary, which then checkpoints and exits
with PREEMPTED_EXIT_CODE (the sbatch templates requeue the job on it); a second Ctrl-C stops at once."""

from __future__ import annotations

import logging

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - the sbatch templates requeue the job on it

log = logging.getLogger("llmopt")


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) / SIGINT (Ctrl-C) ask the loop to stop at the next
    step boundary; the run then checkpoints and exits with PREEMPTED_EXIT_CODE. A second SIGINT raises
    KeyboardInterrupt at once (nothing more is written)."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        import signal
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.received == "SIGINT":
            raise KeyboardInterrupt
        self.received = name
        at_once = " (Ctrl-C again to stop at once, without it)" if name == "SIGINT" else ""
        log.warning("received %s: stopping after the current step to checkpoint%s", name, at_once)

    def install(self) -> None:
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        self.received = None  # a new run in this process (a sweep) starts unstopped
        for name in self.SIGNALS:
            if hasattr(signal, name):
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)

    def uninstall(self) -> None:
        import signal
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()


stop_signal = StopSignal()
