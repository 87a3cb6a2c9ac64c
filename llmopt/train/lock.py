"""One run at a time in a run or checkpoint directory: a lock file that says who holds it.

Two runs writing into one directory interleave metrics.jsonl and overwrite each other's checkpoints. A run takes
`<dir>/.llmopt.lock` (created exclusively: O_CREAT | O_EXCL) holding its host, pid, SLURM job id and start time,
keeps its modification time fresh from a background thread, and removes it when it ends. A lock left by a run
that died without removing it is stale, and is taken over, when
  - it names this host and a pid that no longer runs, or
  - it names this SLURM job (a requeued job: SLURM starts it again only after the earlier one ended), or
  - it has not been refreshed for `stale_after_s` (a process on another host that died).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

LOCK_NAME = ".llmopt.lock"
REFRESH_S = 60.0
STALE_AFTER_S = 600.0


class DirectoryLocked(RuntimeError):
    """Another live run holds `directory`."""

    def __init__(self, message: str, directory: Path):
        super().__init__(message)
        self.directory = Path(directory)


class DirectoryNotWritable(DirectoryLocked):
    """`directory` cannot be created or written (read-only, no permission): found before the first step, where the
    lock is taken, not at the first checkpoint."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunLock:
    """The lock on one directory (see the module docstring); `release()` (or the context manager) removes it."""

    def __init__(self, directory: str | Path, what: str, stale_after_s: float = STALE_AFTER_S,
                 refresh_s: float = REFRESH_S):
        self.path = Path(directory) / LOCK_NAME
        self.what = what  # "run directory" / "checkpoint directory", for the messages
        self.stale_after_s, self.refresh_s = stale_after_s, refresh_s
        self.holder = {"host": socket.gethostname(), "pid": os.getpid(),
                       "slurm_job": os.environ.get("SLURM_JOB_ID"), "started": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        try:
            return self._acquire()
        except (DirectoryLocked, FileExistsError):
            raise
        except OSError as err:
            raise DirectoryNotWritable(
                f"cannot write in the {self.what} {self.path.parent} ({err.strerror}): choose a writable one "
                f"({'checkpoint.dir' if 'checkpoint' in self.what else 'output_root or hydra.run.dir'})",
                self.path.parent) from None

    def _acquire(self) -> RunLock:
        self._made_dir = not self.path.parent.exists()  # removed again on release if the run left it empty
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a stale lock removed, then created again; a race with another taker loses cleanly
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                why = self._stale(other)
                if why is None:
                    raise DirectoryLocked(self._refusal(other), self.path.parent) from None
                self.path.unlink(missing_ok=True)  # stale: taken over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.holder, f)
            self._thread = threading.Thread(target=self._refresh, daemon=True, name="llmopt-lock")
            self._thread.start()
            return self
        raise DirectoryLocked(self._refusal(self._read()), self.path.parent)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            other = self._read()
            if (other.get("host"), other.get("pid")) == (self.holder["host"], self.holder["pid"]):
                self.path.unlink(missing_ok=True)
            if self._made_dir and self.path.parent.is_dir() and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- internals ------------------------------------------------------------------------------------------
    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text()) | {"age_s": time.time() - self.path.stat().st_mtime}
        except (OSError, ValueError):
            return {}  # gone, or being written: judged by its age once it is readable

    def _stale(self, other: dict) -> str | None:
        """Why the lock `other` is stale, or None if its run may still be running."""
        if not other:
            return "unreadable" if not self.path.exists() else None
        mine = self.holder
        if other.get("host") == mine["host"] and not _pid_alive(int(other.get("pid", -1))):
            return "its process has ended"
        if mine["slurm_job"] and other.get("slurm_job") == mine["slurm_job"] and other.get("pid") != mine["pid"]:
            return "an earlier run of this SLURM job"
        if other.get("age_s", 0.0) > self.stale_after_s:
            return f"not refreshed for {other['age_s']:.0f} s"
        return None

    def _refusal(self, other: dict) -> str:
        who = (f"pid {other.get('pid')} on {other.get('host')}"
               + (f" (SLURM job {other['slurm_job']})" if other.get("slurm_job") else "")) if other else "another run"
        return (f"the {self.what} {self.path.parent} is in use by another run ({who}; lock file {self.path}): two "
                f"runs in one directory would interleave their metrics and overwrite each other's checkpoints. Wait "
                f"for it to end, or give this run its own directory (hydra.run.dir=..., checkpoint.dir=...). If no "
                f"such run is alive, delete the lock file (it is also taken over once it is {self.stale_after_s:.0f} "
                f"s old)")

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                os.utime(self.path)
            except OSError:
                return
