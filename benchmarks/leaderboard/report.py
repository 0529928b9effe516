"""The report: ``<name>.csv`` (every row, per seed and pooled), ``<name>_paired.csv`` (paired differences),
``<name>_states.csv`` (every policy's result on every state: what the other two are computed from), ``<name>.png``
(win rate vs turn) and ``<name>.md``, with the machine from :func:`benchmarks.machine.machine_info`."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.leaderboard.agents import limit_text
from benchmarks.leaderboard.config import ROOT, LeaderboardConfig, seeds_of
from benchmarks.leaderboard.protocol import AgentRun, Matrices
from benchmarks.machine import machine_info

CSV_FIELDS = ("policy", "seed", "turn", "win", "win_lo", "win_hi", "score", "score_lo", "score_hi", "success",
              "success_lo", "success_hi", "asks", "asks_lo", "asks_hi", "lr", "runs", "iterations", "completed",
              "stopped_by_budget", "policy_samples", "policy_tokens", "scored_conversations", "reward_calls",
              "optimizer_steps", "train_s", "eval_s")
FAIR = 0.05  # arms are fair when their policy samples and optimizer steps are within 5% of each other
PAIRED_FIELDS = ("a", "b", "metric", "turn", "diff", "lo", "hi", "se", "df", "mde80", "excludes_0", "seeds", "seed_lo",
                 "seed_hi", "seed_p", "seed_sd", "on_seeds")
STATE_METRICS = ("score", "win", "success", "asks")  # per (policy, seed, state, turn); "probe" at turn 1 only
STATE_FIELDS = ("policy", "seed", "state", "turn", *STATE_METRICS, "probe")
DIGEST_FIELD = "probe_replies"  # on the initial policy's rows: the probe's replies_digest (files before it lack it)


def results_path(cfg: LeaderboardConfig) -> Path:
    """``results_dir``; a relative path is taken from the repository root."""
    path = Path(cfg.results_dir).expanduser()
    return path if path.is_absolute() else ROOT / path


def _write_csv(path: Path, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{v:.4g}" if k == "lr" and v else f"{v:.4f}" if isinstance(v, float) else v)
                             for k, v in r.items()})


def write_states(path: Path, mats: Matrices) -> None:
    """``<report_name>_states.csv``: one row per (policy, seed, state, turn) with every metric of ``mats`` (blank
    where a policy lacks it), the probe's change at turn 1 on the states it covers (blank elsewhere); the initial
    policy's seed is blank; the initial policy's rows carry the probe's replies digest (``DIGEST_FIELD``). Floats are
    written in full (``repr``): :func:`read_states` gives ``mats`` back exactly."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow((*STATE_FIELDS, DIGEST_FIELD))
        for policy, group in mats.groups.items():
            seeds = [""] if policy == "initial" else mats.seeds[policy]
            where = np.cumsum(mats.covered) - 1  # a state's column in the probe matrix, where covered
            for k, seed in enumerate(seeds):
                for j, state in enumerate(mats.states):
                    for h in range(next(v.shape[2] for m, v in group.items() if m != "probe")):
                        cells = [repr(float(group[m][k, j, h])) if m in group else "" for m in STATE_METRICS]
                        probe = repr(float(group["probe"][k, where[j], 0])) \
                            if "probe" in group and h == 0 and mats.covered[j] else ""
                        digest = (mats.probe_replies or "") if policy == "initial" else ""
                        writer.writerow([policy, seed, state, h + 1, *cells, probe, digest])


def read_states(path: Path) -> Matrices:
    """The :class:`Matrices` of a ``<report_name>_states.csv`` (:func:`write_states`): ``paired_rows(m.groups,
    m.seeds, n_boot)`` and ``metric_rows`` recompute the report's numbers from it.

    Raises:
        ValueError: the file lacks a column, or a policy lacks a (seed, state, turn) row another policy has (a cut or
            edited file), or its rows name two probe digests, naming the file and what is wrong.
    """
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in STATE_FIELDS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: not a leaderboard states file: columns {missing} are missing (expected "
                             f"{', '.join(STATE_FIELDS)})")
        table = list(reader)
    if not table:
        raise ValueError(f"{path}: the states file has no rows")
    policies = list(dict.fromkeys(r["policy"] for r in table))
    states = list(dict.fromkeys(r["state"] for r in table))
    turns = max(int(r["turn"]) for r in table)
    digests = sorted({r.get(DIGEST_FIELD) or "" for r in table} - {""})  # none in a file from before the digest
    if len(digests) > 1:
        raise ValueError(f"{path}: the rows name {len(digests)} probe replies digests ({', '.join(digests)}) where "
                         "one run has one: the file is edited or two files were concatenated")
    covered = [False] * len(states)
    for r in table:
        if r["probe"]:
            covered[states.index(r["state"])] = True
    col = np.cumsum(covered) - 1
    groups: dict[str, dict[str, np.ndarray]] = {}
    seeds: dict[str, list[int]] = {}
    for policy in policies:
        mine = [r for r in table if r["policy"] == policy]
        order = list(dict.fromkeys(r["seed"] for r in mine))
        if policy != "initial":
            seeds[policy] = [int(s) for s in order]
        group = {m: np.zeros((len(order), len(states), turns)) for m in STATE_METRICS if mine[0][m]}
        if any(r["probe"] for r in mine):
            group["probe"] = np.zeros((len(order), sum(covered), 1))
        cells = {(r["seed"], r["state"], r["turn"]) for r in mine}
        if len(cells) != len(mine) or len(cells) != len(order) * len(states) * turns:
            raise ValueError(f"{path}: policy {policy!r} has {len(mine)} rows ({len(cells)} distinct) where its "
                             f"{len(order)} seed(s) x {len(states)} states x {turns} turns need one each: the file is "
                             "cut or edited")
        for r in mine:
            k, j, h = order.index(r["seed"]), states.index(r["state"]), int(r["turn"]) - 1
            for m in STATE_METRICS:
                if m in group:
                    group[m][k, j, h] = float(r[m])
            if r["probe"]:
                group["probe"][k, col[j], 0] = float(r["probe"])
        groups[policy] = group
    return Matrices(groups, seeds, states, covered, digests[0] if digests else None)


def merge_states(first: Matrices, second: Matrices) -> Matrices:
    """Two runs of one design pooled: the same stored states, the same initial policy's results on them; an agent
    in both gets the seeds of both (a seed in both is an error: the same seed twice is not two seeds).

    For a leaderboard continued on new seeds in another run directory (another session's machine): read both
    ``_states.csv`` files (:func:`read_states`), merge, and compute ``paired_rows`` on the result.

    The probe's replies are compared by digest where both runs have one (a states file written before the digest
    existed has none; :mod:`benchmarks.leaderboard.pool` says which files went unchecked); the pooled matrices keep
    the digest that is known.

    Raises:
        ValueError: the states differ, the initial policy's results differ, the probe's replies differ, or an agent
            ran a seed in both.
    """
    if first.states != second.states or first.covered != second.covered:
        raise ValueError("merge_states: the two runs were evaluated on different stored states (or probe states); "
                         "only runs of one design, with the same eval.states and eval.seed, can be pooled")
    a, b = first.groups["initial"], second.groups["initial"]
    if a.keys() != b.keys() or any(not np.array_equal(a[m], b[m]) for m in a):
        raise ValueError("merge_states: the initial policy's results differ between the two runs (another policy, "
                         "engine or machine numerics): their agents' differences from it would not be comparable")
    if first.probe_replies and second.probe_replies and first.probe_replies != second.probe_replies:
        raise ValueError(f"merge_states: the probe's replies differ between the two runs (digest "
                         f"{first.probe_replies} vs {second.probe_replies}): each run's probe change is measured on "
                         "its own replies, so the two cannot be pooled")
    groups, seeds = {"initial": a}, {}
    for name in list(dict.fromkeys([*first.seeds, *second.seeds])):
        parts = [m for m in (first, second) if name in m.seeds]
        both = [s for s in parts[0].seeds[name] if len(parts) == 2 and s in parts[1].seeds[name]]
        if both:
            raise ValueError(f"merge_states: agent {name!r} ran seed(s) {both} in both runs")
        seeds[name] = [s for m in parts for s in m.seeds[name]]
        keys = set.intersection(*(set(m.groups[name]) for m in parts))
        groups[name] = {k: np.concatenate([m.groups[name][k] for m in parts]) for k in sorted(keys)}
    return Matrices(groups, seeds, list(first.states), list(first.covered),
                    first.probe_replies or second.probe_replies)


def write_report(cfg: LeaderboardConfig, rows: list[dict[str, Any]], paired: list[dict[str, Any]],
                 runs: list[AgentRun], meta: dict[str, Any], mats: Matrices | None = None) -> None:
    """Every report file under ``results_dir`` (named by ``report_name``); the per-state file with ``mats``."""
    out = results_path(cfg)
    out.mkdir(parents=True, exist_ok=True)
    stem = cfg.report_name
    _write_csv(out / f"{stem}.csv", CSV_FIELDS, rows)
    _write_csv(out / f"{stem}_paired.csv", PAIRED_FIELDS, paired)
    if mats is not None:
        write_states(out / f"{stem}_states.csv", mats)
    plot(rows, out / f"{stem}.png", cfg.title)
    (out / f"{stem}.md").write_text(markdown(cfg, rows, paired, runs, meta))


def reported_agents(rows: list[dict[str, Any]]) -> list[str]:
    """The agents with results in ``rows``, in their order."""
    return list(dict.fromkeys(r["policy"] for r in rows if r["policy"] != "initial"))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Win rate vs turn, one line per agent with its 95% interval, and the initial policy's 0.5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agents = reported_agents(rows)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for k, name in enumerate(agents):
        mine = [r for r in rows if r["policy"] == name and r["seed"] == "all"]
        h = np.array([r["turn"] for r in mine]) + 0.06 * (k - (len(agents) - 1) / 2)  # side by side, not on top
        w = np.array([r["win"] for r in mine])
        err = np.array([[x - r["win_lo"] for x, r in zip(w, mine)], [r["win_hi"] - x for x, r in zip(w, mine)]])
        ax.errorbar(h, w, yerr=np.clip(err, 0, None), marker="o", capsize=3, label=name)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="initial policy")
    ax.set_xlabel("turn h")
    ax.set_ylabel("win rate vs initial policy")
    ax.set_ylim(0, 1)
    ax.set_xticks(sorted({r["turn"] for r in rows}))
    ax.set_title(f"{title}: win rate at turn h (95% crossed-bootstrap CI)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(r: dict[str, Any], key: str) -> str:
    return f"{r[key]:.3f} [{r[key + '_lo']:.2f}, {r[key + '_hi']:.2f}]"


def _header(cfg: LeaderboardConfig, meta: dict[str, Any]) -> list[str]:
    info = machine_info()
    jobs = meta.get("jobs", 1)
    lines = [f"# {cfg.title}", "",
             f"Written by `python -m benchmarks.leaderboard`, started {meta['started']} (UTC); "
             f"{meta['wall_s'] / 60:.1f} min of wall-clock time since"
             f"{' (the run was interrupted and resumed in its directory)' if meta.get('resumed') else ''}.", "",
             "Command:", "", "```", meta["command"] or "(called from Python)", "```", ""]
    if meta.get("pending"):
        lines += [f"**Partial results**: {len(meta['pending'])} agent run(s) still to come when this was written: "
                  f"{', '.join(meta['pending'])}.", ""]
    lines += [f"Machine: {info['cpu']}, {info['cores']} cores, {info['ram']} RAM, GPU {info['gpu']}, Python "
              f"{info['python']}, torch {info['torch']} (CPU threads per process: {info['threads']}), "
              f"{info['platform']}; backend `{cfg.backend}`, {jobs} job(s) side by side"
              f"{' (wall times include the other jobs running beside each)' if jobs > 1 else ''}. Load average "
              f"(1/5/15 min) at the last start {'/'.join(f'{x:.1f}' for x in meta['load_start'])}, at the end "
              f"{'/'.join(f'{x:.1f}' for x in meta['load_end'])} (the machine may have been shared: read wall times "
              "with that in mind).", ""]
    return lines


def _protocol(cfg: LeaderboardConfig, meta: dict[str, Any]) -> list[str]:
    temperature = "each agent's own" if cfg.temperature is None else f"{cfg.temperature} for every agent"
    iterations = (f"each agent's, set from one measured iteration (margin {cfg.budget.margin})"
                  if cfg.budget.calibrate else "each agent's own setting")
    lr = (f"chosen per agent from {list(cfg.sweep.lrs)} by a run at the same budget (training seed "
          f"{cfg.sweep.seed}) evaluated on {cfg.sweep.states} validation states (metric: {meta.get('sweep_metric')} "
          "at the last turn); the test states are used only for this report" if cfg.sweep.lrs
          else "each agent's own (no sweep)")
    return ["## Protocol", "",
            f"- Task: `{cfg.env.task}` {dict(cfg.env.task_kwargs) or ''}, user `{cfg.env.user or 'task default'}`, "
            f"training reward `{cfg.env.reward or 'task default'}` ({cfg.env.reward_mode}), horizon "
            f"{cfg.env.max_turns} turns; replies capped at {cfg.max_new_tokens} tokens; training samples at "
            f"temperature {temperature}.",
            f"- Initial policy of every agent and baseline: `{cfg.policy}`, sampled on {cfg.policy_engine} in "
            f"training and evaluation. Agents: {', '.join(cfg.agents)}; "
            f"seeds {list(cfg.seeds)}"
            + "".join(f" ({a}: {seeds_of(cfg, a)})" for a in cfg.agents if a in cfg.agent_seeds)
            + f". Learning rate: {lr}.",
            f"- Budget per agent and seed, counted by the env in its training envs: policy samples "
            f"{limit_text(cfg.budget.policy_samples)}, scored conversations "
            f"{limit_text(cfg.budget.scored_conversations)}, optimizer steps {limit_text(cfg.budget.optimizer_steps)}"
            f". Iterations: {iterations}. Fair arms: every agent's mean policy samples and optimizer steps within "
            f"{FAIR:.0%} of each other (checked under Cost).",
            f"- Evaluation: {meta['states']} stored test states (user and policy seeds fixed, seed {cfg.eval.seed}), "
            f"policy temperature {cfg.eval.temperature}, judge `{cfg.eval.reward or cfg.env.reward or 'env default'}`"
            " scoring every turn. Turn-h score carried forward after a dialogue ended; win = higher turn-h score "
            "than the initial policy on the same state (tie 0.5).",
            "- Intervals: 95%, from the crossed bootstrap of the (seeds x states) design (each replicate resamples "
            "the training seeds and one resample of the states shared by every seed; its seed, state and "
            "interaction parts rescaled to their variance components), mean +- t x SE with Satterthwaite degrees of "
            f"freedom; {cfg.eval.n_boot} replicates. A single seed's row resamples its states. Paired differences "
            "are taken on the same states (and, between agents, the same training seeds). Beside each: a seed-level "
            "t-test over the per-seed mean differences and mde80, the smallest true difference the interval "
            "excludes 0 for with 80% probability at this design (its power).", ""]


def markdown(cfg: LeaderboardConfig, rows: list[dict[str, Any]], paired: list[dict[str, Any]],
             runs: list[AgentRun], meta: dict[str, Any]) -> str:
    agents = reported_agents(rows)
    horizon = max(r["turn"] for r in rows)
    hs = " | ".join(f"h={h}" for h in range(1, horizon + 1))
    sep = "|---" * (horizon + 1) + "|"
    pooled = lambda p: [r for r in rows if r["policy"] == p and r["seed"] == "all"]  # noqa: E731
    lines = _header(cfg, meta) + _protocol(cfg, meta)
    metrics = [("success", "Task success by turn h (verifier)")] if "success" in rows[0] else []
    metrics += [("score", "Mean score at turn h (judge)")]
    if "asks" in rows[0]:
        metrics += [("asks", "Turn-h replies that ask or hold back their answer (the behaviour the task rewards)")]
    for key, heading in metrics:
        lines += [f"## {heading}", "", f"| policy | {hs} |", sep]
        for name in ["initial", *agents]:
            lines.append(f"| {name} | " + " | ".join(_cell(r, key) for r in pooled(name)) + " |")
        lines.append("")
    lines += ["## Win rate vs the initial policy", "", f"| agent | {hs} | mean |", sep + "---|"]
    for name in agents:
        mine = pooled(name)
        lines.append(f"| {name} | " + " | ".join(_cell(r, "win") for r in mine)
                     + f" | {np.mean([r['win'] for r in mine]):.3f} |")
    lines += ["", f"![win rate vs turn]({cfg.report_name}.png)", ""]
    if paired:
        metric = "success" if any(p["metric"] == "success" for p in paired) else "score"
        lines += paired_table(paired, metric, horizon, f"Paired differences in {metric} at the last turn "
                                                        f"(h={horizon})")
        if any(p["metric"] == "probe" for p in paired):
            pr = meta.get("probe") or {}
            table = paired_table(paired, "probe", 1, "Turn-1 probe: change in the log-odds of asking vs guessing "
                                                     "(nats)")
            if pr:
                table[2:2] = [f"On the initial policy's own turn-1 replies: {pr['samples']} sampled per test "
                              f"opening at temperature {pr['temperature']:g} (it asked in {pr['asked']:.2f} of "
                              f"them), up to {pr['keep']} kept per class; the {pr['states']} of {meta['states']} "
                              "states with replies of both classes. probe(s) = log mean_ask pi/pi_0 - log "
                              "mean_guess pi/pi_0 (benchmarks/leaderboard/probe.py): 0 for the initial policy, "
                              "> 0 where a policy asks more, relative to guessing, than it did.", ""]
            lines += table
    lines += _cost(cfg, agents, pooled, meta) + _sweep(meta) + _per_seed(rows, runs, horizon, hs)
    if cfg.notes:
        lines += ["", "## Notes", "", cfg.notes.strip()]
    return "\n".join(lines) + "\n"


def paired_table(paired: list[dict[str, Any]], metric: str, turn: int, heading: str) -> list[str]:
    """The Markdown table of the paired comparisons of ``metric`` at ``turn``."""
    lines = [f"## {heading}", "",
             "Same states (and, between agents, the same training seeds: the seeds both ran, named where one ran "
             "fewer). Crossed 95% interval (* = excludes 0); "
             "mde80 = the smallest true difference this design detects with 80% probability; seed-level test = "
             "t-interval and p over the per-seed mean differences (n/a with one seed).", "",
             "| a | b | a - b | 95% interval | mde80 | seed-level 95% t-interval | seed-level p |",
             "|---|---|---|---|---|---|---|"]
    for p in paired:
        if p["metric"] == metric and p["turn"] == turn:
            b = p["b"] if p.get("on_seeds") is None else f"{p['b']} (on seeds {', '.join(map(str, p['on_seeds']))})"
            lines.append(f"| {p['a']} | {b} | {difference_cells(p)} |")
    return lines + [""]


def difference_cells(p: dict[str, Any]) -> str:
    """The cells ``a - b | 95% interval | mde80 | seed-level t-interval | seed-level p`` of a
    :func:`~benchmarks.leaderboard.stats.comparison_row` (``*`` marks an interval that excludes 0)."""
    seed = ("n/a", "n/a") if p["seeds"] < 2 else (f"[{p['seed_lo']:+.3f}, {p['seed_hi']:+.3f}]", f"{p['seed_p']:.3f}")
    return (f"{p['diff']:+.3f}{' *' if p['excludes_0'] else ''} | [{p['lo']:+.3f}, {p['hi']:+.3f}] | "
            f"{p['mde80']:.3f} | {seed[0]} | {seed[1]}")


def fairness(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``max / min - 1`` of the agents' mean policy samples and optimizer steps (the arms are fair within
    :data:`FAIR`); empty with fewer than two agents. A zero minimum with a positive maximum is ``inf``."""
    if len(rows) < 2:
        return {}
    out = {}
    for key in ("policy_samples", "optimizer_steps"):
        vals = [float(r.get(key, 0.0)) for r in rows]
        out[key] = 0.0 if max(vals) == 0 else (max(vals) / min(vals) - 1 if min(vals) > 0 else float("inf"))
    return out


def _cost(cfg: LeaderboardConfig, agents: list[str], pooled: Any, meta: dict[str, Any]) -> list[str]:
    lines = ["## Cost (mean per seed; training only)", "",
             "| agent | lr | iterations (done/asked) | stopped by budget | policy samples | optimizer steps | "
             "policy tokens | scored conversations | reward calls | training wall s | eval wall s |",
             "|---" * 11 + "|"]
    for name in agents:
        r = pooled(name)[0]
        lr = f"{r['lr']:.2g}" if r.get("lr") else "own"
        lines.append(f"| {name} | {lr} | {r['completed']:.1f}/{r['iterations']:.1f} | {r['stopped_by_budget']}/"
                     f"{r['runs']} | {r['policy_samples']:.0f} | {r.get('optimizer_steps', 0):.1f} | "
                     f"{r['policy_tokens']:.0f} | {r['scored_conversations']:.0f} | {r['reward_calls']:.0f} | "
                     f"{r['train_s']:.0f} | {r['eval_s']:.0f} |")
    spread = fairness([pooled(name)[0] for name in agents])
    if spread:
        lines += ["", "Fair arms (max / min - 1 over the agents, limit " + f"{FAIR:.0%}): " + "; ".join(
            f"{k.replace('_', ' ')} {v:.1%}{'' if v <= FAIR else ' **(not fair)**'}" for k, v in spread.items())
            + "."]
    if meta["calibration"]:
        lines += ["", "Calibration (one iteration, first seed): " + "; ".join(
            f"{k}: {v['policy_samples']} samples, {v['scored_conversations']} scored" for k, v in
            meta["calibration"].items()) + "."]
    return lines + [""]


def _sweep(meta: dict[str, Any]) -> list[str]:
    sweep, lrs = meta.get("sweep") or {}, meta.get("sweep_lrs") or []
    if not sweep:
        return []
    rule = meta.get("sweep_rule") or {}
    if not rule:
        verdict = "The rates are not chosen yet."
    elif rule["all_decisive"]:
        verdict = ("Every agent's sweep told its rates apart (its best rate beat the others with a paired 95% "
                   "interval above 0 on the validation states): each agent trained at its own best rate.")
    else:
        undecided = [n for n, v in sweep.items() if not v.get("decisive")]
        verdict = (f"**The sweep could not tell the rates apart** for {', '.join(undecided)} (no paired 95% "
                   f"interval on the validation states excluded 0), so every agent trained at one shared rate, "
                   f"{rule['shared']:g} (the best pooled over the agents): different rates would compare rates, not "
                   "algorithms.")
    lines = ["## Learning-rate sweep (validation split)", "",
             f"{meta.get('sweep_metric')} at the last turn on the validation states, one run per learning rate at "
             "the same budget; the chosen rate (bold) trained every reported seed. " + verdict, "",
             "| agent | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |", "|---" * (1 + len(lrs)) + "|"]
    for name, s in sweep.items():
        cells = ["—" if lr not in s["results"] else f"**{s['results'][lr]:.3f}**" if lr == s.get("chosen")
                 else f"{s['results'][lr]:.3f}" for lr in lrs]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _per_seed(rows: list[dict[str, Any]], runs: list[AgentRun], horizon: int, hs: str) -> list[str]:
    key = "success" if "success" in rows[0] else "score"
    lines = ["## Per seed", "", f"Win rate vs the initial policy, and {key} at the last turn, one training seed at a "
             "time (every row is in the CSV).", "",
             f"| agent | seed | stop (iterations done/asked) | win {hs} | {key} h={horizon} |",
             "|---|---|---|" + "---|" * (horizon + 1)]
    for r in runs:
        mine = [x for x in rows if x["policy"] == r.agent and x["seed"] == str(r.seed)]
        if mine:
            lines.append(f"| {r.agent} | {r.seed} | {r.stop} ({r.completed}/{r.iterations}) | "
                         + " | ".join(f"{x['win']:.3f}" for x in mine) + f" | {mine[-1][key]:.3f} |")
    return lines
