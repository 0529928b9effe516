"""benchmarks.train_throughput's report: written with the machine line and the rows (the runs themselves are the
benchmark, not a test)."""

from __future__ import annotations

import argparse

from benchmarks import train_throughput as tt


def test_report_is_written_with_the_machine_and_every_row(tmp_path):
    args = argparse.Namespace(dialogues=32, max_new_tokens=16, iterations=1, compare=0, note="a note",
                              out=str(tmp_path / "train_throughput.md"))
    row = {"setup": "hf", "engine": "hf", "processes": 1, "lora_r": 16, "samples": 112, "samples_per_s": 2.98,
           "rollout_s": 37.6, "pairs": 31, "update_s": 39.7, "pair_updates_per_s": 0.78, "iteration_s": 77.3,
           "wall_s": 99.0}
    full = {**row, "setup": "vllm full", "engine": "vllm", "lora_r": 0, "rollout_s": 18.8, "samples_per_s": 112 / 18.8,
            "iteration_s": 58.5}
    tt.write_report(args, [row, full], "", (0.1, 0.2, 0.3))
    text = (tmp_path / "train_throughput.md").read_text()
    assert "Machine: " in text and "cores" in text and "Load average (1/5/15 min) before: 0.1/0.2/0.3" in text
    assert "| hf | hf | 1 | LoRA r=16 | 112 | 37.6 |" in text and text.rstrip().endswith("a note")
    # the second row against the first: iteration 77.3 / 58.5 = 1.32x; bound with free sampling 77.3 / 39.7 = 1.95x
    assert "| vllm full | vllm | 1 | all weights | 112 | 18.8 | 5.96 (2.00x) |" in text
    assert "| 58.5 | 1.32x | 1.95x |" in text
