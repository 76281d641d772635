"""bench.bench_gpu, the prepared GPU check, runs on the CPU as the suite runs it (--device cpu --tiny), so
that it cannot rot before a GPU is lent: every check prints its line and passes."""

from __future__ import annotations

import json

import pytest

from core.records import Status
from tests.conftest import run_module


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    r = run_module("bench.bench_gpu", ["--device", "cpu", "--tiny"], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    by = {}
    for rec in lines:
        by.setdefault(rec["check"], []).append(rec)
    assert [x["net"] for x in by["step"]] == ["ours"] and by["step"][0]["ms_per_step"] > 0
    assert by["step"][0]["peak_gib"] is None  # a GPU figure
    assert [x["workers"] for x in by["data_wait"]] == [0, 2]
    assert all(0 <= x["wait_share"] <= 1 for x in by["data_wait"])
    assert by["lookup"] == [{"check": "lookup", "device": "cpu", "bit_identical": True}]
    (t,) = by["trial"]
    assert t["ok"] and t["status"] == Status.COMPLETE and t["resumed_from"] == [{"stage": 0, "epoch": 1}], t
    assert by["done"][0]["ok"] is True
    assert "resuming from" in r.stderr  # the second run took the checkpoint the stopped one left
