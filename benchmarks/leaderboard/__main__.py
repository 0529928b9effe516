"""``python -m benchmarks.leaderboard``: the Hydra entry point (``conf/leaderboard.yaml`` and its presets)."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from agents.common.config import merge_schema
from agents.common.run import setup_logging
from benchmarks.leaderboard.config import CONF_DIR, LeaderboardConfig
from benchmarks.leaderboard.report import results_path
from benchmarks.leaderboard.runner import run


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="leaderboard")
def main(raw: DictConfig) -> None:
    setup_logging()
    from hydra.core.hydra_config import HydraConfig

    cfg = merge_schema(raw, LeaderboardConfig)
    cfg.run_dir = HydraConfig.get().runtime.output_dir
    command = "python -m benchmarks.leaderboard " + " ".join(HydraConfig.get().overrides.task)
    run(cfg, command=command.strip())
    print((results_path(cfg) / f"{cfg.report_name}.md").read_text())


if __name__ == "__main__":
    sys.exit(main())
