"""`python -m llmopt.train [overrides]`: the main job (Hydra composes configs/train.yaml)."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from llmopt.config import CONFIG_DIR

INTERRUPTED_EXIT_CODE = 130  # the shell's code for a process stopped by SIGINT
_job_started = False  # main() entered: Hydra has set up the run directory


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> None:
    global _job_started
    _job_started = True
    from hydra.types import RunMode

    from llmopt.data.sources import HubUnreachableError
    from llmopt.train.lock import DirectoryLocked
    from llmopt.train.run import run
    from llmopt.train.rundir import format_summary, remove_if_unstarted
    from llmopt.train.signals import PREEMPTED_EXIT_CODE
    from llmopt.train.sweep import record_outcome
    from llmopt.train.trainer import NonFiniteError

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    # in a sweep (-m), a job that fails or diverges is reported and the sweep goes on to the next job; the
    # sweep ends with "N of M jobs failed" (llmopt.train.sweep)
    sweeping = hydra_cfg.mode == RunMode.MULTIRUN
    error, exit_code = None, 0
    try:
        summary = run(cfg, run_dir)
    except (ValueError, MemoryError, FileNotFoundError, HubUnreachableError, OmegaConfBaseException) as err:
        remove_if_unstarted(run_dir)
        error, exit_code = f"error: {config_error(err)}", 2
    except DirectoryLocked as err:  # that directory is another run's: nothing of it is removed
        if err.directory.resolve() != run_dir.resolve():
            remove_if_unstarted(run_dir)
        error, exit_code = f"error: {err}", 2
    except NonFiniteError as err:
        error, exit_code = f"stopped: {err}", 3
    except Exception as err:
        remove_if_unstarted(run_dir)  # a crash before the first step leaves nothing half-written
        if not sweeping:
            raise
        traceback.print_exc()  # a crash is reported like any failure, and the sweep goes on
        error = f"crashed: {type(err).__name__}: {err}"
    except KeyboardInterrupt:  # before training, or a second Ctrl-C during it
        remove_if_unstarted(run_dir)
        print("\nllmopt: interrupted: stopped at once, nothing written since the last checkpoint", file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
    except BaseException:
        remove_if_unstarted(run_dir)
        raise
    if error is not None:
        after_progress_bar = "\n" if exit_code == 3 else ""  # a run stopped mid-training
        print(f"{after_progress_bar}llmopt: {error}", file=sys.stderr)
        if not sweeping:
            sys.exit(exit_code)
    if sweeping:
        record_outcome(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, run_dir, error)
        if error is not None:
            return
    if summary.get("is_main", True):
        print("\n" + format_summary(summary))
    if summary.get("preempted"):
        print(f"preempted: checkpoint written; exiting with {PREEMPTED_EXIT_CODE} so the job is requeued")
        sys.exit(PREEMPTED_EXIT_CODE)


def config_error(err: Exception) -> str:
    """An error as one line; a refused config names the key, the value and what was expected (Hydra's own report
    spans a traceback or several lines)."""
    cause = err if isinstance(err, OmegaConfBaseException) else err.__cause__
    if isinstance(cause, OmegaConfBaseException) and cause.full_key:
        problem = str(cause.msg).splitlines()[0]
        return f"{cause.full_key}: {problem}" + (f" ({err})" if cause is not err else "")
    return " ".join(str(err).split("Config search path")[0].split())


def cli() -> None:
    # Hydra then raises a config it refuses instead of printing it, and the error is reported in one line
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        main()
    except (ConfigCompositionException, OmegaConfBaseException) as err:
        print(f"llmopt: error: {config_error(err)}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:
        if _job_started:
            raise
        # Hydra creates the run directory before the job starts
        print(f"llmopt: error: cannot create the run directory ({err.strerror}: {err.filename}): set output_root "
              "(or hydra.run.dir / hydra.sweep.dir) to a writable directory", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
