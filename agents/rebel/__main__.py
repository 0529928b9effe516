"""REBEL — Regressing the Relative Reward (Gao et al., 2024, https://arxiv.org/abs/2404.16767), multi-turn baseline.

Run:
    python -m agents.rebel                        # embedded default env
    python -m agents.rebel +env=arithmetic
    python -m agents.rebel prefix=dataset +env=anthropic_hh   # the "last turn, offline prefix" variant
    python -m agents.rebel +experiment=smoke

REBEL is REFUEL without the future: the same pairs of turn-h replies at the same states, but each reply is
scored by its immediate reward (the env's score of the conversation ending with that reply), not by completing
the dialogue. Everything else (the regression loss, pi_t log-probs once per iteration, evaluation) is shared
with REFUEL: this module runs REFUEL's loop (agents/refuel/__main__.py) with future=False, so the two
differ only where the algorithms do.

Deviations from the paper and its reference code:
  1. Multi-turn: the paper is single-turn; here the context is s_h of an on-policy dialogue (prefix=on_policy,
     h drawn as in REFUEL) or the task row's own prefix (prefix=dataset, the REFUEL paper's LT-OFFLINE setting).
  2. Two replies per context (the UltraFeedback setting takes best vs worst of 5).
  3. LoRA and CPU-sized defaults as in agents/refuel (see its docstring, deviations 1-2, 5-6).
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from agents.common.run import launch
from agents.rebel.config import RebelConfig, validate
from agents.refuel.__main__ import run as run_regression

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def run(cfg: RebelConfig) -> dict:
    validate(cfg)
    return run_regression(cfg, future=False, prefix=cfg.prefix, name="REBEL")


Config = RebelConfig  # the contract with the leaderboard: an agent exports its Config schema and run(cfg)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="rebel")
def main(raw: DictConfig) -> None:
    launch(raw, RebelConfig, run)


if __name__ == "__main__":
    main()
