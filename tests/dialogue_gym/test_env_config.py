"""The single env config: validation names the field, agents wrap it, and the docs table is generated from it."""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import pytest

from dialogue_gym.config import EnvConfig, EnvConfigError, field_table

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(("change", "field", "fragment"), [
    ({"task": "chess"}, "task", "task is 'chess'; allowed: anthropic_hh, arithmetic, clarify, embedded"),
    ({"reward_mode": "sparse"}, "reward_mode", "reward_mode is 'sparse'; allowed: terminal, per_turn, delta"),
    ({"max_turns": 0}, "max_turns", "max_turns must be a positive integer, got 0"),
    ({"max_turns": True}, "max_turns", "max_turns must be a positive integer, got True"),
    ({"max_action_chars": -3}, "max_action_chars", "max_action_chars must be a positive integer, got -3"),
    ({"split": "dev"}, "split", "split is 'dev'; allowed: train, test, validation"),
    ({"engine": "tgi"}, "engine", "engine is 'tgi'; allowed: hf, vllm, openai"),
    ({"dtype": "fp8"}, "dtype", "dtype is 'fp8'"),
    ({"engine": "openai"}, "base_url", "base_url is missing: engine 'openai' needs base_url"),
    ({"base_url": "http://127.0.0.1:8000/v1"}, "base_url", "base_url is set but the user engine is 'hf'"),
    ({"engine_options": [1]}, "engine_options", "engine_options must be a dict of engine keyword arguments"),
])
def test_validate_names_the_bad_field(change, field, fragment):
    cfg = dataclasses.replace(EnvConfig(), **change)
    with pytest.raises(EnvConfigError, match=fragment) as e:
        cfg.validate()
    assert e.value.field == field and str(e.value).startswith(field)
    EnvConfig().validate()  # the defaults are valid


def test_agents_wrap_the_env_error_as_config_error():
    from agents.common.config import ConfigError, EnvSettings, check_env

    assert EnvSettings is EnvConfig  # the old name still imports
    with pytest.raises(ConfigError, match=r"^env\.reward_mode is 'sparse'"):
        check_env(EnvConfig(reward_mode="sparse"))


def test_the_agents_hydra_env_node_is_the_env_config():
    from hydra import compose, initialize_config_dir

    from agents.common.config import merge_schema
    from agents.ppo.config import PpoConfig

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = merge_schema(compose(config_name="ppo", overrides=["+env=arithmetic", "env.max_action_chars=500"]),
                           PpoConfig)
    assert type(cfg.env) is EnvConfig and cfg.env.task == "arithmetic" and cfg.env.max_action_chars == 500


def test_keyword_table_covers_every_field_with_its_default_and_doc():
    rows = {r.name: r for r in field_table()}
    assert list(rows) == [f.name for f in dataclasses.fields(EnvConfig)]
    assert rows["max_turns"].default == "5" and "horizon" in rows["max_turns"].doc
    assert rows["task_kwargs"].default == "{}"
    assert "(score minus the previous turn's score; sums to the final score)" in rows["reward_mode"].doc
    assert all(r.doc for r in rows.values())


def test_keyword_table_fails_when_a_field_has_no_doc(monkeypatch):
    doc = EnvConfig.__doc__
    monkeypatch.setattr(EnvConfig, "__doc__", doc.replace("        max_action_chars:", "        other:"))
    with pytest.raises(RuntimeError, match="EnvConfig.max_action_chars has no description"):
        field_table()


def test_docs_hook_renders_the_table_and_a_module_docstring():
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    page = hooks.on_page_markdown("<!-- env-keywords -->\n\n<!-- docstring agents/refuel/__main__.py -->", None,
                                  None, None)
    lines = page.splitlines()
    assert lines[0] == "| keyword | type | default | meaning |"
    assert sum(line.startswith("| `") for line in lines) == len(dataclasses.fields(EnvConfig))
    assert "Deviations from the paper" in page and "From `agents/refuel/__main__.py`" in page
    with pytest.raises(FileNotFoundError, match="names no file"):
        hooks.module_docstring("agents/nothing.py")
