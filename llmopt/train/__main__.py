"""`python -m llmopt.train [overrides]`: the main job (Hydra composes configs/train.yaml)."""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from hydra.types import RunMode

    from llmopt.data.sources import HubUnreachableError
    from llmopt.train.lock import DirectoryLocked
    from llmopt.train.run import PREEMPTED_EXIT_CODE, format_summary, remove_if_unstarted, run
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
    except (ValueError, MemoryError, FileNotFoundError, HubUnreachableError) as err:
        remove_if_unstarted(run_dir)
        error, exit_code = f"error: {err}", 2
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
    except BaseException:
        remove_if_unstarted(run_dir)
        raise
    if error is not None:
        print(f"\nllmopt: {error}", file=sys.stderr)
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


if __name__ == "__main__":
    main()
