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
    from llmopt.train.run import format_summary, remove_if_empty, run

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        summary = run(cfg, run_dir)
    except (ValueError, MemoryError) as err:
        remove_if_empty(run_dir)
        print(f"llmopt: error: {err}", file=sys.stderr)
        sys.exit(2)
    print("\n" + format_summary(summary))


if __name__ == "__main__":
    main()
