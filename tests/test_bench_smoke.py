"""bench_smoke runs each CPU path's trial under that path's kernels (issue #38): the caps it sets reach the
trial, which records them, and a draw below the target fails the run."""

import os

import pytest

from core.environment import KERNEL_CAP_VARS
from tests.conftest import run_module


@pytest.mark.slow
def test_a_path_runs_under_its_caps_and_a_missed_target_exits_1(runs):
    tiny = ["train.warmup_epochs=1", "train.stage_epochs=1", "train.stages=1"]  # far below the target
    env = {k: v for k, v in os.environ.items() if k not in KERNEL_CAP_VARS}
    p = run_module(
        "bench.bench_smoke",
        ["--seeds", "0", "--paths", "fp32", "onednn-avx2", "--threads", "1", "--set", *tiny],
        env={**env, "AUXSEG_RUNS": str(runs)},
        timeout=600,
    )
    out = p.stdout
    assert "seed 0 onednn-avx2 1 thr" in out and "[fp32, AVX2, ONEDNN_MAX_CPU_ISA=AVX2]" in out, (
        out + p.stderr
    )
    assert "| seed | fp32, 1 thr | onednn-avx2, 1 thr |" in out
    assert p.returncode == 1 and "TARGET MISSED" in out, out + p.stderr
