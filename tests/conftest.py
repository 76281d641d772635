"""Shared test setup: the repository root, the fast smoke variant, VOC settings that validate without the
data, a fresh runs/ folder per test module, and a helper that runs a module's CLI in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The fast variant of the smoke preset: one warm-up epoch, one short stage, no post-processing.
TINY_SET = {
    "train.warmup_epochs": 1,
    "train.stage_epochs": 1,
    "train.stages": 1,
    "eval.post": False,
    "train.workers": 1,
}
TINY = [f"{k}={json.dumps(v)}" for k, v in TINY_SET.items()]  # as --set overrides

# A VOC config that passes validation without the data on disk.
VOC = ["data.root=/voc", "data.saliency=sr"]


def run_module(module: str, args: list[str], env: dict | None = None, timeout: float | None = None):
    """`python -m module args...` from the repository root, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A fresh runs/ folder (datasets, warm-up cache) for one test module, as $AUXSEG_RUNS."""
    with pytest.MonkeyPatch.context() as mp:
        d = tmp_path_factory.mktemp("runs")
        mp.setenv("AUXSEG_RUNS", str(d))
        yield d
