"""Checkpoints that resume exactly, and survive preemption and crashes.

Layout: <dir>/step_00001000/ with model.pt, optimizer.pt, trainer.pt (schedule, counters),
rank<r>.pt (each rank's data-loader position and RNG states) and manifest.json, written last, with
every file's size and CRC32. A checkpoint is written into a temporary directory and renamed into
place, so a process killed mid-write leaves the previous checkpoints untouched; on load the
manifest is checked and a truncated or corrupt checkpoint is skipped, with a warning, for the
previous one.

Each checkpoint's manifest names the run that wrote it (a run id, kept when a run resumes its own newest
checkpoint; a branch from an older one, or a fresh start, is a new run) and when. Pruning keeps the run's own
`keep` newest writes and never touches another run's; a checkpoint directory that holds another run's checkpoints
is refused unless checkpoint.allow_other_runs (see claim()).

Under DDP the replicas are identical, so rank 0 writes the model and optimizer; under FSDP every
rank writes its own shard (model_rank<r>.pt, optimizer_rank<r>.pt) and resumes at the same world size.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import shutil
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("llmopt")
# step_<8 digits>, or step_<8 digits>-<run id> where another run's checkpoint of that step is there already
STEP_DIR = re.compile(r"^step_(\d{8})(?:-[0-9a-f]{12})?$")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def crc32(path: Path, chunk: int = 1 << 24) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            value = zlib.crc32(block, value)
    return value


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    def __init__(self, directory: str | Path, accelerator, every: int = 0, keep: int = 2, sharded: bool = False,
                 identity: dict | None = None, allow_other_runs: bool = False, run_id: str | None = None):
        if every < 0 or keep < 1:
            raise ValueError(f"checkpoint.every must be >= 0 (0 = only at the end and on preemption) and "
                             f"checkpoint.keep >= 1, got every={every}, keep={keep}")
        self.directory = Path(directory)
        self.accelerator = accelerator
        self.every, self.keep, self.sharded = every, keep, sharded
        self.identity = identity  # the run's defining settings (run.run_identity): a resume must match them
        # where the run's records go ({"run_dir": ..., "wandb_id": ...}): a run resumed from a checkpoint continues them
        self.lineage: dict = {}
        self.allow_other_runs = allow_other_runs
        self.run_id = run_id or new_run_id()  # the same on every rank; claim() keeps the id of a run continued
        self.own_ids: set[str | None] = {self.run_id}  # + None: checkpoints written before run ids existed

    # -- writing -------------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def save(self, trainer) -> Path:
        acc = self.accelerator
        final = self.directory / f"step_{trainer.step:08d}"
        if final.exists() and self.written_by(final) not in self.own_ids:  # another run's (allow_other_runs)
            final = final.with_name(f"{final.name}-{self.run_id}")
        tmp = final.with_name(f".tmp_{final.name}")
        rank, main = acc.process_index, acc.is_main_process
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        model = acc.unwrap_model(trainer.model).lm  # the LlamaForCausalLM inside CausalLMLoss
        if self.sharded:
            torch.save(model.state_dict(), tmp / f"model_rank{rank}.pt")
            torch.save(trainer.raw_optimizer.state_dict(), tmp / f"optimizer_rank{rank}.pt")
        elif main:
            torch.save(model.state_dict(), tmp / "model.pt")
            torch.save(trainer.raw_optimizer.state_dict(), tmp / "optimizer.pt")
        tokens_seen = trainer.tokens_seen  # a collective-free read, on every rank
        torch.save({"data": trainer.data.train.state_dict(), "rng": rng_state()}, tmp / f"rank{rank}.pt")
        if main:
            torch.save({"step": trainer.step, "tokens_seen": tokens_seen, "skipped_steps": trainer.skipped_steps,
                        "scheduler": trainer.scheduler.state_dict(), "last_eval": trainer.last_eval,
                        "world_size": acc.num_processes, "identity": self.identity, "lineage": self.lineage},
                       tmp / "trainer.pt")
        acc.wait_for_everyone()
        if main:
            files = {p.name: {"size": p.stat().st_size, "crc32": crc32(p)} for p in sorted(tmp.iterdir())}
            (tmp / "manifest.json").write_text(json.dumps({"step": trainer.step, "run_id": self.run_id,
                                                           "written_at": time.time(), "files": files}, indent=1))
            _fsync_dir(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
        acc.wait_for_everyone()
        return final

    def _prune(self) -> None:
        """Delete this run's own checkpoints but the `keep` newest writes; another run's are not this run's to
        delete."""
        own = [p for p in self.checkpoints() if self.written_by(p) in self.own_ids]
        for old in own[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

    # -- ownership -----------------------------------------------------------------------------------
    def claim(self, resume_from: Path | None, continue_run: bool) -> None:
        """Decide which run this one is, before anything is written: the run of `resume_from` where it continues
        it (`continue_run`: checkpoint.resume=auto, or a path to that run's newest checkpoint), else a new one (a
        fresh start, or a branch from an older checkpoint). Then refuse a directory holding checkpoints of
        another run, unless allow_other_runs: pruning keeps each run's own, but resume=auto would pick the other
        run's newest write, and two runs' steps mix in one listing."""
        if resume_from is not None:
            previous = self.written_by(resume_from)
            later = [p for p in self._written_order(resume_from.parent)
                     if self.written_by(p) == previous and self._written_key(p) > self._written_key(resume_from)]
            if continue_run or not later:
                if previous is not None:
                    self.run_id = previous
                self.own_ids = {self.run_id, previous}
        others = [p for p in self.checkpoints() if self.written_by(p) not in self.own_ids]
        if others and not self.allow_other_runs:
            runs = sorted({str(self.written_by(p)) for p in others})
            raise ValueError(
                f"checkpoint.dir {self.directory} holds {len(others)} checkpoint(s) of another run (run id(s) "
                f"{', '.join(runs)}; {', '.join(p.name for p in others[:4])}{' ...' if len(others) > 4 else ''}). "
                f"This run would be a new one there (a fresh start, or a branch from an older checkpoint): give it its "
                f"own checkpoint.dir, continue that run with checkpoint.resume=auto, or set "
                f"checkpoint.allow_other_runs=true to write beside them (each run then prunes only its own)")

    @staticmethod
    def _manifest(path: Path) -> dict:
        try:
            return json.loads((path / "manifest.json").read_text())
        except (OSError, ValueError):
            return {}

    @classmethod
    def written_by(cls, path: Path) -> str | None:
        """The run id in a checkpoint's manifest (None: written before run ids, or unreadable)."""
        return cls._manifest(path).get("run_id")

    @classmethod
    def _written_key(cls, path: Path) -> tuple[float, int]:
        """Write order: the manifest's time (its file's mtime for a checkpoint written before that), then step."""
        step = int(STEP_DIR.match(path.name).group(1))
        when = cls._manifest(path).get("written_at")
        if when is None:
            try:
                when = (path / "manifest.json").stat().st_mtime
            except OSError:
                when = float("-inf")
        return (float(when), step)

    @classmethod
    def _written_order(cls, directory: Path) -> list[Path]:
        if not directory.is_dir():
            return []
        return sorted((p for p in directory.iterdir() if STEP_DIR.match(p.name)), key=cls._written_key)

    # -- reading -------------------------------------------------------------------------------------
    def checkpoints(self) -> list[Path]:
        """The checkpoints in the directory, oldest write first."""
        return self._written_order(self.directory)

    @staticmethod
    def verify(path: Path) -> str | None:
        """None if the checkpoint is complete and intact, else what is wrong with it."""
        manifest = path / "manifest.json"
        if not manifest.is_file():
            return "no manifest (the write did not finish)"
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError) as err:
            return f"unreadable manifest ({err})"
        for name, meta in files.items():
            f = path / name
            if not f.is_file():
                return f"{name} is missing"
            if f.stat().st_size != meta["size"]:
                return f"{name} is truncated ({f.stat().st_size} of {meta['size']} bytes)"
            if crc32(f) != meta["crc32"]:
                return f"{name} is corrupt (CRC32 mismatch)"
        return None

    def latest_valid(self) -> Path | None:
        for path in reversed(self.checkpoints()):
            problem = self.verify(path)
            if problem is None:
                return path
            log.warning("skipping checkpoint %s: %s", path, problem)
        return None

    @staticmethod
    def saved_meta(path: Path) -> dict:
        """The checkpoint's trainer.pt (step, identity, lineage, ...), or {} where it cannot be read. No CRC pass
        here (load() makes it; on a 7B checkpoint each pass reads ~80 GB): a missing or unreadable trainer.pt is
        left to load() to name."""
        try:
            return torch.load(path / "trainer.pt", weights_only=False)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            return {}

    def check_identity(self, path: Path, saved: dict | None) -> None:
        """Refuse a checkpoint (at `path`, its identity `saved`, from saved_meta) written by a run with other
        defining settings (a sweep sharing one checkpoint.dir, an edited config): resuming it would report the old
        run's numbers under the new settings, or fail halfway. A setting the checkpoint does not record (added to
        llmopt after it was written) is not compared."""
        if saved is None or self.identity is None:
            return
        changed = [f"{k}: {saved.get(k)!r} -> {self.identity.get(k)!r}" for k in sorted(saved)
                   if saved.get(k) != self.identity.get(k)]
        if changed:
            raise ValueError(f"checkpoint {path} was written by a run with other settings ({'; '.join(changed)}). "
                             "Resume with the same settings, or give this run its own checkpoint.dir")

    def load(self, trainer, path: Path) -> None:
        problem = self.verify(path)
        if problem is not None:
            raise ValueError(f"checkpoint {path} cannot be used: {problem}")
        acc = self.accelerator
        rank = acc.process_index
        meta = torch.load(path / "trainer.pt", weights_only=False)
        if self.sharded and meta["world_size"] != acc.num_processes:
            raise ValueError(f"sharded checkpoint {path} was written by {meta['world_size']} processes; resume "
                             f"it with the same number (now {acc.num_processes})")
        model = acc.unwrap_model(trainer.model).lm
        suffix = f"_rank{rank}" if self.sharded else ""
        where = "cpu" if acc.device.type == "cpu" else acc.device  # gloo ranks' "cpu:0" is no storage location
        model.load_state_dict(torch.load(path / f"model{suffix}.pt", map_location=where, weights_only=False))
        trainer.raw_optimizer.load_state_dict(
            torch.load(path / f"optimizer{suffix}.pt", map_location=where, weights_only=False))
        trainer.scheduler.load_state_dict(meta["scheduler"])
        trainer.step, trainer.tokens_seen = meta["step"], meta["tokens_seen"]
        trainer.skipped_steps, trainer.last_eval = meta["skipped_steps"], meta["last_eval"]
        own = path / f"rank{rank}.pt"
        if not own.is_file():
            raise ValueError(f"checkpoint {path} has no data-loader state for rank {rank} (written by "
                             f"{meta['world_size']} processes); resume with at most that many")
        ranked = torch.load(own, weights_only=False)
        trainer.data.train.load_state_dict(ranked["data"])
        trainer.train_iter = iter(trainer.data.train)
        set_rng_state(ranked["rng"])
        log.info("resumed from %s (step %d)", path, trainer.step)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def export_hf(model, directory: str | Path) -> Path:
    """The model as a Hugging Face directory, in the run's dtype. Loaded by `LlamaForCausalLM.from_pretrained(
    directory)` (the saved dtype; or `dtype=torch.bfloat16` / `torch.float32` as the run's precision has it, an
    amp_bf16 run's fp32 weights evaluated under torch.autocast(bfloat16)), it gives llmopt's own evaluation loss of
    the final weights: transformers computes RoPE's frequencies in fp32, as llmopt does (llmopt.model.rotary).
    Calling `.to(torch.bfloat16)` after loading rounds those frequencies to bf16 and changes the outputs: ask for
    bf16 with `dtype=` instead."""
    directory = Path(directory)
    model.save_pretrained(directory, safe_serialization=True)
    return directory
