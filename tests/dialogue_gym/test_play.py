"""``python -m dialogue_gym.play`` end to end in a pseudo-terminal: a person plays the assistant (and the user)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gymnasium as gym
import pytest

import dialogue_gym  # noqa: F401
from dialogue_gym.conversation import DialogueState

pexpect = pytest.importorskip("pexpect")
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _spawn(*args: str) -> pexpect.spawn:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    child = pexpect.spawn(sys.executable, ["-m", "dialogue_gym.play", *args], cwd=str(ROOT), env=env,
                          encoding="utf-8", timeout=120, dimensions=(50, 400))
    child.logfile_read = sys.stdout  # shown by pytest when a test fails
    return child


def _first_problem(seed: int = 0) -> tuple[str, float]:
    """The opening and answer play shows first: the same env configuration and seed, built here."""
    env = gym.make("MultiTurnDialogue-v0", task="arithmetic", task_kwargs={"difficulty": 1, "n_train": 2000,
                   "n_test": 200, "seed": 0, "discount": 1.0}, split="train", user="critic", reward="verifier",
                   reward_mode="per_turn", max_turns=3)
    obs, _ = env.reset(seed=seed)
    return obs[-1]["content"], env.unwrapped.get_state().profile["answer"]


def test_play_as_the_assistant_with_undo_save_load_and_bad_input(tmp_path):
    opening, answer = _first_problem()
    saved = tmp_path / "state.json"
    child = _spawn("+env=arithmetic")
    child.expect_exact(opening)
    child.expect_exact("you> ")
    child.sendline(f"The answer is {answer + 1:g}.")
    child.expect(r"-> reward 0\.000, score 0\.000 \(turn 1\)")
    child.expect(r"\[user\] [^\r\n]+")
    child.expect_exact("you> ")
    child.sendline(f"/save {saved}")
    child.expect_exact(f"saved the state at turn 1 to {saved}")
    state = DialogueState.from_json(saved.read_text())
    assert state.turn == 1 and state.messages[1]["content"] == f"The answer is {answer + 1:g}."
    child.sendline("/frobnicate")
    child.expect_exact("unknown command '/frobnicate'")
    child.sendline("")
    child.expect_exact("empty message")
    child.sendline(f"/load {tmp_path / 'missing.json'}")
    child.expect_exact("error: [Errno 2] No such file or directory")
    (tmp_path / "bad.json").write_text(json.dumps({"messages": []}))
    child.sendline(f"/load {tmp_path / 'bad.json'}")
    child.expect_exact("error: state is missing field(s)")
    child.sendline("/undo")
    child.expect_exact("undone; back at turn 0")
    child.sendline("/undo")
    child.expect_exact("nothing to undo")
    child.sendline(f"The answer is {answer:g}.")  # solved on the first turn this time
    child.expect(r"-> reward 1\.000, score 1\.000 \(turn 1\)")
    child.expect_exact("conversation over: the user ended it; return 1.000")
    child.sendline("more text")
    child.expect_exact("this conversation is over")
    child.sendline(f"/load {saved}")  # back to the saved wrong-answer turn, and solve it there
    child.expect_exact(f"loaded {saved}: turn 1")
    child.expect_exact("you> ")
    child.sendline(f"The answer is {answer:g}.")
    child.expect(r"-> reward 1\.000, score 1\.000 \(turn 2\)")
    child.sendline("/reset")
    child.expect_exact("--- conversation 2")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_play_as_the_user_against_a_policy(tmp_path):
    child = _spawn("+env=arithmetic", "role=user", "policy=tiny", "max_new_tokens=6")
    child.expect(r"\[assistant\] ([^\r\n]+)\r\n")
    first_reply = child.match.group(1)
    child.expect_exact("user> ")
    child.sendline("Please check again.")
    child.expect(r"-> reward 0\.000, score 0\.000 \(turn 1\)")
    child.expect_exact("user> ")
    child.sendline("/undo")  # back before the first exchange: the policy says the same again (same seed)
    child.expect_exact("undone; back at turn 0")
    child.expect(r"\[assistant\] ([^\r\n]+)\r\n")
    assert child.match.group(1) == first_reply
    child.expect_exact("user> ")
    child.sendline("")
    child.expect_exact("empty message: type the user's turn")
    child.sendline("/end")
    child.expect_exact("conversation over: the user ended it")
    child.sendline("/quit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_play_rejects_a_bad_role_in_one_line():
    child = _spawn("role=judge")
    child.expect_exact("error: role is 'judge'; allowed: assistant, user")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus != 0
