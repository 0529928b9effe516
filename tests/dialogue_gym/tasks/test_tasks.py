"""Tasks backed by data: the embedded prompts, UltraInteract and Anthropic HH (from local fixture copies), and the
Hydra env configs in conf/env composed with every primary config."""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter
from pathlib import Path

import gymnasium as gym
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import dialogue_gym  # noqa: F401  (registers the env)
from dialogue_gym.conversation import DialogueError, validate_messages
from dialogue_gym.core import EnvConfig
from dialogue_gym.env import make_config
from dialogue_gym.tasks import TASKS, AnthropicHHTask, EmbeddedTask, UltraInteractTask, build_task
from dialogue_gym.tasks.anthropic_hh import clean_dialogue, parse_hh_text
from dialogue_gym.tasks.datafiles import in_test_split, stable_hash
from dialogue_gym.users import ReplayUser
from tests.conftest import LengthReward

ROOT = Path(__file__).resolve().parents[3]
FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
UI = FIXTURES / "ultrainteract_pair.jsonl"
HH_TEXT = FIXTURES / "hh_rlhf.jsonl"
HH_TRL = FIXTURES / "hh_rlhf_trl_style.jsonl"


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- embedded prompts -------------------------------------------------------------------------------------


def test_embedded_prompt_file():
    records = _records(ROOT / "dialogue_gym" / "tasks" / "data" / "embedded_prompts.jsonl")
    assert len(records) >= 240
    assert all(set(r) == {"id", "category", "split", "prompt"} for r in records)
    assert len({r["id"] for r in records}) == len(records)
    assert len({r["prompt"] for r in records}) == len(records)
    splits = Counter(r["split"] for r in records)
    assert set(splits) == {"train", "test"} and splits["train"] >= 200 and splits["test"] >= 40
    categories = {r["category"] for r in records}
    assert len(categories) >= 10
    for c in categories:  # every category in both splits
        assert {r["split"] for r in records if r["category"] == c} == {"train", "test"}
    assert all(10 <= len(r["prompt"]) <= 300 for r in records)
    task = EmbeddedTask()
    assert len(task.rows("train")) == splits["train"] and len(task.rows("test")) == splits["test"]


# ---- UltraInteract ----------------------------------------------------------------------------------------


def _openings(task) -> list[str]:
    return [r.messages[-1]["content"] for s in ("train", "test") for r in task.rows(s)]


def test_ultrainteract_loads_dedups_and_keeps_the_schema():
    task = UltraInteractTask(path=UI, test_fraction=0.3)
    openings = _openings(task)
    distinct = {r["trajectory"][0]["value"].strip() for r in _records(UI)}
    assert len(openings) == len(set(openings)) == len(distinct) == 13  # 15 rows, 2 repeat an opening
    assert task.skipped["duplicate"] == 2
    by_text = {r.messages[-1]["content"]: r for s in ("train", "test") for r in task.rows(s)}
    first = _records(UI)[0]
    row = by_text[first["trajectory"][0]["value"].strip()]
    assert row.messages == [{"role": "user", "content": first["trajectory"][0]["value"].strip()}]
    assert row.profile == {"source_id": first["id"], "task": "Math_CoT", "dataset": "gsm8k",
                           "reference": first["chosen"]}
    multi = [r for r in _records(UI) if r["task"] == "Math_PoT"][0]  # only a 3-turn row has this opening
    assert "reference" not in by_text[multi["trajectory"][0]["value"].strip()].profile
    assert task.default_user == "llm" and task.default_reward == "judge"
    assert TASKS["ultrainteract"] is UltraInteractTask


def test_ultrainteract_filters():
    assert len(_openings(UltraInteractTask(path=UI, max_turns=1))) == 12  # the 3-turn-only opening goes
    capped = UltraInteractTask(path=UI, max_turn_chars=300)
    assert len(_openings(capped)) == 11 and capped.skipped["max_turn_chars"] == 2
    assert all(len(t) <= 300 for t in _openings(capped))
    coding = UltraInteractTask(path=UI, task_types=["Coding"])
    assert len(_openings(coding)) == 2 and all(t.startswith("Write Python code") for t in _openings(coding))
    limited = UltraInteractTask(path=UI, limit=2, test_fraction=0.3)
    assert len(limited.rows("train")) == 2 and len(limited.rows("test")) == 2


def test_ultrainteract_split_is_deterministic_disjoint_and_order_free(tmp_path):
    a = UltraInteractTask(path=UI, test_fraction=0.3)
    b = UltraInteractTask(path=UI, test_fraction=0.3)
    assert [r.id for r in a.rows("train")] == [r.id for r in b.rows("train")]
    train, test = {r.id for r in a.rows("train")}, {r.id for r in a.rows("test")}
    assert train and test and not train & test
    # the split follows the text, not the position in the file
    reversed_file = tmp_path / "reversed.jsonl"
    reversed_file.write_text("\n".join(reversed(UI.read_text().splitlines())) + "\n")
    c = UltraInteractTask(path=reversed_file, test_fraction=0.3)
    assert {r.id for r in c.rows("test")} == test
    for r in a.rows("test"):
        assert in_test_split(r.messages[-1]["content"], 0.3)
        assert r.id == f"ui-{stable_hash(r.messages[-1]['content']):016x}"


def test_ultrainteract_reads_parquet_save_to_disk_and_snapshot_dirs(tmp_path):
    import datasets

    ds = datasets.load_dataset("json", data_files=str(UI), split="train")
    expected = sorted(r.id for r in UltraInteractTask(path=UI).rows("train"))
    ds.to_parquet(str(tmp_path / "0000_pair.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    shutil.copy(UI, snapshot / "ultrainteract_pair.jsonl")
    for path in (tmp_path / "0000_pair.parquet", tmp_path / "saved", snapshot):
        assert sorted(r.id for r in UltraInteractTask(path=path).rows("train")) == expected, path


def test_ultrainteract_offline_without_a_copy_says_how_to_get_one():
    with pytest.raises(DialogueError) as err:
        UltraInteractTask()
    msg = str(err.value)
    assert "openbmb/UltraInteract_pair" in msg
    assert "+env=ultrainteract env.task_kwargs.path=" in msg
    assert "hf download openbmb/UltraInteract_pair --repo-type dataset" in msg
    with pytest.raises(DialogueError, match="needs the dataset openbmb/UltraInteract_pair"):
        build_task("ultrainteract")


def test_ultrainteract_hub_id_offline_fails_fast():
    start = time.monotonic()
    with pytest.raises(DialogueError, match=r"hub_id='openbmb/UltraInteract_pair' could not be loaded.*offline"):
        UltraInteractTask(hub_id="openbmb/UltraInteract_pair")
    assert time.monotonic() - start < 30


def test_ultrainteract_bad_inputs(tmp_path):
    with pytest.raises(DialogueError, match="does not exist"):
        UltraInteractTask(path=tmp_path / "nope.jsonl")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(DialogueError, match="unknown file type '.txt'"):
        UltraInteractTask(path=tmp_path / "data.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "a", "prompt": "hi"}) + "\n")
    with pytest.raises(DialogueError, match=r"row 0 has no column\(s\) \['trajectory'\]"):
        UltraInteractTask(path=bad)
    bad.write_text(json.dumps({"id": "a", "trajectory": [{"from": "assistant", "value": "hi"}]}) + "\n")
    with pytest.raises(DialogueError, match=r"trajectory\[0\].from is 'assistant'"):
        UltraInteractTask(path=bad)
    with pytest.raises(DialogueError, match="test_fraction must be a number strictly between 0 and 1"):
        UltraInteractTask(path=UI, test_fraction=1)
    with pytest.raises(DialogueError, match="max_turns must be a positive integer or null"):
        UltraInteractTask(path=UI, max_turns=0)
    with pytest.raises(DialogueError, match=r"task_types has unknown value\(s\) \['Physics'\]"):
        UltraInteractTask(path=UI, task_types=["Physics"])
    with pytest.raises(DialogueError, match="split is 'val'"):
        UltraInteractTask(path=UI).rows("val")


# ---- Anthropic HH -----------------------------------------------------------------------------------------


def test_parse_hh_text_keeps_paragraphs():
    text = "\n\nHuman: Explain a budget.\n\nI mean at home.\n\nAssistant: A plan.\n\nHuman: Thanks"
    assert parse_hh_text(text) == [{"role": "user", "content": "Explain a budget.\n\nI mean at home."},
                                   {"role": "assistant", "content": "A plan."},
                                   {"role": "user", "content": "Thanks"}]
    assert parse_hh_text("Human: hi\n\nAssistant: hello")[1] == {"role": "assistant", "content": "hello"}
    with pytest.raises(DialogueError, match="must start with"):
        parse_hh_text("hello there")


def test_clean_dialogue_cuts_at_the_first_bad_message():
    u, a = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}
    assert clean_dialogue([u, a, {"role": "assistant", "content": "again"}, u], None) == [u, a]
    assert clean_dialogue([u, {"role": "assistant", "content": ""}], None) == [u]
    assert clean_dialogue([u, {"role": "assistant", "content": "x" * 50}, u], 10) == [u]
    assert clean_dialogue([a, u], None) == []


@pytest.mark.parametrize("prefixes", ["first", "all"])
def test_hh_both_layouts_give_the_same_rows(prefixes):
    text = AnthropicHHTask(path=HH_TEXT, prefixes=prefixes, test_fraction=0.3)
    trl = AnthropicHHTask(path=HH_TRL, prefixes=prefixes, test_fraction=0.3)
    for split in ("train", "test"):
        assert [(r.id, r.messages, r.profile) for r in text.rows(split)] == \
               [(r.id, r.messages, r.profile) for r in trl.rows(split)]


def test_hh_filters_dedup_and_prefixes():
    first = AnthropicHHTask(path=HH_TRL)
    rows = first.rows("train") + first.rows("test")
    # 8 dialogues: one has 6 user turns (> max_turns=5) and two share the opening "How do I boil an egg?"
    assert first.skipped["max_turns"] == 1 and first.skipped["duplicate"] == 1 and len(rows) == 6
    assert all(len(r.messages) == 1 and r.profile["opening_assistant_turns"] == 0 for r in rows)
    flowers = next(r for r in rows if "cut flowers" in r.messages[0]["content"])
    assert flowers.profile["user_turns"] == ["Should I add sugar to the water?", "How long will they last?"]
    assert flowers.profile["reference"].startswith("Trim the stems")
    assert AnthropicHHTask(path=HH_TRL, max_turns=None).skipped["max_turns"] == 0
    everything = AnthropicHHTask(path=HH_TRL, prefixes="all")
    rows = everything.rows("train") + everything.rows("test")
    assert len(rows) == 13  # 3 + 1 + (1 + 2 egg prefixes) + 2 + 1 + 3
    for r in rows:
        validate_messages(r.messages)
        assert r.messages[-1]["role"] == "user"
        assert r.profile["opening_assistant_turns"] == sum(m["role"] == "assistant" for m in r.messages)
    last = next(r for r in rows if r.messages[-1]["content"] == "How long will they last?")
    assert last.profile["user_turns"] == [] and last.profile["opening_assistant_turns"] == 2
    # all prefixes of a dialogue share its split
    split_of = {r.id: s for s in ("train", "test") for r in everything.rows(s)}
    for opening in {r.messages[0]["content"] for r in rows}:
        assert len({split_of[r.id] for r in rows if r.messages[0]["content"] == opening}) == 1


def test_hh_turn_length_cap_cuts_dialogues():
    task = AnthropicHHTask(path=HH_TRL, max_turn_chars=60)
    flowers = next(r for s in ("train", "test") for r in task.rows(s) if "cut flowers" in r.messages[0]["content"])
    assert flowers.profile["user_turns"] == [] and "reference" not in flowers.profile  # cut before the long reply


def test_replay_user_serves_the_dataset_turns():
    task = AnthropicHHTask(path=HH_TRL, prefixes="all", test_fraction=0.3)
    rows = task.rows("train") + task.rows("test")
    row = next(r for r in rows if r.messages[-1]["content"] == "Should I add sugar to the water?")
    user = ReplayUser()
    conv = row.messages + [{"role": "assistant", "content": "Yes."}]
    assert user.respond([conv], [row.profile], [0])[0].text == "How long will they last?"
    conv += [{"role": "user", "content": "How long will they last?"}, {"role": "assistant", "content": "A week."}]
    assert user.respond([conv], [row.profile], [0])[0].done
    turns_message, opening_message = (r"profile\['user_turns'\] to be a list of strings",
                                      r"profile\['opening_assistant_turns'\] to be an integer >= 0")
    for bad, message in (({"user_turns": "How long?"}, turns_message), ({"user_turns": [3]}, turns_message),
                         ({"opening_assistant_turns": -1}, opening_message)):
        with pytest.raises(DialogueError, match=message):  # a client's profile: named, not a TypeError mid-step
            user.respond([conv], [{**row.profile, **bad}], [0])


def test_hh_replay_through_the_env():
    task = AnthropicHHTask(path=HH_TRL, test_fraction=0.3)
    split = next(s for s in ("train", "test") for r in task.rows(s) if "cut flowers" in r.messages[0]["content"])
    index = next(i for i, r in enumerate(task.rows(split)) if "cut flowers" in r.messages[0]["content"])
    env = gym.make("MultiTurnDialogue-v0", task=task, split=split, reward=LengthReward(), max_turns=5)
    assert env.unwrapped.core.user.describe() == {"user": "replay"}  # the task's default user
    obs, _ = env.reset(seed=0, options={"task_index": index})
    obs, _, terminated, _, info = env.step("Trim the stems.")
    assert obs[-1]["content"] == "Should I add sugar to the water?" and not terminated
    obs, _, terminated, _, _ = env.step("A little.")
    assert obs[-1]["content"] == "How long will they last?" and not terminated
    _, reward, terminated, truncated, _ = env.step("About a week.")
    assert terminated and not truncated and reward == pytest.approx(len("About a week.") / 10)


def test_hh_bad_inputs(tmp_path):
    with pytest.raises(DialogueError, match=r"\+env=anthropic_hh env.task_kwargs.path="):
        AnthropicHHTask()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(DialogueError, match="row 0 has no column 'chosen'"):
        AnthropicHHTask(path=bad)
    bad.write_text(json.dumps({"chosen": 3}) + "\n")
    with pytest.raises(DialogueError, match="'chosen' must be a dialogue string or a list"):
        AnthropicHHTask(path=bad)
    with pytest.raises(DialogueError, match="prefixes is 'some'; allowed: first, all"):
        AnthropicHHTask(path=HH_TRL, prefixes="some")


def test_hh_reads_a_dataset_dict_folder(tmp_path):
    import datasets

    ds = datasets.load_dataset("json", data_files={"train": str(HH_TRL), "test": str(HH_TRL)})
    ds.save_to_disk(str(tmp_path / "hh"))
    task = AnthropicHHTask(path=tmp_path / "hh", source_split="test")
    assert len(task.rows("train") + task.rows("test")) == 6
    with pytest.raises(DialogueError, match=r"has splits \['test', 'train'\]; task_kwargs.source_split is 'dev'"):
        AnthropicHHTask(path=tmp_path / "hh", source_split="dev")


# ---- Hydra env configs ------------------------------------------------------------------------------------

ENV_CONFIGS = sorted(p.stem for p in (ROOT / "conf" / "env").glob("*.yaml"))
PRIMARY_CONFIGS = sorted(p.stem for p in (ROOT / "conf").glob("*.yaml"))
DATA_PATHS = {"ultrainteract": UI, "anthropic_hh": HH_TRL}


def _primaries(tmp_path: Path) -> list[tuple[Path, str]]:
    """(config dir, config name) for every primary config in conf/ plus the minimal fixture one."""
    fixture_dir = tmp_path / "conf"
    fixture_dir.mkdir()
    shutil.copy(FIXTURES / "conf" / "minimal.yaml", fixture_dir / "minimal.yaml")
    shutil.copytree(ROOT / "conf" / "env", fixture_dir / "env")
    return [(ROOT / "conf", name) for name in PRIMARY_CONFIGS] + [(fixture_dir, "minimal")]


def _compose_env(config_dir: Path, name: str, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(config_dir), version_base=None):
        cfg = compose(config_name=name, overrides=overrides)
    assert "env" in cfg, f"{name}.yaml has no env block"
    return OmegaConf.to_container(cfg.env, resolve=True)


def test_env_configs_exist():
    assert {"embedded", "arithmetic", "ultrainteract", "anthropic_hh"} <= set(ENV_CONFIGS)


@pytest.mark.parametrize("env_name", ENV_CONFIGS)
def test_env_config_composes_with_every_primary_config(env_name, tmp_path):
    own = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "env" / f"{env_name}.yaml"))
    for config_dir, primary in _primaries(tmp_path):
        overrides = [f"+env={env_name}"]
        if env_name in DATA_PATHS:
            overrides.append(f"env.task_kwargs.path={DATA_PATHS[env_name]}")
        env = _compose_env(config_dir, primary, overrides)
        for key, value in own.items():  # the env file wins over the primary config's inline block
            if key == "task_kwargs":
                assert {k: v for k, v in env[key].items() if k in value and k != "path"} == \
                       {k: v for k, v in value.items() if k != "path"}
            else:
                assert env[key] == value, (primary, key)
        config = make_config(env)  # unknown keys raise here
        assert isinstance(config, EnvConfig)
        config.validate()
        task = build_task(config.task, **config.task_kwargs)
        assert task.name == env_name and task.rows(config.split)


@pytest.mark.parametrize("env_name", sorted(DATA_PATHS))
def test_dataset_env_config_without_a_path_names_the_setting(env_name, tmp_path):
    config_dir, primary = _primaries(tmp_path)[-1]
    env = _compose_env(config_dir, primary, [f"+env={env_name}"])
    with pytest.raises(DialogueError, match=rf"\+env={env_name} env.task_kwargs.path="):
        build_task(env["task"], **env["task_kwargs"])


def test_minimal_primary_without_env_override_is_the_embedded_default(tmp_path):
    config_dir, primary = _primaries(tmp_path)[-1]
    config = make_config(_compose_env(config_dir, primary, []))
    assert config == EnvConfig()
