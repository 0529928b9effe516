import json

import numpy as np
import pytest

from benchmarks.demo_seeds import WALL_FILE, finished, main, read_run, run_demo, run_dir, solved_by_last_turn


def write_run(directory, initial, trained, wall_s=None):
    """A finished demo run directory: eval.json with the initial and the trained policy's per-state scores."""
    directory.mkdir(parents=True)
    evals = [{"policy": "initial", "scores": initial}, {"policy": "REFUEL after 4 iteration(s)", "scores": trained}]
    (directory / "eval.json").write_text(json.dumps({"evaluations": evals}))
    if wall_s is not None:
        (directory / WALL_FILE).write_text(json.dumps({"wall_s": wall_s}))


def test_solved_by_the_last_turn_carries_an_ended_dialogue_forward():
    # solved at turn 1 (then ended: None), solved at turn 3, never solved
    scores = [[1.0, None, None], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]
    assert solved_by_last_turn(scores).tolist() == [1.0, 1.0, 0.0]


def test_a_run_counts_as_finished_only_with_both_evaluations(tmp_path):
    d = tmp_path / "r"
    assert not finished(d)
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({"evaluations": [{"policy": "initial", "scores": [[0.0]]}]}))
    assert not finished(d)  # killed after the initial evaluation: run again, not read


def test_report_reads_finished_runs_and_pairs_dtypes_by_seed(tmp_path):
    n = 40
    init = [[1.0, None, None]] * 10 + [[0.0, 0.0, 0.0]] * (n - 10)  # 10 of 40 solved before training
    # bfloat16 seeds solve 16 and 20, float32 seeds 14 and 18: each trained run adds problems 10.. to the solved
    trained = {("bfloat16", 0): 16, ("bfloat16", 1): 20, ("float32", 0): 14, ("float32", 1): 18}
    for (dtype, seed), k in trained.items():
        rows = [[1.0, None, None]] * k + [[0.0, 0.0, 0.0]] * (n - k)
        write_run(run_dir(tmp_path, dtype, seed), init, rows, wall_s=60.0 * (seed + 1))
    out = tmp_path / "demo_seeds.md"
    main(["--seeds", "0", "1", "--dtypes", "bfloat16", "float32", "--runs-dir", str(tmp_path), "--out", str(out)])
    text = out.read_text()
    assert "| bfloat16 | 1 | 10 / 40 | 20 / 40 | 2.0 |" in text
    assert "| float32 | 0 | 10 / 40 | 14 / 40 | 1.0 |" in text
    # trained - initial for bfloat16: (6 + 10) / 2 / 40 = +0.200; between dtypes: (2 + 2) / 2 / 40 = +0.050
    assert "| bfloat16: trained - initial | +0.200" in text
    assert "| trained bfloat16 - trained float32 | +0.050" in text
    # the per-seed difference is +0.05 in both seeds: the seed-level test sees no spread (p 0), the crossed interval
    # still has the states' part
    row = next(line for line in text.splitlines() if line.startswith("| trained bfloat16 - trained float32"))
    assert row.rstrip().endswith("| 0.000 |")
    assert read_run(run_dir(tmp_path, "float32", 1))["trained"].sum() == 18
    assert np.isclose(read_run(run_dir(tmp_path, "float32", 1))["minutes"], 2.0)


def test_repeated_seeds_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "0", "--runs-dir", str(tmp_path), "--out", str(tmp_path / "x.md")])


def test_arms_are_named_override_sets_paired_by_seed(tmp_path):
    n = 20
    init = [[0.0, 0.0, 0.0]] * n
    for (arm, seed), k in {("lr2e-4", 0): 4, ("lr2e-4", 1): 6, ("lr6e-4", 0): 8, ("lr6e-4", 1): 12}.items():
        write_run(run_dir(tmp_path, arm, seed), init, [[0.0, 0.0, 1.0]] * k + [[0.0, 0.0, 0.0]] * (n - k))
        eval_json = run_dir(tmp_path, arm, seed) / "eval.json"
        data = json.loads(eval_json.read_text())
        data["settings"] = {"split": "validation"}
        eval_json.write_text(json.dumps(data))
    out = tmp_path / "arms.md"
    main(["--seeds", "0", "1", "--arm", "lr2e-4", "optim.lr=2e-4", "--arm", "lr6e-4", "optim.lr=6e-4",
          "--runs-dir", str(tmp_path), "--out", str(out), "eval.split=validation"])
    text = out.read_text()
    assert "| lr6e-4 | `optim.lr=6e-4` |" in text
    assert "20 problems of the validation split" in text
    assert "| lr6e-4 | 1 | 0 / 20 | 12 / 20 | - |" in text
    # arms in the order given: (4 - 8 + 6 - 12) / 2 / 20 = -0.250
    assert "| trained lr2e-4 - trained lr6e-4 | -0.250" in text
    assert "| lr2e-4: trained - initial | +0.250" in text  # (4 + 6) / 2 / 20
    assert "not the demo's" not in text
    main(["--seeds", "0", "1", "--arm", "lr2e-4", "optim.lr=2e-4", "--arm", "lr6e-4", "optim.lr=6e-4", "--jobs", "2",
          "--runs-dir", str(tmp_path), "--out", str(out)])  # all finished: read, nothing run
    assert "Run 2 at a time with a share of the threads each: their wall minutes are not the demo's" in out.read_text()


@pytest.mark.parametrize("args, message", [
    (["--dtypes", "float32", "--arm", "a", "optim.lr=1e-4"], "not both"),
    (["--arm", "a/b", "optim.lr=1e-4"], "must be letters"),
    (["--arm", "a", "optim.lr=1e-4", "--arm", "a", "optim.lr=2e-4"], "given twice"),
    (["--arm", "a", "optim.lr"], "is not a Hydra override"),
    (["--jobs", "0"], "--jobs must be >= 1"),
])
def test_bad_arms_are_refused_by_name(tmp_path, capsys, args, message):
    with pytest.raises(SystemExit):
        main([*args, "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "x.md")])
    assert message in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "x.md").exists()  # nothing started or written


def test_a_failed_run_names_its_log_and_records_no_wall_time(tmp_path):
    # the real command: the agent refuses the bad override at start-up, before any model loads
    directory = tmp_path / "bad_seed0"
    with pytest.raises(RuntimeError, match="bad_seed0/demo_seeds.log"):
        run_demo(directory, 0, ["optim.lr=-1"], threads=1)
    assert "lr" in (directory / "demo_seeds.log").read_text()
    assert not (directory / WALL_FILE).exists() and not finished(directory)


def test_a_failed_run_stops_the_queue(tmp_path):
    # the real command, refused at start-up: the first run fails, the second (queued behind it) never starts
    with pytest.raises(RuntimeError, match="bad_seed0/demo_seeds.log"):
        main(["--seeds", "0", "1", "--arm", "bad", "optim.lr=-1", "--runs-dir", str(tmp_path), "--out",
              str(tmp_path / "x.md")])
    assert (tmp_path / "bad_seed0" / "demo_seeds.log").is_file()
    assert not (tmp_path / "bad_seed1").exists() and not (tmp_path / "x.md").exists()
