"""One run per directory, and checkpoints pruned by their own run: the run-directory lock (llmopt.train.lock) and
the checkpoint directory's ownership (Checkpointer.claim, pruning by write order), each with a real trainer run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmopt.train.checkpoint import Checkpointer
from llmopt.train.lock import LOCK_NAME, DirectoryLocked, RunLock
from tests.helpers.train import C4_SMALL, run_cli, run_in_process


def _ended_pid() -> int:
    """The pid of a process that has ended (not reused this soon)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _write_lock(directory: Path, **holder) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": None,
                                "started": time.time(), **holder}))
    return path


# ---- the lock -------------------------------------------------------------------------------------------------
def test_a_live_lock_refuses_a_second_run_and_is_released(tmp_path):
    with RunLock(tmp_path, "run directory") as lock:
        held = json.loads(lock.path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
        with pytest.raises(DirectoryLocked, match=rf"run directory {tmp_path} is in use by another run \(pid "
                                                  rf"{os.getpid()} on {socket.gethostname()}"):
            RunLock(tmp_path, "run directory").acquire()
    assert not lock.path.exists()
    RunLock(tmp_path, "run directory").acquire().release()  # free again


def test_stale_locks_are_taken_over(tmp_path, monkeypatch):
    # this host, a process that has ended
    _write_lock(tmp_path / "a", pid=_ended_pid())
    RunLock(tmp_path / "a", "run directory").acquire().release()
    # a requeued SLURM job: the lock of its earlier run names the same job (its pid may even be alive here)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "b", pid=sleeper.pid, slurm_job="4242")
        with pytest.raises(DirectoryLocked, match="SLURM job 4242"):
            RunLock(tmp_path / "b", "run directory").acquire()  # not this job: refused
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        RunLock(tmp_path / "b", "run directory").acquire().release()
    finally:
        sleeper.kill()
        sleeper.wait()
    # another host: judged by its age only
    path = _write_lock(tmp_path / "c", host="elsewhere-node", pid=1)
    with pytest.raises(DirectoryLocked, match="pid 1 on elsewhere-node"):
        RunLock(tmp_path / "c", "run directory").acquire()
    old = time.time() - 700
    os.utime(path, (old, old))
    RunLock(tmp_path / "c", "run directory").acquire().release()


def test_the_holder_keeps_its_lock_fresh(tmp_path):
    lock = RunLock(tmp_path, "run directory", refresh_s=0.05).acquire()
    try:
        old = time.time() - 500
        os.utime(lock.path, (old, old))
        deadline = time.monotonic() + 10
        while lock.path.stat().st_mtime < time.time() - 60 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock.path.stat().st_mtime > time.time() - 60
    finally:
        lock.release()


def test_a_second_run_in_a_locked_directory_is_refused_and_removes_nothing(tmp_path):
    """The CLI: one line, exit 2, and the other run's directory (not yet past its first step) left as it is."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        run_dir = tmp_path / "shared_run"
        _write_lock(run_dir, pid=sleeper.pid)
        (run_dir / "metrics.jsonl").write_text("")
        out = run_cli([*C4_SMALL, "trainer.steps=2", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
        assert f"the run directory {run_dir} is in use by another run (pid {sleeper.pid}" in out.stderr
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK_NAME, "metrics.jsonl"]
        # the checkpoint directory is locked the same way
        ckpt_dir = tmp_path / "shared_ckpt"
        _write_lock(ckpt_dir, pid=sleeper.pid)
        out = run_cli([*C4_SMALL, "trainer.steps=2", f"checkpoint.dir={ckpt_dir}", f"hydra.run.dir={tmp_path / 'b'}"],
                      cwd=tmp_path)
        assert out.returncode == 2 and f"the checkpoint directory {ckpt_dir} is in use" in out.stderr, out.stderr
        assert not (tmp_path / "b").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# ---- checkpoints of one run, and of others ----------------------------------------------------------------------
def _fake_checkpoint(directory: Path, name: str, run_id: str | None, written_at: float) -> Path:
    path = directory / name
    path.mkdir(parents=True)
    manifest = {"step": int(name[5:13]), "files": {}, "written_at": written_at}
    if run_id is not None:
        manifest["run_id"] = run_id
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_claim_continues_a_run_or_starts_a_new_one(tmp_path):
    old, new = "a" * 12, "b" * 12
    s2 = _fake_checkpoint(tmp_path, "step_00000002", old, 100.0)
    s4 = _fake_checkpoint(tmp_path, "step_00000004", old, 200.0)

    def claimed(resume_from, continue_run, **kw):
        checkpointer = Checkpointer(tmp_path, accelerator=None, run_id=new, **kw)
        checkpointer.claim(resume_from, continue_run)
        return checkpointer

    assert claimed(s4, continue_run=True).run_id == old          # resume=auto
    assert claimed(s4, continue_run=False).run_id == old         # a path to that run's newest checkpoint
    with pytest.raises(ValueError, match=rf"holds 2 checkpoint\(s\) of another run \(run id\(s\) {old}"):
        claimed(None, continue_run=False)                        # a fresh start
    with pytest.raises(ValueError, match="checkpoint.allow_other_runs=true"):
        claimed(s2, continue_run=False)                          # a branch from an older checkpoint
    branch = claimed(s2, continue_run=False, allow_other_runs=True)
    assert branch.run_id == new and branch.own_ids == {new}
    # checkpoints written before run ids: the run that resumes one of them owns them
    legacy = tmp_path / "legacy"
    l2 = _fake_checkpoint(legacy, "step_00000002", None, 100.0)
    checkpointer = Checkpointer(legacy, accelerator=None, run_id=new)
    checkpointer.claim(l2, continue_run=True)
    assert checkpointer.own_ids == {new, None}


def test_pruning_keeps_the_runs_own_newest_writes(tmp_path):
    """The newest writes, not the highest steps, and only this run's: a run started in a directory holding another
    run's later steps keeps its own checkpoints and leaves the other's."""
    mine, other = "c" * 12, "d" * 12
    for step, when in ((10, 1.0), (20, 2.0), (30, 3.0)):
        _fake_checkpoint(tmp_path, f"step_{step:08d}", other, when)
    for step, when in ((2, 4.0), (4, 5.0), (6, 6.0)):
        _fake_checkpoint(tmp_path, f"step_{step:08d}", mine, when)
    checkpointer = Checkpointer(tmp_path, accelerator=None, keep=2, run_id=mine, allow_other_runs=True)
    checkpointer._prune()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step_00000004", "step_00000006", "step_00000010", "step_00000020", "step_00000030"]
    assert [p.name for p in checkpointer.checkpoints()][-1] == "step_00000006"  # the newest write: resume=auto's


def test_runs_sharing_a_checkpoint_dir(tmp_path):
    """Real runs: a fresh start into another run's checkpoint.dir is refused before anything is written; allowed,
    a branch writes its own checkpoints (its step 4 beside the first run's) and prunes only those."""
    ckpt = tmp_path / "ckpt"
    base = [*C4_SMALL, "trainer.steps=6", "checkpoint.every=2", "checkpoint.keep=3", f"checkpoint.dir={ckpt}"]
    run_in_process(tmp_path, [*base, "checkpoint.resume=none"], name="first")
    first = {p.name: Checkpointer.written_by(p) for p in ckpt.iterdir()}
    assert sorted(first) == ["step_00000002", "step_00000004", "step_00000006"] and len(set(first.values())) == 1
    with pytest.raises(ValueError, match="holds 3 checkpoint.*of another run"):
        run_in_process(tmp_path, [*base, "checkpoint.resume=none"], name="fresh")
    assert not (tmp_path / "fresh").exists()
    summary, _ = run_in_process(tmp_path, [*base, "checkpoint.keep=1", "checkpoint.allow_other_runs=true",
                                           f"checkpoint.resume={ckpt / 'step_00000002'}"], name="branch")
    assert summary["step"] == 6
    now = {p.name: Checkpointer.written_by(p) for p in ckpt.iterdir()}
    (branch_id,) = set(now.values()) - set(first.values())
    assert {k: v for k, v in now.items() if v != branch_id} == first  # the first run's checkpoints untouched
    assert [k for k, v in now.items() if v == branch_id] == [f"step_00000006-{branch_id}"]  # keep=1, its newest


def test_a_checkpoint_dir_that_is_the_run_dir_is_locked_once(tmp_path):
    summary, run_dir = run_in_process(tmp_path, [*C4_SMALL, "trainer.steps=2", f"checkpoint.dir={tmp_path / 'run'}"])
    assert summary["step"] == 2 and (run_dir / "step_00000002").is_dir() and not (run_dir / LOCK_NAME).exists()
