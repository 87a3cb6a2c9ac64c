"""`python -m llmopt.train [overrides]`: the main job (Hydra composes configs/train.yaml)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    from llmopt.train.run import PREEMPTED_EXIT_CODE, format_summary, remove_if_empty, run
    from llmopt.train.trainer import NonFiniteError

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except (ValueError, MemoryError) as err:
        remove_if_empty(run_dir)
        print(f"llmopt: error: {err}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as err:
        print(f"llmopt: stopped: {err}", file=sys.stderr)
        sys.exit(3)
    if summary.get("is_main", True):
        print("\n" + format_summary(summary))
    if summary.get("preempted"):
        print(f"preempted: checkpoint written; exiting with {PREEMPTED_EXIT_CODE} so the job is requeued")
        sys.exit(PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
    main()
