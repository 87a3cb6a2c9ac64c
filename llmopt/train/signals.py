"""Preemption: SIGTERM / SIGUSR1 stop the run at a step boundary, which then checkpoints and exits with
PREEMPTED_EXIT_CODE (the sbatch templates requeue the job on it)."""

from __future__ import annotations

import logging

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - the sbatch templates requeue the job on it

log = logging.getLogger("llmopt")


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's warning before the time limit) ask the loop to stop at the next step
    boundary; the run then checkpoints and exits with PREEMPTED_EXIT_CODE."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self):
        self.received: str | None = None
        self._previous: dict = {}

    def requested(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        import signal
        self.received = signal.Signals(signum).name
        log.warning("received %s: stopping after the current step to checkpoint", self.received)

    def install(self) -> None:
        import signal
        import threading
        if threading.current_thread() is not threading.main_thread():
            return
        for name in self.SIGNALS:
            if hasattr(signal, name):
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)

    def uninstall(self) -> None:
        import signal
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous.clear()


stop_signal = StopSignal()
