"""The leaderboard: every agent trained from the same policy on the same task with the same budget, judged alike.

Run:
    python -m benchmarks.leaderboard +leaderboard=cpu     # arithmetic, SmolLM2-135M, 2-core CPU (cpu_clarify: clarify)
    python -m benchmarks.leaderboard +leaderboard=smoke   # tiny model, two agents, one seed (a minute)
    python -m benchmarks.leaderboard +leaderboard=paper   # the REFUEL protocol on GPUs (documented; not run on CPU)
    python -m benchmarks.leaderboard agents=[refuel,rebel] seeds=[0,1] budget.policy_samples=400
    python -m benchmarks.leaderboard +leaderboard=cpu jobs=8 threads=2   # 8 runs side by side on a 16-core machine
    python -m benchmarks.leaderboard +leaderboard=paper backend=submitit submitit.partition=gpu   # jobs on SLURM

Protocol (the package's files show its parts):
  1. Evaluation states (:mod:`.protocol`): the first ``eval.states`` test rows, each with its user seed stream and a
     policy seed, are made once and stored in ``<run_dir>/eval_states.jsonl``; with a sweep, the first
     ``sweep.states`` validation rows likewise in ``sweep_states.jsonl``. Every policy is evaluated from these.
  2. The initial policy (``policy``) plays every test state: the baseline of every win rate and paired difference.
  3. Budget to iterations (``budget.calibrate``, :mod:`.agents`): each agent runs one iteration with nothing capped;
     its cost as counted by the env sets its iteration count, ``floor(limit / (cost * (1 + margin)))``.
  4. Learning rates (``sweep.lrs``): per agent, one run per rate at the full budget (seed ``sweep.seed``), each
     evaluated on the validation states; when every agent's sweep is decisive each trains at its best rate by
     ``sweep.metric`` at the last turn, else all share one rate (:func:`.runner.choose_rates`).
     Every choice made by looking at results is made on validation; the test states serve the final report only.
  5. Training: each agent and seed starts from the initial policy on the same env under the same budget, counted
     by the env (:mod:`dialogue_gym.budget`). A step that would exceed it raises ``BudgetExhausted``; the policy of
     the run's last checkpoint (its last whole iteration) is then its result
     (:func:`agents.common.checkpoint.export_checkpoint_policy`).
  6. Evaluation: each trained policy plays every stored test state with the same user seeds, policy seeds and judge.
  Steps 2-6 are jobs (:mod:`.jobs`): inline, on a local process pool (``jobs > 1``) or through submitit
  (``backend: submitit``: SLURM, or its local executor); every job seeds itself, so the rows do not depend on where
  the jobs ran.
  7. Report (:mod:`.report`; ``results_dir``: <report_name>.md, .csv, _paired.csv, _states.csv, .png): win rate
     against the initial policy at each turn h, the mean turn-h score and task success by turn h, each with a 95%
     interval from the crossed bootstrap of the (seeds x states) design (:mod:`.stats`); paired differences agent -
     initial and agent - agent on the same states, each with a seed-level test and its power (mde80); the turn-1
     log-prob probe where the task has one (:mod:`.probe`); per-seed rows; cost (policy samples, optimizer steps and
     tokens, scored conversations, reward calls, wall time) with the fair-arms check. ``_states.csv`` holds every
     policy's result on every state, from which all of it is computed (``read_states``): a report can be recomputed,
     or a run extended on new seeds and compared, without the run directory.
"""

from __future__ import annotations

from agents.common.checkpoint import completed_iterations, export_checkpoint_policy
from agents.common.config import EnvSettings
from benchmarks.leaderboard.agents import (
    agent_config,
    agent_module,
    available_agents,
    calibrate,
    check_agents,
    compose_agent_config,
    train,
)
from benchmarks.leaderboard.config import (
    BudgetSettings,
    EvalProtocol,
    LeaderboardConfig,
    SubmititSettings,
    SweepSettings,
    seeds_of,
    validate,
)
from benchmarks.leaderboard.jobs import Context, Scheduler, do_job, job_threads, train_and_evaluate
from benchmarks.leaderboard.protocol import (
    AgentRun,
    Matrices,
    behaviour_matrix,
    eval_env,
    evaluate,
    play_states,
    played,
    score_matrix,
    success_matrix,
    summarize,
    turn_seed,
)
from benchmarks.leaderboard.report import merge_states, read_states, results_path, write_report, write_states
from benchmarks.leaderboard.runner import check_sweep, run
from benchmarks.leaderboard.stats import crossed_ci, crossed_interval, crossed_means, paired_difference, seed_test

__all__ = ["AgentRun", "BudgetSettings", "Context", "EnvSettings", "EvalProtocol", "LeaderboardConfig", "Matrices",
           "Scheduler", "SubmititSettings", "SweepSettings", "agent_config", "agent_module", "available_agents",
           "behaviour_matrix", "calibrate", "check_agents", "check_sweep", "completed_iterations",
           "compose_agent_config", "crossed_ci", "crossed_interval", "crossed_means", "do_job", "eval_env",
           "evaluate", "export_checkpoint_policy", "job_threads", "merge_states", "paired_difference", "play_states",
           "played", "read_states", "results_path", "run", "score_matrix", "seed_test", "seeds_of", "success_matrix",
           "summarize", "train", "train_and_evaluate", "turn_seed", "validate", "write_report", "write_states"]
