"""TRL's GRPOTrainer through :class:`dialogue_gym.integrations.trl.DialogueRollout` on the tiny model.

The env: embedded openings, the scripted user, and a reward of the last reply's length (tests/conftest.py's
``LengthReward``), so a random-weight policy gets rewards that differ within a group and GRPO has a gradient.
"""

from __future__ import annotations

import contextlib
import threading
import time

import pytest
import torch

pytest.importorskip("trl", reason="needs the integrations extra: pip install 'dialogue-gym[integrations]'")
pytest.importorskip("openenv", reason="needs the integrations extra: pip install 'dialogue-gym[integrations]'")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from dialogue_gym.conversation import DialogueError  # noqa: E402
from dialogue_gym.integrations.trl import DialogueRollout, chat_glue  # noqa: E402
from dialogue_gym.models import load_model, load_tokenizer  # noqa: E402
from tests.conftest import LengthReward  # noqa: E402

USER_REPLIES = ["Tell me more about that please.", "Why would that be so?"]


def env_kwargs() -> dict:
    from dialogue_gym.users.scripted import ScriptedUser

    return {"task": "embedded", "user": ScriptedUser(USER_REPLIES), "reward": LengthReward(),
            "reward_mode": "per_turn", "max_turns": 2, "device": "cpu"}


def test_chat_glue_is_what_the_template_puts_between_replies():
    tok = load_tokenizer("tiny")
    before = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]
    glue = chat_glue(tok, before, "How are you?")
    closed = tok.apply_chat_template(before, tokenize=False)
    full = tok.apply_chat_template([*before, {"role": "user", "content": "How are you?"}], tokenize=False,
                                   add_generation_prompt=True)
    cut = closed.rfind("Hello!" + tok.eos_token) + len("Hello!" + tok.eos_token)
    assert closed[:cut] + glue == full
    assert glue.startswith("\n<|im_start|>user\nHow are you?") and glue.endswith("<|im_start|>assistant\n")


def _trainer(tmp_path, rollout, steps=2):
    model, tok = load_model("tiny", dtype="float32", shared=False, device="cpu")
    tok.padding_side = "left"
    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=2, max_steps=steps,
                      learning_rate=5e-3, beta=0.0, temperature=1.0, logging_steps=1, report_to=[],
                      save_strategy="no", use_cpu=True, bf16=False, seed=0, disable_tqdm=True)
    return GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=rollout.dataset(n=8),
                       reward_funcs=rollout.reward, rollout_func=rollout)


def test_grpo_trains_on_multi_turn_dialogues_and_user_tokens_carry_no_loss(tmp_path):
    rollout = DialogueRollout(env_kwargs(), max_new_tokens=6, seed=0)
    trainer = _trainer(tmp_path, rollout)
    model = trainer.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    captured = []
    loss_fn = trainer._compute_loss

    def spy(m, inputs):
        captured.append({k: v.detach().clone() if torch.is_tensor(v) else v for k, v in inputs.items()})
        return loss_fn(m, inputs)

    trainer._compute_loss = spy
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed == [n for n, _ in model.named_parameters()], "every parameter should have moved"
    assert rollout.stats["dialogues"] == 8 and rollout.stats["turns"] > 8  # multi-turn: more turns than dialogues

    inputs = captured[-1]
    tok = trainer.processing_class
    prompt, comp = inputs["prompt_ids"], inputs["completion_ids"]  # (B, P), (B, C)
    mask = inputs["completion_mask"] * inputs["tool_mask"]  # (B, C): what TRL's loss weighs
    # where the user's turns are, found from the token ids themselves (not from the mask under test)
    user_pos = torch.zeros_like(mask, dtype=torch.bool)  # (B, C)
    for b in range(comp.shape[0]):
        ids = comp[b].tolist()
        for reply in USER_REPLIES:
            rid = tok(reply, add_special_tokens=False)["input_ids"]
            for j in range(len(ids) - len(rid) + 1):
                if ids[j:j + len(rid)] == rid:
                    user_pos[b, j:j + len(rid)] = True
        assert not any(r in tok.decode(comp[b][mask[b] == 1]) for r in USER_REPLIES)
    assert user_pos.any(), "no user turn in the completions: the dialogues were not multi-turn"
    assert torch.all(mask[user_pos] == 0)

    # The loss's gradient reaches the final hidden state only where a policy token is predicted: the hidden state at
    # position t feeds only the prediction of token t + 1 (nothing but the LM head comes after the final norm).
    hidden = []

    def keep(module, args, out):  # returns None: the output is not replaced
        out.retain_grad()
        hidden.append(out)

    handle = model.model.norm.register_forward_hook(keep)
    model.zero_grad()
    trainer._compute_loss(model, inputs).backward()
    handle.remove()
    grad = torch.cat([h.grad for h in hidden], dim=0)  # (B, P + C, H)
    p = prompt.shape[1]
    per_token = grad[:, p - 1: p - 1 + comp.shape[1]].abs().sum(-1)  # (B, C): gradient at the position predicting it
    assert torch.all(per_token[user_pos] == 0), "a user token got loss weight"
    assert torch.all(per_token[mask == 0] == 0), "a masked token got loss weight"
    assert per_token[mask == 1].abs().sum() > 0


@contextlib.contextmanager
def served(kwargs: dict):
    """An OpenEnv server of ``kwargs`` under uvicorn on a loopback port, in a thread; yields (app, base_url)."""
    import uvicorn

    from dialogue_gym.generation.serve import free_port
    from dialogue_gym.integrations.openenv import create_app

    app = create_app(kwargs, max_sessions=8, batch_window_s=0.05)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_a_free_form_prompt_on_a_task_that_needs_the_rows_profile_is_refused_at_reset():
    rollout = DialogueRollout({"task": "arithmetic", "task_kwargs": {"n_train": 8, "n_test": 4}, "max_turns": 2},
                              max_new_tokens=4, seed=0)
    model, tok = load_model("tiny", dtype="float32", shared=False, device="cpu")
    tok.padding_side = "left"
    rows = rollout.dataset(n=2)["prompt"]
    free = [{"role": "user", "content": "What is 2 + 3?"}]
    with pytest.raises(DialogueError, match=r"the critic user needs the task profile's 'answer' \(got profile keys "
                                            r"\[\]\)"):
        rollout.play(model, tok, [rows[0], free])
    assert len(rollout.play(model, tok, rows)["env_reward"]) == 2  # the rollout still plays the task's rows


def test_the_dataset_batches_and_seeds_of_the_rollout():
    rollout = DialogueRollout(env_kwargs(), max_new_tokens=4, seed=100)
    every = rollout.dataset()["prompt"]
    # the same dataset on every call (a second call used to come back empty), n the first n openings
    assert rollout.dataset()["prompt"] == every and len(every) == len({str(p) for p in every}) > 8
    assert rollout.dataset(n=3)["prompt"] == every[:3] and rollout.dataset(n=0)["prompt"] == []
    for bad in (-1, 2.5, True):
        with pytest.raises(DialogueError, match=r"dataset\(n\): n must be a non-negative integer"):
            rollout.dataset(n=bad)
    model, tok = load_model("tiny", dtype="float32", shared=False, device="cpu")
    tok.padding_side = "left"
    seeds = []
    start = rollout.backend.start
    rollout.backend.start = lambda starts, seed: seeds.append(seed) or start(starts, seed)
    free = [{"role": "user", "content": "A question of my own, not in the dataset?"}]
    out = rollout.play(model, tok, [every[1], free, every[1], free])  # rows and free-form prefixes in one batch
    assert len(out["env_reward"]) == 4 and rollout.last[0][0] == every[1][0] and rollout.last[1][0] == free[0]
    assert rollout.last[0][:1] == rollout.last[2][:1] and len(rollout.backend._envs) == 1
    env = rollout.backend.env
    rollout.play(model, tok, [every[0]] * 4)
    assert rollout.backend.env is env  # built once per batch size, not on every call
    assert all(e.core.task is rollout.task for e in rollout.backend._envs.values())  # the task, built once
    assert seeds == [100, 104]  # each batch's first seed comes after the dialogues before it
    # under 2 processes (a rollout each), every round of batches gives each process its own slice of seeds
    by_rank: dict[int, list[int]] = {0: [], 1: []}
    for rank in (0, 1):
        r = DialogueRollout(env_kwargs(), max_new_tokens=4, seed=100)
        first = r.backend.start
        r.backend.start = lambda starts, seed, first=first, rank=rank: by_rank[rank].append(seed) or first(starts,
                                                                                                           seed)
        for _ in range(2):
            r.play(model, tok, [every[0]] * 2, process=(rank, 2))
    assert by_rank == {0: [100, 104], 1: [102, 106]}  # dialogues 100-101, 104-105 and 102-103, 106-107


def test_a_server_of_another_configuration_is_named_not_trained_on():
    other = dict(env_kwargs(), split="test")
    with served(other) as (_, url):
        rollout = DialogueRollout(env_kwargs(), base_url=url, max_new_tokens=4, seed=0)
        try:
            model, tok = load_model("tiny", dtype="float32", shared=False, device="cpu")
            tok.padding_side = "left"
            with pytest.raises(DialogueError, match=r"plays another row for task_index 0: row .* where this "
                                                    r"rollout's env_kwargs give row"):
                rollout.play(model, tok, rollout.dataset(n=2)["prompt"])
        finally:
            rollout.close()


def test_grpo_through_the_openenv_server(tmp_path):
    with served(env_kwargs()) as (app, url):
        _grpo_through(tmp_path, app, url)


def _grpo_through(tmp_path, app, url):
    rollout = DialogueRollout(env_kwargs(), base_url=url, max_new_tokens=6, seed=0)
    try:
        trainer = _trainer(tmp_path, rollout, steps=1)
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        assert any(not torch.equal(p.detach(), before[n]) for n, p in trainer.model.named_parameters())
        shared = app.state.dialogue
        assert rollout.stats["turns"] == sum(shared.batch_sizes) > 4
        assert len(shared.batch_sizes) < rollout.stats["turns"]  # the server batched the concurrent sessions
    finally:
        rollout.close()


def test_importing_without_the_extra_names_the_install_line():
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.modules['trl'] = None\n"
            "try:\n    import dialogue_gym.integrations.trl\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])})
    assert "pip install 'dialogue-gym[integrations]'" in out.stdout, out.stderr
