"""benchmarks.gpu_check: its commands compose (Hydra grammar, agent configs), its refusals, its summaries.

The check itself needs a CUDA machine; `python -m benchmarks.gpu_check --device cpu --quick` is its dry run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def _step(name: str, device: str = "cuda") -> gpu_check.Step:
    return next(s for s in gpu_check.build_steps(device, quick=True, out_dir=Path("/tmp/x")) if s.name == name)


def test_leaderboard_command_composes_with_the_paper_preset():
    cmd = _step("leaderboard").command
    overrides = [a for a in cmd[cmd.index("benchmarks.leaderboard") + 1:] if not a.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose(config_name="leaderboard", overrides=overrides)
    assert cfg.agents == ["refuel"] and cfg.env.engine == "hf" and cfg.budget.policy_samples == 16
    assert cfg.overrides.refuel[0] == "+experiment=refuel_paper"  # the agent's own preset, then the toy sizes
    assert "dialogues=4" in cfg.overrides.refuel


def test_refuel_command_composes_and_puts_policy_and_user_on_the_device():
    from agents.common.config import merge_schema
    from agents.refuel.config import RefuelConfig

    cmd = _step("refuel", device="cuda:0").command
    overrides = [a for a in cmd[cmd.index("agents.refuel") + 1:] if not a.startswith("hydra.")]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = merge_schema(compose(config_name="refuel", overrides=overrides), RefuelConfig)
    assert cfg.policy.device == "cuda:0" and cfg.env.device == "cuda:0" and cfg.env.task == "arithmetic"


def test_tests_step_runs_the_suite_on_the_device_without_vllm_and_embedded():
    cmd = _step("tests", device="cuda").command
    assert cmd[cmd.index("--device") + 1] == "cuda"
    assert cmd[cmd.index("-m", cmd.index("pytest")) + 1] == "not vllm and not embedded"


def test_refusals(capsys):
    assert gpu_check.main(["--device", "cpu"]) == 2  # a CPU is only for --quick dry runs
    assert "for CUDA machines" in capsys.readouterr().err
    assert gpu_check.main(["--device", "cpu", "--quick", "--skip", "tests,gpus"]) == 2
    assert "unknown steps ['gpus']" in capsys.readouterr().err
    assert gpu_check.main(["--device", "tpu9"]) == 2
    assert "device is 'tpu9'" in capsys.readouterr().err


@pytest.mark.parametrize("name, log, want", [
    ("tests", "....\n===== 3 failed, 400 passed, 12 deselected in 99.0s =====\n",
     "3 failed, 400 passed, 12 deselected in 99.0s"),
    ("tests", "collected 0 items\nERROR: file not found\n", "ERROR: file not found"),
    ("throughput", "machine\nnative hf N=16: {a}\nraw generate static N=16: {b}\nnoise\n",
     "native hf N=16: {a}; raw generate static N=16: {b}"),
])
def test_summaries(name, log, want):
    assert gpu_check.summarize(name, log) == want
