"""Each agent's dataclass defaults are its Hydra YAML's values: ``run(Config())`` from Python does what
``python -m agents.NAME`` does with no overrides (they had drifted apart: max_new_tokens 96 vs 64, and more)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from agents.dpo.config import DpoConfig
from agents.grpo.config import GrpoConfig
from agents.ppo.config import PpoConfig
from agents.rebel.config import RebelConfig
from agents.refuel.config import RefuelConfig
from agents.reward_model.config import RewardModelConfig
from agents.sb3.config import Sb3Config

CONF = str(Path(__file__).resolve().parents[2] / "conf")
SCHEMAS = {"refuel": RefuelConfig, "rebel": RebelConfig, "dpo": DpoConfig, "ppo": PpoConfig, "grpo": GrpoConfig,
           "reward_model": RewardModelConfig, "sb3": Sb3Config}


def differences(yaml: dict, schema: dict, path: str = "") -> list[str]:
    out = []
    for key, value in yaml.items():
        if key not in schema:
            out.append(f"{path}{key}: in the YAML, not in the dataclass")
        elif isinstance(value, dict) and isinstance(schema[key], dict):
            out += differences(value, schema[key], f"{path}{key}.")
        elif value != schema[key]:
            out.append(f"{path}{key}: YAML {value!r}, dataclass {schema[key]!r}")
    return out


@pytest.mark.parametrize("agent", sorted(SCHEMAS))
def test_the_dataclass_defaults_are_the_yaml_values(agent):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        yaml = OmegaConf.to_container(compose(config_name=agent), resolve=True)
    yaml.pop("hydra", None)
    assert differences(yaml, OmegaConf.to_container(OmegaConf.structured(SCHEMAS[agent]), resolve=True)) == []


def test_a_difference_is_named_with_its_path():
    assert differences({"optim": {"lr": 1e-4, "epochs": 2}, "extra": 1}, {"optim": {"lr": 1e-4, "epochs": 1}}) == [
        "optim.epochs: YAML 2, dataclass 1", "extra: in the YAML, not in the dataclass"]
