"""Play an environment yourself in the terminal, before you train on it.

    python -m dialogue_gym.play                          # you are the assistant; embedded LLM user and judge
    python -m dialogue_gym.play +env=arithmetic          # arithmetic problems, the critic user, the verifier
    python -m dialogue_gym.play +env=arithmetic role=user policy=outputs/refuel/.../policy   # you are the user

``role=assistant`` (default): the env shows the conversation, you type the assistant's message, the env's
simulated user answers and its reward model scores your reply. ``role=user``: a policy (``policy``: a trained
policy directory, ``embedded``, ``tiny`` or a hub id) plays the assistant and you type the user's turns (``/end``
ends the conversation as the user); the env's reward model scores the policy's replies. Each turn shows the
reward (the reward mode is ``per_turn`` here, so every turn is scored; ``reward_mode=null`` keeps the env's) and
the raw score.

Commands: ``/undo`` (take back the last turn), ``/save FILE`` (the current state as JSON), ``/load FILE`` (continue
from a saved state of the same configuration), ``/reset`` (a new conversation), ``/help``, ``/quit``. Bad input
gets a one-line message and the session goes on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dialogue_gym.conversation import DialogueError, DialogueState, Message
from dialogue_gym.users.base import UserTurn

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
ROLES = ("assistant", "user")
HELP = ("commands: /undo (take back the last turn), /save FILE, /load FILE, /reset (new conversation), "
        "/help, /quit")


@dataclass
class PlayConfig:
    """Settings of ``python -m dialogue_gym.play``."""

    env: dict[str, Any] = field(default_factory=dict)  # keyword arguments of gym.make (EnvConfig fields)
    role: str = "assistant"  # the part you play: assistant (the env's user answers) or user (a policy answers)
    policy: str = "embedded"  # role=user: the assistant's model (trained policy directory, embedded, tiny, hub id)
    temperature: float = 0.7  # role=user: the policy's sampling temperature
    max_new_tokens: int = 96  # role=user: the policy's reply cap in tokens
    seed: int = 0  # the first conversation's seed (each /reset draws the next)
    reward_mode: str | None = "per_turn"  # overrides env.reward_mode (per_turn: a score every turn); null keeps it


class _Command(Exception):
    """A command typed where the user's turn was expected (role=user); it leaves the step, which is undone."""

    def __init__(self, line: str):
        super().__init__(line)
        self.line = line


class TerminalUser:
    """A simulated user that is a person at the terminal (``role=user``); ``/end`` ends the conversation."""

    def __init__(self, read: Callable[[str], str]):
        self.read = read

    def respond(self, conversations: Sequence[Sequence[Message]], profiles: Sequence[Mapping[str, Any]],
                seeds: Sequence[int]) -> list[UserTurn]:
        turns = []
        for _ in conversations:
            while True:
                line = self.read("user> ").strip()
                if line == "/end":
                    turns.append(UserTurn("", done=True))
                    break
                if line.startswith("/"):
                    raise _Command(line)
                if line:
                    turns.append(UserTurn(line))
                    break
                print("empty message: type the user's turn, /end to end the conversation, or /help")
        return turns

    def describe(self) -> dict[str, Any]:
        return {"user": "terminal"}


class Session:
    """One terminal session: an env, the states to undo to, and the command handling."""

    def __init__(self, cfg: PlayConfig, read: Callable[[str], str] = input):
        import gymnasium as gym

        import dialogue_gym  # noqa: F401  (registers the env)

        if cfg.role not in ROLES:
            raise DialogueError(f"role is {cfg.role!r}; allowed: {', '.join(ROLES)}")
        self.cfg, self.read = cfg, read
        kwargs = dict(cfg.env)
        if cfg.reward_mode is not None:
            kwargs["reward_mode"] = cfg.reward_mode
        self.engine = None
        if cfg.role == "user":
            from dialogue_gym.generation import SamplingParams, make_engine

            kwargs["user"] = TerminalUser(read)
            self.params = SamplingParams(temperature=cfg.temperature, max_new_tokens=cfg.max_new_tokens)
            self.engine = make_engine("hf", cfg.policy, seed=cfg.seed)
        self.env = gym.make("MultiTurnDialogue-v0", **kwargs)
        self.history: list[DialogueState] = []
        self.episode = 0
        self.total = 0.0

    def new_conversation(self) -> None:
        obs, _ = self.env.reset(seed=self.cfg.seed + self.episode)
        self.episode += 1
        self.history, self.total = [], 0.0
        print(f"--- conversation {self.episode} (task row {self.state.task_row or '-'}) ---")
        for m in obs:
            print(f"[{m['role']}] {m['content']}")

    @property
    def state(self) -> DialogueState:
        return self.env.unwrapped.get_state()

    def take_turn(self, text: str) -> None:
        """Step the env with the assistant's message and print what happened."""
        before = self.state
        if self.cfg.role == "user":
            print(f"[assistant] {text}")
        _, reward, terminated, truncated, info = self.env.step(text)
        self.history.append(before)
        self.total += reward
        score = f", score {info['score']:.3f}" if "score" in info else ""
        print(f"    -> reward {reward:.3f}{score} (turn {info['turn']})")
        if info.get("user_message") and self.cfg.role == "assistant":
            print(f"[user] {info['user_message']}")
        if terminated or truncated:
            why = "the user ended it" if terminated else f"max_turns ({self.state.max_turns}) reached"
            print(f"=== conversation over: {why}; return {self.total:.3f}. /reset for a new one, /undo to go back, "
                  "/quit to leave ===")

    def policy_reply(self) -> str:
        """The policy's next message (role=user); a blank sample is drawn again with the next seed, said aloud."""
        state = self.state
        for attempt in range(3):
            seed = int(np.random.default_rng([self.cfg.seed, len(state.messages), attempt]).integers(2**62))
            text = self.engine.generate([state.messages], self.params, seeds=[seed])[0].text.strip()
            if text:
                return text
            print("(the policy's reply was blank; sampling again with the next seed)")
        raise DialogueError("the policy gave a blank reply three times; /undo, /reset or /quit")

    def command(self, line: str) -> bool:
        """Run a /command; False when the session should end."""
        name, _, arg = line.partition(" ")
        arg = arg.strip()
        if name == "/quit":
            return False
        if name == "/help":
            print(HELP)
        elif name == "/reset":
            self.new_conversation()
        elif name == "/undo":
            if not self.history:
                print("nothing to undo: this is the start of the conversation")
            else:
                self.env.reset(options={"state": self.history.pop()})
                print(f"undone; back at turn {self.state.turn}: [{self.state.messages[-1]['role']}] "
                      f"{self.state.messages[-1]['content']}")
        elif name == "/save":
            if not arg:
                print("usage: /save FILE")
            else:
                Path(arg).write_text(self.state.to_json())
                print(f"saved the state at turn {self.state.turn} to {arg}")
        elif name == "/load":
            if not arg:
                print("usage: /load FILE")
            else:
                text = Path(arg).read_text()
                self.env.reset(options={"state": DialogueState.from_json(text)})
                self.history = []
                print(f"loaded {arg}: turn {self.state.turn}")
                for m in self.state.messages:
                    print(f"[{m['role']}] {m['content']}")
        else:
            print(f"unknown command {name!r}; {HELP}")
        return True

    def loop(self) -> None:
        self.new_conversation()
        print(HELP)
        while True:
            try:
                if self.cfg.role == "user" and not self.state.done:
                    try:
                        self.take_turn(self.policy_reply())
                        continue
                    except _Command as c:  # typed at the user's prompt: the step was not applied
                        line = c.line
                else:
                    line = self.read("you> " if not self.state.done else "(over)> ").strip()
                if not line:
                    print("empty message: type the assistant's reply, or /help")
                    continue
                if line.startswith("/"):
                    if not self.command(line):
                        return
                    continue
                if self.state.done:
                    print("this conversation is over: /reset, /undo or /quit")
                    continue
                self.take_turn(line)
            except EOFError:
                print()
                return
            except (DialogueError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
                print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}")


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base=None, config_path=CONF_DIR, config_name="play")
    def _main(raw: Any) -> None:
        merged = OmegaConf.merge(OmegaConf.structured(PlayConfig), raw)
        cfg: PlayConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
        from dialogue_gym.models import ModelNotFoundError

        try:
            session = Session(cfg)
        except (DialogueError, ModelNotFoundError) as e:
            raise SystemExit(f"error: {e}") from None
        session.loop()

    _main()


if __name__ == "__main__":
    main()
