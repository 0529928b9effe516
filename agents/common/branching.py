"""The branching primitive every agent and the evaluation use: roll in to turn h, fork k branches, complete each
to its horizon, let the env score it.

One code path for "identical rollouts". REFUEL and REBEL (k = 2), online DPO (k = n), PPO (k = 1 from turn 1)
and the evaluation (k = 1 from a task row or a stored state, every turn scored) all call :func:`grow` with a
:class:`Plan`; they differ only in the plan and in what they read off the resulting :class:`Tree` s.

The rules, each written once here:

- **Rows.** :func:`draw_rows` draws the task rows of an iteration without replacement (a permutation of the
  rows; when more dialogues than rows are asked for, whole permutations follow one another), so one iteration
  never trains on the same context twice while unused rows remain.
- **Draw order.** :func:`plan_dialogues` draws from the caller's generator, in this order and for the whole
  iteration at once: the rows, the (H', h) of every dialogue, then one env seed and one policy seed per
  dialogue. Nothing else draws from it.
- **Seeds.** Dialogue ``i`` resets its row with its own env seed (the user's random stream), and the policy
  samples its reply at absolute turn ``t`` of branch ``j`` with :func:`policy_turn_seed` of the dialogue's policy
  seed. Branch 0 continues the roll-in's stream, so with k = 1 a dialogue is exactly the one a plain play would
  give; branch ``j > 0`` gets a stream of its own (and the env forks the user's stream per branch).
- **Chunking.** :func:`grow` runs the plan ``rollin.num_envs`` dialogues at a time (``rollout_batch``), in plan
  order; the last chunk may be smaller. Because every draw is made before the first chunk and every seed is
  per dialogue, the trees do not depend on the chunk size (up to the float rounding that batching can bring).
- **Blank replies.** :func:`action_text`: a reply that is only whitespace is sent to the env as ``"..."``.
- **Progress.** :func:`grow` reports after every batched policy step (each turn of a chunk), counting policy
  replies against the plan's most (a branch the user or the task ends early counts its unplayed turns as done),
  with the policy's tokens per second.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from agents.common.batching import Reply
from agents.common.pairs import TurnMode, sample_turn
from dialogue_gym.conversation import DialogueState, Message
from dialogue_gym.generation.base import Generation, GenerationEngine, SamplingParams
from dialogue_gym.progress import Progress
from dialogue_gym.vector import DialogueVectorEnv, VectorObs

BLANK_REPLY = "..."
PROGRESS_INTERVAL_S = 10.0  # log mode: at most one progress line per this many seconds (a bar moves every step)
PREFIXES = ("on_policy", "dataset")


def action_text(generation: Generation) -> str:
    """The env action for a generation: its text, or ``"..."`` when the policy emitted only whitespace (a blank
    reply still takes its turn; the env rejects empty actions)."""
    return generation.text if generation.text.strip() else BLANK_REPLY


def policy_turn_seed(policy_seed: int, turn: int, branch: int = 0) -> int:
    """The policy's sampling seed at absolute turn ``turn`` (assistant turns taken so far) of branch ``branch``.

    Branch 0 is ``default_rng([policy_seed, turn])`` (the leaderboard's per-turn seed of a stored state), so it
    does not depend on batching; branch ``j > 0`` adds ``j`` to the key.
    """
    key = [int(policy_seed), int(turn)] + ([int(branch)] if branch else [])
    return int(np.random.default_rng(key).integers(0, 2**63 - 1))


def draw_rows(rng: np.random.Generator, n: int, n_rows: int) -> list[int]:
    """``n`` task rows without replacement: whole permutations of ``range(n_rows)`` one after another."""
    if n_rows < 1:
        raise ValueError(f"the task split has {n_rows} rows; at least 1 is needed")
    out: list[int] = []
    while len(out) < n:
        out += [int(r) for r in rng.permutation(n_rows)[: n - len(out)]]
    return out


@dataclass(frozen=True)
class Start:
    """Where one dialogue begins: a task row (reset with ``env_seed``) or a stored state (its own RNG).

    Attributes:
        policy_seed: the dialogue's policy stream (see :func:`policy_turn_seed`).
        row: task row index, or None when ``state`` is given.
        env_seed: the reset seed of the row (the user's random stream); ignored for a state.
        state: a mid-conversation state to start from (e.g. a leaderboard evaluation state).
    """

    policy_seed: int
    row: int | None = None
    env_seed: int | None = None
    state: DialogueState | None = None

    def __post_init__(self) -> None:
        if (self.row is None) == (self.state is None):
            raise ValueError("a Start needs exactly one of row and state")


@dataclass
class Plan:
    """What :func:`grow` plays: per dialogue its start, the turn h to branch at and the horizon H'.

    Attributes:
        starts: one per dialogue.
        turns: h >= 1 per dialogue (absolute: h = 1 branches at the start's own prefix when it is a fresh row).
            A dialogue the user ends earlier is branched at the last turn it reached.
        horizons: H' per dialogue, an absolute turn count; each branch is completed to ``max(H', h)``.
            Use ``h`` itself (``complete=False``) to end every branch right after its turn-h reply.
        k: branches per dialogue.
        complete: False ends every branch right after the turn-h reply (immediate reward), whatever H' says.
        futures: m >= 1 continuations per branch (CollabLLM's multiturn-aware reward): the branch's turn-h reply
            is sent on m forks of s_h, each completed to the horizon, and the branch's reward is the mean of
            their m final scores. 1: one continuation, the branch itself.
    """

    starts: list[Start]
    turns: list[int]
    horizons: list[int]
    k: int = 2
    complete: bool = True
    futures: int = 1

    def __post_init__(self) -> None:
        if not len(self.starts) == len(self.turns) == len(self.horizons):
            raise ValueError(f"a plan needs one turn and one horizon per start; got {len(self.starts)} starts, "
                             f"{len(self.turns)} turns, {len(self.horizons)} horizons")
        if self.k < 1:
            raise ValueError(f"k (branches per dialogue) must be >= 1, got {self.k}")
        if self.futures < 1:
            raise ValueError(f"futures (continuations per branch) must be >= 1, got {self.futures}")
        if self.futures > 1 and not self.complete:
            raise ValueError(f"futures={self.futures} continuations need complete=True (a branch that ends after its "
                             "turn-h reply has no future to sample)")


def plan_dialogues(rng: np.random.Generator, dialogues: int, n_rows: int, max_turns: int, turn_sampling: TurnMode,
                   prefix: str = "on_policy", future: bool = True, k: int = 2, futures: int = 1) -> Plan:
    """The plan of one iteration, drawn from ``rng`` in the documented order (module docstring).

    Args:
        dialogues: how many dialogues (contexts) the iteration branches.
        n_rows: rows of the task split.
        max_turns: the env's horizon H.
        turn_sampling: ``reference`` or ``uniform`` (:func:`agents.common.pairs.sample_turn`).
        prefix: ``on_policy`` rolls in with the policy to the drawn h; ``dataset`` branches at the row's own
            prefix (h = the row's turn + 1).
        future: complete each branch to H' (REFUEL's Q estimate); False ends it after the turn-h reply.
        k: branches per dialogue.
        futures: continuations per branch (:class:`Plan`); draws nothing, so the plan's draws do not depend on it.
    """
    if prefix not in PREFIXES:
        raise ValueError(f"prefix is {prefix!r}; allowed: {', '.join(PREFIXES)}")
    rows = draw_rows(rng, dialogues, n_rows)
    drawn = [sample_turn(rng, max_turns, turn_sampling) for _ in range(dialogues)]
    env_seeds = [int(s) for s in rng.integers(0, 2**31, size=dialogues)]
    policy_seeds = [int(s) for s in rng.integers(0, 2**63 - 1, size=dialogues)]
    starts = [Start(policy_seed=p, row=r, env_seed=e) for r, e, p in zip(rows, env_seeds, policy_seeds)]
    turns = [h for _, h in drawn] if prefix == "on_policy" else [1] * dialogues
    return Plan(starts, turns, [hp for hp, _ in drawn], k=k, complete=future, futures=futures)


@dataclass
class Branch:
    """One continuation from a forked state.

    Attributes:
        reply: the policy's first reply on this branch (the turn-h action), token-exact.
        reward: the env's reward after the branch's last reply (the terminal score in ``terminal`` mode).
        messages: the whole conversation at the end of the branch.
        turns: assistant turns taken on this branch.
        replies: every policy reply on the branch, in order (PPO trains on all of them).
        rewards: the env reward after each of those replies.
        scores: the raw score of each turn when the env scored it, else NaN (every turn in ``per_turn`` mode).
        final: the env state at the end of the branch (``terminated``/``truncated``, fingerprint).
        futures: with m > 1 continuations (:class:`Plan` ``futures``), the final score of each; ``reward`` is their
            mean, and ``messages``, ``replies``, ``rewards``, ``scores``, ``final`` are continuation 0's. Empty
            with m = 1.
    """

    reply: Reply
    reward: float
    messages: list[dict[str, str]]
    turns: int
    replies: list[Reply] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    final: DialogueState | None = None
    futures: list[float] = field(default_factory=list)


@dataclass
class Tree:
    """One dialogue of a plan: the state s_h it was branched at, its turn h, its k branches, and how many policy
    replies the roll-in to s_h sampled."""

    state: DialogueState
    turn: int
    branches: list[Branch]
    rollin_replies: int = 0

    @property
    def policy_samples(self) -> int:
        """Every policy reply this dialogue cost: the roll-in's and every branch's."""
        return self.rollin_replies + sum(b.turns for b in self.branches)


class StepMeter:
    """Per-step progress of :func:`grow`: policy replies done out of the plan's most, tokens per second.

    Args:
        bar: the :class:`~dialogue_gym.progress.Progress` counting replies (its ``total`` is the plan's most).
    """

    def __init__(self, bar: Progress):
        self.bar = bar
        self.tokens = 0
        self.limit = 0  # the count at the end of the current chunk: steps inside a chunk never pass it
        self._start = time.monotonic()

    def step(self, gens: Sequence[Generation | None], phase: str, turn: int, skipped: int = 0) -> None:
        """Count one batched policy step: its replies, plus ``skipped`` planned replies that will not be played."""
        self.tokens += sum(len(g.token_ids) for g in gens if g is not None)
        done = sum(g is not None for g in gens) + skipped
        elapsed = max(time.monotonic() - self._start, 1e-9)
        self.bar.set_postfix(phase=phase, turn=turn, tokens=self.tokens, tokens_per_s=round(self.tokens / elapsed, 1))
        self.bar.update(max(0, min(done, self.limit - self.bar.n)))

    def finish_chunk(self) -> None:
        """The chunk is over: the count moves to its planned end (turns not played included)."""
        self.bar.update(max(0, self.limit - self.bar.n))


def planned_replies(plan: Plan, turns: int) -> list[int]:
    """The most policy replies each dialogue of ``plan`` can cost in an env of ``turns`` turns: the roll-in to turn
    h, then ``k`` branches (each played ``futures`` times) from h to their horizon (or h alone with
    ``complete=False``). A start's own earlier
    turns and dialogues ended early only lower the real count."""
    out = []
    for start, h, hp in zip(plan.starts, plan.turns, plan.horizons):
        first = start.state.turn if start.state is not None else 0
        h = min(max(h, first + 1), turns)
        last = min(max(hp, h), turns) if plan.complete else h
        out.append((h - 1 - first) + plan.k * plan.futures * (last - h + 1))
    return out


def act(engine: GenerationEngine, observations: Sequence[Sequence[Message]], seeds: Sequence[int | None],
        params: SamplingParams) -> list[Generation | None]:
    """One batched policy call for the sub-envs with a seed; None (sit out) for the others."""
    seeded = [(i, s) for i, s in enumerate(seeds) if s is not None]
    idx = [i for i, _ in seeded]
    gens = engine.generate([observations[i] for i in idx], params, seeds=[s for _, s in seeded],
                           return_logprobs=True) if idx else []
    out: list[Generation | None] = [None] * len(seeds)
    for i, g in zip(idx, gens):
        out[i] = g
    return out


def _reset_to_starts(venv: DialogueVectorEnv, starts: Sequence[Start]) -> VectorObs:
    """Reset a DISABLED vector env to the starts; spare sub-envs repeat the last start and only sit out."""
    padded = list(starts) + [starts[-1]] * (venv.num_envs - len(starts))
    if all(s.state is not None for s in starts):
        return venv.reset(options={"states": [s.state for s in padded]})[0]
    if any(s.state is not None for s in starts):
        raise ValueError("a plan's starts must be all task rows or all states")
    return venv.reset(seed=[s.env_seed for s in padded], options={"task_indices": [s.row for s in padded]})[0]


def roll_in(venv: DialogueVectorEnv, engine: GenerationEngine, params: SamplingParams, starts: Sequence[Start],
            turns: Sequence[int], meter: StepMeter | None = None) -> list[tuple[DialogueState, int, int]]:
    """Play each start with the policy until it reaches turn ``turns[i]``; return ``(s_h, h, replies sampled)``
    per dialogue. ``meter`` (optional) counts each batched step."""
    if len(starts) > venv.num_envs:
        raise ValueError(f"{len(starts)} dialogues for a vector env of {venv.num_envs}")
    obs = _reset_to_starts(venv, starts)
    states = venv.get_states()
    reached = states[: len(starts)]
    sampled = [0] * len(starts)
    while True:
        seeds = [policy_turn_seed(starts[i].policy_seed, states[i].turn)
                 if i < len(starts) and not states[i].done and states[i].turn < turns[i] - 1 else None
                 for i in range(venv.num_envs)]
        if all(s is None for s in seeds):
            break
        gens = act(engine, obs, seeds, params)
        obs, *_ = venv.step([action_text(g) if g is not None else None for g in gens])
        if meter is not None:
            meter.step(gens, "roll-in", 1 + max(states[i].turn for i, s in enumerate(seeds) if s is not None))
        for i in range(len(starts)):
            sampled[i] += gens[i] is not None
        states = venv.get_states()
        for i in range(len(starts)):
            if not states[i].done:
                reached[i] = states[i]
    return [(s, s.turn + 1, n) for s, n in zip(reached, sampled)]


def fork(venv: DialogueVectorEnv, engine: GenerationEngine, params: SamplingParams, states: Sequence[DialogueState],
         policy_seeds: Sequence[int], k: int, horizons: Sequence[int], futures: int = 1, meter: StepMeter | None = None
         ) -> list[list[Branch]]:
    """Branch each state ``k`` times and complete every branch to its horizon (its own ``max_turns``).
    ``meter`` (optional) counts each batched step, and a branch that ends before its horizon as done.

    With ``futures = m > 1`` each branch is played on m sub-envs reset to the same state: the first samples the
    branch's turn-h reply and the other m − 1 send that same reply (a copy, not a sample), then all m are completed
    independently (each user reply and each later policy reply its own draw: the env forks the user's stream per
    repeat of a state, and continuation ``c`` samples with branch key ``j + k·c``). The branch's reward is the mean
    of the m final scores (CollabLLM's multiturn-aware reward). Sub-env ``(i·m + c)·k + j`` plays continuation
    ``c`` of branch ``j`` of state ``i``, so continuation 0 of every branch is exactly the plain branch (same
    sub-env fork index, same seeds), and m = 1 is k plain branches. The env counts every continuation's turns as
    stepped, the m − 1 copied turn-h replies included.

    Returns:
        ``branches[i][j]``: branch ``j`` of state ``i``.
    """
    m = futures
    n = len(states) * k * m
    if n > venv.num_envs:
        raise ValueError(f"{len(states)} states x {k} branches x {m} continuations need {n} sub-envs; the vector "
                         f"env has {venv.num_envs}")
    starts: list[DialogueState] = []
    for i, s in enumerate(states):
        s = s.copy()
        s.max_turns = int(horizons[i])
        starts += [s] * (k * m)
    # spare sub-envs repeat the last branch's state (later fork indices, so they change no real branch); they
    # sit every step out
    obs, _ = venv.reset(options={"states": starts + [starts[-1]] * (venv.num_envs - n)})
    replies: list[list[Reply]] = [[] for _ in range(n)]
    rewards: list[list[float]] = [[] for _ in range(n)]
    scores: list[list[float]] = [[] for _ in range(n)]
    final = [0.0] * n
    done = [False] * n
    first = True
    while not all(done):
        turn_now = [s.turn for s in venv.get_states()]
        # sub-env b plays continuation c = (b % (k·m)) // k of branch j = b % k: its seed key is b % (k·m)
        seeds = [policy_turn_seed(policy_seeds[b // (k * m)], turn_now[b], b % (k * m))
                 if b < n and not done[b] and not (first and b % (k * m) >= k) else None
                 for b in range(venv.num_envs)]
        gens = act(engine, obs, seeds, params)
        if first:  # continuations c > 0 send continuation 0's turn-h reply
            gens = [gens[b - (b % (k * m)) // k * k] if b < n else g for b, g in enumerate(gens)]
            first = False
        obs, r, term, trunc, info = venv.step([action_text(g) if g is not None else None for g in gens])
        scored = info.get("_score", np.zeros(venv.num_envs, dtype=bool))
        skipped = 0  # turns the branches that ended now will not play
        for b in range(n):
            if gens[b] is None:
                continue
            replies[b].append(Reply.from_generation(gens[b]))
            rewards[b].append(float(r[b]))
            scores[b].append(float(info["score"][b]) if scored[b] else float("nan"))
            if term[b] or trunc[b]:
                done[b], final[b] = True, float(r[b])
                skipped += max(0, int(horizons[b // (k * m)]) - turn_now[b] - 1)
        if meter is not None:
            meter.step(gens, "branches", 1 + max(turn_now[b] for b in range(n) if gens[b] is not None), skipped)
    end_states = venv.get_states()
    out: list[list[Branch]] = []
    for i in range(len(states)):
        row = []
        for j in range(k):
            b = i * k * m + j  # continuation 0
            group = range(b, b + k * m, k)
            row.append(Branch(reply=replies[b][0], reward=float(np.mean([final[c] for c in group])),
                              messages=end_states[b].messages, turns=sum(len(replies[c]) for c in group),
                              replies=replies[b], rewards=rewards[b], scores=scores[b], final=end_states[b],
                              futures=[final[c] for c in group] if m > 1 else []))
        out.append(row)
    return out


def grow(rollin: DialogueVectorEnv, branches: DialogueVectorEnv, engine: GenerationEngine, params: SamplingParams,
         plan: Plan) -> list[Tree]:
    """Run a plan: roll in, fork ``plan.k`` branches, complete each to its horizon; the env scores every branch.

    Args:
        rollin: a DialogueVectorEnv in DISABLED autoreset mode; its ``num_envs`` is the chunk size.
        branches: a DialogueVectorEnv in DISABLED mode with at least ``plan.k * plan.futures * rollin.num_envs``
            sub-envs, in the reward mode the caller wants scored (``terminal`` for a return at the horizon,
            ``per_turn`` for evaluation). It may be ``rollin`` itself when ``plan.k == 1``.

    Returns:
        One :class:`Tree` per dialogue, in plan order.
    """
    width = plan.k * plan.futures
    if branches.num_envs < width * rollin.num_envs:
        each = f"{plan.k} branches" + (f" x {plan.futures} continuations" if plan.futures > 1 else "")
        raise ValueError(f"the branch env has {branches.num_envs} sub-envs; {each} of {rollin.num_envs} dialogues "
                         f"need {width * rollin.num_envs}")
    size = rollin.num_envs
    out: list[Tree] = []
    most = planned_replies(plan, rollin.max_turns)
    chunks = -(-len(plan.starts) // size)
    desc = f"rollouts ({len(plan.starts)} dialogues x {plan.k}, {chunks} chunk{'s' if chunks > 1 else ''} of {size})"
    with Progress(total=sum(most), desc=desc, unit="policy replies", interval=PROGRESS_INTERVAL_S) as bar:
        meter = StepMeter(bar)
        for lo in range(0, len(plan.starts), size):
            starts = plan.starts[lo:lo + size]
            meter.limit = sum(most[:lo + size])
            reached = roll_in(rollin, engine, params, starts, plan.turns[lo:lo + size], meter)
            horizons = [max(hp, h) if plan.complete else h
                        for hp, (_, h, _) in zip(plan.horizons[lo:lo + size], reached)]
            tree = fork(branches, engine, params, [s for s, _, _ in reached], [s.policy_seed for s in starts],
                        plan.k, horizons, plan.futures, meter)
            meter.finish_chunk()
            out += [Tree(s, h, row, n) for (s, h, n), row in zip(reached, tree)]
    return out
