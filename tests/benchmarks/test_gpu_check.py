"""benchmarks.gpu_check: its commands compose (Hydra grammar, agent configs), its refusals, its summaries.

The check itself needs a CUDA machine; `python -m benchmarks.gpu_check --device cpu --quick` is its dry run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]


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


def test_throughput_verdict_and_static_engine_labels():
    from benchmarks import env_throughput as et

    raw = [("dynamic", 256, {"tokens_per_s": 12000.0}), ("static", 256, {"tokens_per_s": 32000.0})]
    rows = [("DialogueVectorEnv", "hf", 256, {"tokens_per_s": 2700.0}),
            ("DialogueVectorEnv", "hf+static", 256, {"tokens_per_s": 16400.0})]
    met = et.gpu_verdict(rows, raw)
    assert "hf+static" in met[0] and "16,400" in met[0] and met[0].endswith("met")
    assert "0.51" in met[1] and met[1].endswith("met")
    missed = et.gpu_verdict([("DialogueVectorEnv", "hf+static", 256, {"tokens_per_s": 13000.0})], raw)
    assert missed[0].endswith("missed") and missed[1].endswith("missed")  # 13,000 < 15,000; 0.41 < 0.5
    assert "not evaluated" in et.gpu_verdict(rows, raw[:1])[0]  # no raw static row: no verdict
    et.SETTINGS.update(model="tiny", device="cpu", dtype="float32")
    assert et.env_kwargs("hf+static", 8)["engine_options"] == {"cache": "static"}
    assert "engine_options" not in et.env_kwargs("hf", 8) and et.env_kwargs("hf", 8)["engine"] == "hf"


def test_parallel_check_spreads_the_suite_over_workers():
    cmd = next(s for s in gpu_check.build_steps("cuda", quick=True, out_dir=Path("/tmp/x"), workers=8)
               if s.name == "tests").command
    assert cmd[cmd.index("-n") + 1] == "8" and cmd[cmd.index("--dist") + 1] == "loadfile"
