"""Typed configuration of the REBEL agent (``conf/rebel.yaml`` is merged over it)."""

from __future__ import annotations

from dataclasses import dataclass

from agents.common.config import check
from agents.refuel.config import RefuelConfig
from agents.refuel.config import validate as validate_refuel


@dataclass
class RebelConfig(RefuelConfig):
    """REBEL settings: REFUEL's, plus where the turn-h context comes from."""

    prefix: str = "on_policy"  # on_policy: roll in with the policy to s_h; dataset: the task row's own prefix


def validate(cfg: RebelConfig) -> None:
    validate_refuel(cfg)
    check(cfg.prefix in ("on_policy", "dataset"), f"prefix is {cfg.prefix!r}; allowed: on_policy, dataset")
