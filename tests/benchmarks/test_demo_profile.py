import math

import pytest
import torch

from benchmarks.demo_profile import matmul_rate, row


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matmul_rate_is_measured_in_the_weight_dtype(dtype):
    rate = matmul_rate(size=64, repeats=2, dtype=dtype)
    assert math.isfinite(rate) and rate > 0


def test_floor_share_is_the_floor_over_the_measured_seconds():
    # 2 TFLOP at 100 GFLOP/s is a 20 s floor; measured 80 s of a 160 s wall: share of wall 0.5, floor share 0.25
    assert row("sampling", 80.0, 160.0, 2e12, 100e9) == "| sampling | 80.0 | 0.500 | 2.00 | 20.0 | 0.250 |"
    assert row("env", 3.0, 160.0, 0, 100e9).endswith("| 0.0 | - |")  # no model: no floor
