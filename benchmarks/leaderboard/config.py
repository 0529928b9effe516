"""The leaderboard's settings (``conf/leaderboard.yaml`` is merged over them) and their checks."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from agents.common.config import ConfigError, check
from dialogue_gym.budget import LIMITS
from dialogue_gym.config import EnvConfig

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = str(ROOT / "conf")
BACKENDS = ("local", "submitit")
SCHEDULES = ("longest", "seeds")
METRICS = ("auto", "success", "score")


@dataclass
class BudgetSettings:
    """The training budget every agent gets, counted by the env in its training (``train`` split) envs."""

    policy_samples: int | None = 256  # assistant turns an agent may step while training (null: no limit)
    scored_conversations: int | None = None  # conversations the reward model may score while training (null: none)
    optimizer_steps: int | None = None  # optimizer steps an agent may take while training (null: no limit)
    calibrate: bool = True  # set each agent's iterations from one measured iteration; false: the agent's own
    margin: float = 0.1  # calibration headroom: iterations = floor(limit / (cost per iteration * (1 + margin)))
    max_iterations: int = 100  # upper bound on calibrated iterations


@dataclass
class EvalProtocol:
    """The evaluation every trained policy gets."""

    states: int = 64  # stored evaluation states (the first rows of the test split)
    seed: int = 1234  # seeds the user seed streams and policy seeds of the stored states
    temperature: float = 0.0  # policy temperature at evaluation (0 = greedy)
    reward: str | None = None  # the judge: a reward spec for the eval env; null = the env's own reward
    n_boot: int = 2000  # crossed bootstrap replicates (seeds and one shared resample of states) per interval
    probe_samples: int = 8  # turn-1 probe (tasks with asks(reply)): replies the initial policy samples per state
    probe_keep: int = 2  # turn-1 probe: replies kept per state and class (asks / the rest; leaderboard/probe.py)


@dataclass
class SweepSettings:
    """Each agent's learning rate chosen on the validation split, at the same budget as its real runs."""

    lrs: list[float] = field(default_factory=list)  # rates tried per agent (ties: the one listed first; empty: own lr)
    seed: int = 1000  # training seed of the sweep runs (kept apart from the reported seeds)
    states: int = 32  # stored validation states every sweep run is evaluated on
    metric: str = "auto"  # chosen by its mean at the last turn: success (verifier), score, or auto (success if any)


@dataclass
class SubmititSettings:
    """Where ``backend: submitit`` sends the jobs (submitit's AutoExecutor)."""

    cluster: str | None = None  # null: SLURM when available, else local; "local" or "debug" force those
    folder: str = "submitit"  # job logs and pickles, relative to the run directory
    timeout_min: int = 240  # wall-clock limit per job
    partition: str | None = None  # SLURM partition (null: the cluster's default)
    gpus_per_node: int | None = None  # GPUs per job; null: 1 when this machine's device is CUDA, else 0
    cpus_per_task: int = 2  # CPU cores per job
    mem_gb: int = 16  # memory per job


@dataclass
class LeaderboardConfig:
    """Leaderboard settings (``conf/leaderboard.yaml`` is merged over them)."""

    agents: list[str] = field(default_factory=lambda: ["refuel", "rebel", "dpo", "ppo"])  # agents.<name> packages
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])  # training seeds per agent
    agent_seeds: dict[str, int] = field(default_factory=dict)  # agent -> N: it runs only the first N of seeds (a
    # costly arm at fewer seeds; agents are compared on the seeds they share)
    policy: str = "embedded"  # the initial policy of every agent, and the baseline of the win rates
    policy_engine: str = "hf"  # where every policy samples, in training (policy.engine) and evaluation: hf or vllm
    policy_engine_memory: float = 0.15  # with vllm: the engine's share of device memory (policy.engine_memory)
    env: EnvConfig = field(default_factory=EnvConfig)  # task, user, reward of training and evaluation
    max_new_tokens: int = 64  # policy reply cap, in training and evaluation, for every agent
    temperature: float | None = None  # policy sampling temperature in training for every agent; null: each agent's
    budget: BudgetSettings = field(default_factory=BudgetSettings)  # equal training budget
    eval: EvalProtocol = field(default_factory=EvalProtocol)  # fixed evaluation protocol
    sweep: SweepSettings = field(default_factory=SweepSettings)  # learning rates chosen on the validation split
    agent_eval_dialogues: int = 1  # size of each agent's own in-run evaluation (the leaderboard evaluates anyway)
    overrides: dict[str, list[str]] = field(default_factory=dict)  # Hydra overrides per agent, e.g. {dpo: [n=4]}
    arms: dict[str, str] = field(default_factory=dict)  # arm name -> agent package, for a second arm of one agent
    # under its own name and overrides, e.g. {dpo_last: dpo} with overrides.dpo_last: [mode=offline, ...]
    results_dir: str = "benchmarks/results"  # where the report files are written
    report_name: str = "leaderboard"  # report file names: <report_name>.md, .csv, _paired.csv, _states.csv, .png
    threads: int | None = None  # torch CPU threads per process (null: the cores shared out among the jobs)
    jobs: int = 1  # jobs side by side (1 with backend local: one after another, inline)
    schedule: str = "longest"  # order of the agent runs: longest (the longest expected run first: the shortest
    # total time) or seeds (every agent at a seed before any agent at the next seed, so that an interrupted
    # leaderboard leaves its agents compared on the same seeds)
    backend: str = "local"  # where jobs run: local (a process pool on this machine) or submitit (SLURM, local)
    submitit: SubmititSettings = field(default_factory=SubmititSettings)  # used by backend: submitit
    title: str = "Leaderboard"  # heading of the Markdown report
    notes: str = ""  # free text added to the report (e.g. how the run went)
    run_dir: str = "."  # working directory: stores, agent runs (Hydra's run dir)


def seeds_of(cfg: LeaderboardConfig, agent: str) -> list[int]:
    """The training seeds ``agent`` runs: the first ``agent_seeds[agent]`` of ``seeds``, or all of them."""
    return list(cfg.seeds)[:cfg.agent_seeds.get(agent, len(cfg.seeds))]


def validate(cfg: LeaderboardConfig) -> None:
    """Range checks before any model loads (the agents' names and overrides are checked by the caller)."""
    check(len(cfg.agents) >= 1, "agents must name at least one agent (refuel, rebel, dpo, ppo)")
    check(len(set(cfg.agents)) == len(cfg.agents), f"agents has duplicates: {cfg.agents}")
    check(len(cfg.seeds) >= 1 and len(set(cfg.seeds)) == len(cfg.seeds),
          f"seeds must be a non-empty list of distinct integers, got {cfg.seeds}")
    for name, n in cfg.agent_seeds.items():
        check(name in cfg.agents, f"agent_seeds names {name!r}, which is not in agents {list(cfg.agents)}")
        check(1 <= n <= len(cfg.seeds), f"agent_seeds.{name} must be between 1 and len(seeds) = {len(cfg.seeds)} "
                                        f"(it runs the first N seeds), got {n}")
    b = cfg.budget
    for name in LIMITS:
        v = getattr(b, name)
        check(v is None or v >= 1, f"budget.{name} must be >= 1 or null (no limit), got {v}")
    check(any(getattr(b, n) is not None for n in LIMITS),
          f"budget: set at least one of {', '.join('budget.' + n for n in LIMITS)}; an unlimited budget is no budget")
    check(b.margin >= 0, f"budget.margin must be >= 0, got {b.margin}")
    check(b.max_iterations >= 1, f"budget.max_iterations must be >= 1, got {b.max_iterations}")
    check(cfg.eval.states >= 1, f"eval.states must be >= 1, got {cfg.eval.states}")
    check(cfg.eval.temperature >= 0, f"eval.temperature must be >= 0 (0 = greedy), got {cfg.eval.temperature}")
    check(cfg.eval.n_boot >= 100, f"eval.n_boot must be >= 100, got {cfg.eval.n_boot}")
    check(cfg.eval.probe_samples >= 1, f"eval.probe_samples must be >= 1, got {cfg.eval.probe_samples}")
    check(cfg.eval.probe_keep >= 1, f"eval.probe_keep must be >= 1, got {cfg.eval.probe_keep}")
    check(cfg.max_new_tokens >= 1, f"max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    check(cfg.policy_engine in ("hf", "vllm"), f"policy_engine is {cfg.policy_engine!r}; allowed: hf, vllm")
    check(0 < cfg.policy_engine_memory <= 1,
          f"policy_engine_memory must be in (0, 1], got {cfg.policy_engine_memory}")
    check(cfg.temperature is None or cfg.temperature > 0,
          f"temperature must be > 0 (on-policy sampling) or null (each agent's own), got {cfg.temperature}")
    check(cfg.agent_eval_dialogues >= 1, f"agent_eval_dialogues must be >= 1, got {cfg.agent_eval_dialogues}")
    check(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1 or null (torch's default), got {cfg.threads}")
    check(cfg.jobs >= 1, f"jobs must be >= 1 (processes running agent runs side by side), got {cfg.jobs}")
    check(cfg.backend in BACKENDS, f"backend is {cfg.backend!r}; allowed: {', '.join(BACKENDS)}")
    check(cfg.schedule in SCHEDULES, f"schedule is {cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    check(bool(cfg.report_name) and "/" not in cfg.report_name,
          f"report_name must be a plain file name stem, got {cfg.report_name!r}")
    s = cfg.sweep
    check(all(lr > 0 for lr in s.lrs) and len(set(s.lrs)) == len(s.lrs),
          f"sweep.lrs must be distinct learning rates > 0 (or empty: no sweep), got {list(s.lrs)}")
    check(s.states >= 1, f"sweep.states must be >= 1, got {s.states}")
    check(s.metric in METRICS, f"sweep.metric is {s.metric!r}; allowed: {', '.join(METRICS)}")
    check(s.seed not in cfg.seeds or not s.lrs,
          f"sweep.seed {s.seed} is one of the reported seeds {list(cfg.seeds)}; keep the sweep's run apart")
    if cfg.backend == "submitit":
        try:
            import submitit  # noqa: F401
        except ImportError:
            raise ConfigError("backend: submitit needs the submitit package: pip install 'dialogue-gym[cluster]'"
                              ) from None
        check(cfg.submitit.cluster in (None, "local", "debug", "slurm"),
              f"submitit.cluster is {cfg.submitit.cluster!r}; allowed: null, local, debug, slurm")
        check(cfg.submitit.timeout_min >= 1, f"submitit.timeout_min must be >= 1, got {cfg.submitit.timeout_min}")
        gpus = cfg.submitit.gpus_per_node
        check(gpus is None or gpus >= 0, f"submitit.gpus_per_node must be >= 0 or null, got {gpus}")
