"""Adaptive seed counts (studies.sequential): the rule on fixed sequences, the boundary's error rate, the
study.yaml syntax, and real `studies.run` processes adding seeds (a kill and a rerun, two processes on one
study, the Ray backend, a tuning study's confirmation), with a stand-in trial whose metric is known."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps

from core.records import Status
from studies.sequential import (
    Method,
    SeedRule,
    decide_study,
    group_sequential_boundary,
    mixture_precision,
    paired_t,
    row_decision,
    status_text,
    t_mixture_interval,
)
from tests.conftest import ROOT, kill_when, trials_now

PY = sys.executable
EFFECT = {1.0: 0.0, 2.0: 0.05, 3.0: 0.0}  # loss.cls -> true effect: seg (baseline), up (+5 points), noisy (0)


def known_trial(cfg, report=None, on_epoch=None, artifacts_dir=None, checkpoint_dir=None):
    """A stand-in trial: metric 0.30 + the row's effect (by loss.cls) + a seed term every row shares, plus for
    loss.cls = 3 a ±2-point swing by seed (a row no seed count up to max resolves); sleeps $SEQ_TEST_SLEEP."""
    time.sleep(float(os.environ.get("SEQ_TEST_SLEEP", "0")))
    swing = 0.02 * (-1) ** cfg.seed if cfg.loss.cls == 3.0 else 0.0005 * math.sin(7 * cfg.seed + cfg.loss.cls)
    v = 0.30 + EFFECT.get(cfg.loss.cls, 0.01 * math.log(cfg.loss.cls)) + 0.01 * math.cos(cfg.seed) + swing
    stage = {"stage": 0, "val": {"miou": v}, "pgt": {}, "seconds": 0.01, "epoch": 0}
    if report is not None:
        report(0, stage)
    return {"status": "complete", "error": None, "config": cfg.to_dict(), "final": {"miou": v},
            "stages": [stage], "seconds": 0.01}  # fmt: skip


# ------------------------------------------------------------------------------ the rule itself
RULE = SeedRule(initial=(0, 1, 2), max=6, rope=0.5, alpha=0.05)


def test_a_large_effect_resolves_better_at_the_initial_seeds_and_worse_when_minimising():
    pairs = [(s, 0.05 + 0.001 * s) for s in range(3)]
    d = row_decision(RULE, "up", pairs, next_seed=3, m=1)
    assert (d.status, d.n, d.seeds, d.next_seed) == ("better", 3, (0, 1, 2), None)
    assert 0 < d.lo < d.mean < d.hi
    assert row_decision(RULE, "up", pairs, 3, 1, sign=-1.0).status == "worse"  # higher is worse
    assert row_decision(RULE, "down", [(s, -x) for s, x in pairs], 3, 1).status == "worse"


def test_a_tiny_difference_is_equivalent_within_the_rope_once_the_interval_is_narrow_enough():
    pairs = [(s, 0.0004 * (-1) ** s) for s in range(6)]
    d = row_decision(RULE, "same", pairs, next_seed=None, m=1)
    assert d.status == "equivalent"
    assert -0.005 < d.lo < 0 < d.hi < 0.005  # inside ±0.5 points, and it contains 0
    assert d.n < 6 and d.seeds == tuple(range(d.n))  # decided at the first seed count that could


def test_a_noisy_row_wants_seeds_then_is_unresolved_at_max():
    pairs = [(s, 0.02 * (-1) ** s) for s in range(3)]
    d = row_decision(RULE, "noisy", pairs, next_seed=3, m=1)
    assert (d.status, d.next_seed) == ("unresolved", 3)
    pairs = [(s, 0.02 * (-1) ** s) for s in range(6)]
    d = row_decision(RULE, "noisy", pairs, next_seed=None, m=1)
    assert (d.status, d.n, d.next_seed) == ("unresolved at max", 6, None)
    assert d.lo < 0 < d.hi


def test_the_study_wants_the_next_seed_for_unresolved_rows_and_the_baseline_only():
    def trial(row, seed, value, status="complete"):
        return {"row": row, "seed": seed, "status": status, "value": value}

    trials = [trial("seg", s, 0.30 + 0.01 * math.cos(s)) for s in range(3)]
    trials += [trial("up", s, 0.35 + 0.01 * math.cos(s)) for s in range(3)]
    trials += [trial("noisy", s, 0.30 + 0.01 * math.cos(s) + 0.02 * (-1) ** s) for s in range(3)]
    dec = decide_study(RULE, ["seg", "up", "noisy"], "seg", "maximize", trials)
    assert dec.rows["up"].status == "better" and dec.rows["noisy"].status == "unresolved"
    initial = {(r, s) for r in ("seg", "up", "noisy") for s in range(3)}
    assert dec.wanted == initial | {("noisy", 3), ("seg", 3)}
    # the baseline's seed 3 still running: the row waits for it and wants nothing beyond
    trials += [trial("noisy", 3, 0.29), trial("seg", 3, None, "running")]
    dec = decide_study(RULE, ["seg", "up", "noisy"], "seg", "maximize", trials)
    assert dec.rows["noisy"].n == 3 and dec.wanted == initial | {("noisy", 3), ("seg", 3)}
    # a failed seed is skipped, the next one wanted
    trials[-1] = trial("seg", 3, None, "failed")
    dec = decide_study(RULE, ["seg", "up", "noisy"], "seg", "maximize", trials)
    assert dec.rows["noisy"].n == 3 and ("noisy", 4) in dec.wanted and ("seg", 4) in dec.wanted
    assert RULE.sequence() == (0, 1, 2, 3, 4, 5)
    assert SeedRule((1, 2, 3), 5).sequence() == (1, 2, 3, 4, 5)  # fresh seeds never come back to 0


def test_the_interval_covers_the_mean_at_every_seed_count_at_once_with_probability_1_minus_alpha():
    """Gaussian differences, sd unknown to the rule: the share of runs whose interval misses the true mean at
    ANY of 30 seed counts stays below alpha (Monte-Carlo, 3 standard errors); a Student-t interval looked at
    after each seed misses far more often (what peeking costs)."""
    rng = np.random.default_rng(0)
    reps, alpha = 20_000, 0.05
    d = rng.normal(0.3, 1.7, size=(reps, 30))
    _, lo, hi = t_mixture_interval(d, alpha, 0.1)
    miss = ((lo > 0.3) | (hi < 0.3))[:, 2:].any(axis=1).mean()
    assert miss <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / reps), miss
    from bench.bench_sequential import student_t_interval

    tlo, thi = student_t_interval(d, alpha)
    assert ((tlo > 0.3) | (thi < 0.3))[:, 2:].any(axis=1).mean() > 2 * alpha


def test_the_calibrated_boundary_reproduces_its_alpha_on_a_fresh_simulation():
    """The main job's design (alpha 0.0125 per row, looks 3..8): on draws the calibration never saw, the share
    of null runs whose |t| crosses the boundary at some look is alpha within 3 Monte-Carlo standard errors
    (not a bound: the calibration is exact), whatever the sd; the boundary is O'Brien-Fleming-shaped (falls
    with every look) and its last value lies above the one-look t critical value."""
    alpha, reps = 0.0125, 200_000
    c = np.array(group_sequential_boundary(alpha, 3, 8))
    assert np.all(np.diff(c) < 0) and c[-1] > sps.t.isf(alpha / 2, 7)
    rng = np.random.default_rng(7)
    d = rng.normal(0.0, 3.7, size=(reps, 8))
    t = np.abs(paired_t(d)[:, 2:])
    crossed = (t > c).any(axis=1).mean()
    se = math.sqrt(alpha * (1 - alpha) / reps)
    assert abs(crossed - alpha) <= 3 * se, (crossed, alpha, se)
    assert group_sequential_boundary(alpha, 3, 8) is group_sequential_boundary(alpha, 3, 8)  # cached


def test_the_group_sequential_rule_decides_where_the_confidence_sequence_cannot():
    """A 1.2-point effect with sd 0.8 points over 8 seeds, alpha 0.0125 per row: the group-sequential rule
    (the default) decides better, at the look its boundary is crossed, with the repeated confidence interval
    of that look; the t-mixture sequence (`method: confseq`) over the same differences stays unresolved at
    max."""
    z = np.array([0.9, -1.1, 0.3, 1.4, -0.6, 0.2, -0.8, 0.7])
    x = 0.012 + 0.008 * (z - z.mean()) / z.std(ddof=1)  # mean exactly 1.2 points, sd exactly 0.8 points
    pairs = list(enumerate(x))
    rule = SeedRule((0, 1, 2), 8, 0.5, 0.05)
    d = row_decision(rule, "r", pairs, next_seed=None, m=4)
    assert d.status == "better" and d.n == 8 and rule.method is Method.GROUP_SEQUENTIAL
    c = group_sequential_boundary(0.0125, 3, 8)[-1]
    half = c * 0.008 / math.sqrt(8)  # the repeated confidence interval of the deciding look
    assert (d.lo, d.hi) == (pytest.approx(0.012 - half), pytest.approx(0.012 + half))
    cs = row_decision(SeedRule((0, 1, 2), 8, 0.5, 0.05, Method.CONFSEQ), "r", pairs, next_seed=None, m=4)
    assert cs.status == "unresolved at max" and cs.lo < 0 < cs.hi
    _, lo, hi = t_mixture_interval(x, 0.0125, mixture_precision(0.0125, 3, 8))
    assert (cs.lo, cs.hi) == (lo[-1], hi[-1])  # confseq still is the t-mixture sequence
    # before the initial seeds nothing is decided, however large the effect
    assert row_decision(rule, "r", [(0, 0.05), (1, 0.051)], next_seed=2, m=1).status == "unresolved"


def exact(mean: float, sd: float, n: int) -> np.ndarray:
    z = np.cos(np.arange(n) * 2.1)
    return mean + sd * (z - z.mean()) / z.std(ddof=1)


def test_the_forecast_says_about_how_many_seeds_a_row_needs_and_its_conditional_power():
    """+0.3 ± 0.6 points after 8 seeds, alpha 0.0125: the forecast names about 32 seeds (where 0.3 √n / 0.6
    reaches the last look's t value: about 2.8); a design with that many seeds decides on differences with
    that mean and sd, one with 80 % of them does not. While seeds remain, the conditional power: near 1 for
    a clear effect, near 0 for a row at 0 with a wide sd."""
    rule = SeedRule((0, 1, 2), 8, 0.5, 0.05)
    d = row_decision(rule, "r", list(enumerate(exact(0.003, 0.006, 8))), next_seed=None, m=4)
    assert d.status == "unresolved at max" and d.forecast is not None
    need = d.forecast.seeds
    assert 28 <= need <= 36 and d.forecast.conditional_power is None
    text = status_text(d, rule, with_forecast=True)
    assert text == f"unresolved at max: at +0.3 ± 0.6 it would need about {need} seeds; max is 8", text
    big = SeedRule((0, 1, 2), need, 0.5, 0.05)
    assert row_decision(big, "r", list(enumerate(exact(0.003, 0.006, need))), None, 4).status == "better"
    small = SeedRule((0, 1, 2), int(0.8 * need), 0.5, 0.05)
    short = list(enumerate(exact(0.003, 0.006, int(0.8 * need))))
    assert row_decision(small, "r", short, None, 4).status == "unresolved at max"
    clear = row_decision(rule, "r", list(enumerate(exact(0.02, 0.01, 3))), next_seed=3, m=4)
    assert clear.status == "unresolved" and clear.forecast.conditional_power > 0.9
    flat = row_decision(rule, "r", list(enumerate(exact(0.0, 0.03, 3))), next_seed=3, m=4)
    assert flat.forecast.conditional_power < 0.05 and flat.forecast.seeds > 100
    assert "conditional power" in status_text(flat, rule, with_forecast=True)
    assert status_text(flat, rule) == "unresolved (seed 3 next)"


# ---------------------------------------------------------------------------------- study.yaml
GRID = """storage: {url}
base:
  preset: smoke
  set: {{train.warmup_epochs: 1, train.stage_epochs: 1, train.stages: 1, eval.post: false}}
studies:
  g:
    kind: ablation
    seeds: {seeds}
    baseline: seg
    rows:
      - {{label: seg, set: {{loss.cls: 1.0}}}}
      - {{label: up, set: {{loss.cls: 2.0}}}}
      - {{label: noisy, set: {{loss.cls: 3.0}}}}
"""


def write_grid(tmp_path: Path, seeds: str = "{initial: [0, 1, 2], max: 5}") -> tuple[Path, str]:
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    p = tmp_path / "study.yaml"
    p.write_text(GRID.format(url=url, seeds=seeds))
    return p, url


@pytest.mark.parametrize(
    "seeds,expect",
    [
        ("{initial: [0], max: 5}", "seeds.initial: needs at least 2 seeds"),
        ("{initial: [0, 1, 2], max: 2}", "seeds.max: max (2) must be >= the 3 initial seeds"),
        ("{initial: [0, 1, 2], max: 5, rope: 0}", "seeds.rope: rope must be > 0"),
        ("{initial: [0, 1, 2], max: 5, alpha: 1.5}", "seeds.alpha: alpha must be in (0, 1)"),
        ("{initial: [0, 1, 2], maximum: 5}", "unknown key 'maximum'"),
        ("{initial: [0, 1, 1], max: 5}", "duplicate seed"),
        (
            "{initial: [0, 1, 2], max: 5, method: pocock}",
            "seeds.method: method must be one of group-sequential, confseq",
        ),
    ],
)
def test_a_bad_seeds_mapping_is_one_line_naming_file_line_and_key(tmp_path, seeds, expect):
    from studies.spec import SpecError, load_spec

    y, _ = write_grid(tmp_path, seeds)
    with pytest.raises(SpecError) as e:
        load_spec(y)
    msg = str(e.value)
    assert msg.startswith(f"{y}:") and expect in msg and "\n" not in msg, msg
    line = int(msg[len(str(y)) + 1 :].split(":")[0])
    assert y.read_text().splitlines()[line - 1].strip().startswith("seeds:"), line


def test_a_plain_seed_list_is_a_fixed_grid_and_a_mapping_an_adaptive_one(tmp_path):
    from studies.plan import make_plan
    from studies.spec import load_spec

    y, _ = write_grid(tmp_path, "[0, 1, 2]")
    plan = make_plan(load_spec(y), "g")
    assert not plan.adaptive and plan.study.seeds == (0, 1, 2) and plan.wanted_keys([]) is None
    y, _ = write_grid(tmp_path, "{initial: [0, 1, 2], max: 5, rope: 1, alpha: 0.1}")
    plan = make_plan(load_spec(y), "g")
    assert plan.adaptive and plan.study.adaptive == SeedRule((0, 1, 2), 5, 1.0, 0.1)
    assert len(plan.points) == 15 and len(plan.wanted_keys([])) == 9
    y, _ = write_grid(tmp_path, "{initial: [0, 1, 2], max: 5, method: confseq}")
    assert make_plan(load_spec(y), "g").study.adaptive.method is Method.CONFSEQ


def test_dry_run_shows_initial_seeds_max_and_the_range_of_trials(tmp_path, capsys):
    from studies.run import main

    y, _ = write_grid(tmp_path)
    assert main(["g", "--study-file", str(y), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "adaptive seeds: initial [0, 1, 2], at most 5 per row (then seeds 3, 4" in out
    assert "9 to 15 trials" in out and "alpha 0.05" in out and "rope ±0.5" in out
    assert out.count("if needed") == 6
    assert not (tmp_path / "studies.db").exists()


# ----------------------------------------------------------------------------- real processes
def env(sleep: float = 0.0) -> dict:
    return {**os.environ, "STUDIES_TRIAL_FN": "tests.test_sequential:known_trial", "PYTHONPATH": str(ROOT),
            "SEQ_TEST_SLEEP": str(sleep), "AUXSEG_RUNS": os.environ.get("AUXSEG_RUNS", "runs")}  # fmt: skip


def expected_end(url: str) -> None:
    """The study ended as the known metric says: up better at 3 seeds, noisy unresolved at max (5), every
    point the rule wanted complete exactly once, nothing else run."""
    from studies.store import Store

    trials = Store(url).trials("g")
    complete = [(t.row, t.seed) for t in trials if t.status == Status.COMPLETE]
    assert len(complete) == len(set(complete)), sorted(complete)
    want = {("up", s) for s in range(3)} | {(r, s) for r in ("seg", "noisy") for s in range(5)}
    assert set(complete) == want
    assert all(t.status in (Status.COMPLETE, Status.INTERRUPTED) for t in trials)


@pytest.mark.slow
def test_seeds_are_added_across_a_kill_and_a_rerun(tmp_path):
    from studies.store import Store

    y, url = write_grid(tmp_path)
    store = Store(url)
    cmd = [PY, "-m", "studies.run", "g", "--study-file", str(y), "--no-report", "--workers", "1"]
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env(0.5), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kill_when(  # while an added seed (3 or 4) runs
        proc,
        lambda: any(t.status == Status.RUNNING and t.seed >= 3 for t in trials_now(store, "g")),
        120,
        never="never saw an added seed running",
    )
    killed = [t for t in store.trials("g") if t.status == Status.RUNNING]
    assert len(killed) == 1 and killed[0].seed >= 3
    p = subprocess.run(cmd, cwd=tmp_path, env=env(0.0), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-2000:]
    expected_end(url)
    after = {t.harness_id: t for t in store.trials("g")}
    assert after[killed[0].harness_id].status == Status.INTERRUPTED
    assert "noisy: unresolved at max; 5 paired seed(s)" in p.stdout and "up: better; 3 paired" in p.stdout


@pytest.mark.slow
def test_two_processes_add_seeds_to_one_study_without_running_a_point_twice(tmp_path):
    y, url = write_grid(tmp_path)
    cmd = [PY, "-m", "studies.run", "g", "--study-file", str(y), "--no-report", "--workers", "1"]
    ps = [subprocess.Popen(cmd, cwd=tmp_path, env=env(0.4), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=240) for p in ps]
    for p, (so, se) in zip(ps, outs):
        assert p.returncode == 0, se[-2000:]
    expected_end(url)
    from studies.store import Store

    claims = Store(url).claims("g")
    assert len(claims) == 13 and {c.state for c in claims} == {Status.DONE}
    ran = [so.count(": complete") for so, _ in outs]
    assert sum(ran) == 13 and all(ran), ran  # both processes ran trials, 13 in all
    # the live display: each row's decision as its seeds land (with the forecast while unresolved), and an
    # ETA that ranges up to the seeds the rule may still add
    text = "".join(so for so, _ in outs)
    assert "[studies] up: better at 3 paired seed(s), Δ vs seg +5.0 [" in text, text[-3000:]
    assert "[studies] noisy: unresolved (seed 3 next) at 3 paired seed(s)" in text, text[-3000:]
    assert "it would need" in text and "conditional power" in text
    live = [line for line in text.splitlines() if line.startswith("[studies] noisy:")]
    assert live and not any("waiting for the initial seeds" in line for line in live)  # lines from 1st look
    summary = [line for line in text.splitlines() if "waiting for the initial seeds;" in line]
    assert all("it would need" not in line for line in summary)  # no forecast before the rule has looked


def test_the_live_eta_ranges_up_to_the_seeds_the_rule_may_still_add(tmp_path):
    """Four trials of the study run (the baseline's initial seeds and one of `up`'s): the ETA of the points
    wanted now is the lower end; every seed up to max for the undecided rows and the baseline the upper."""
    import io

    from studies.live import Live, eta_text
    from studies.plan import make_plan
    from studies.spec import load_spec
    from studies.store import Store

    y, url = write_grid(tmp_path)
    cmd = [
        PY,
        "-m",
        "studies.run",
        "g",
        "--study-file",
        str(y),
        "--no-report",
        "--workers",
        "1",
        "--n-trials",
        "4",
    ]
    p = subprocess.run(cmd, cwd=tmp_path, env=env(0.3), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    live = Live(make_plan(load_spec(y), "g"), Store(url), 1, out=io.StringIO(), terminal=False)
    try:
        snap = live.snapshot()
    finally:
        live.close()
    # now: 5 initial points left (up 1-2, noisy 0-2); at most 6 more (up and noisy are undecided: their seeds
    # 3-4, and the baseline's), every point of the same cost, one worker
    assert snap["eta"] > 0 and snap["eta_max"] == pytest.approx(snap["eta"] * 11 / 5), snap
    assert eta_text({"eta": 70.0, "eta_max": 190.0}) == "1m10s–3m10s (up to max seeds)"
    assert eta_text({"eta": 70.0, "eta_max": 70.2}) == eta_text({"eta": 70.0, "eta_max": None}) == "1m10s"


@pytest.mark.slow
def test_the_ray_backend_adds_seeds_too(tmp_path, monkeypatch):
    import ray

    from studies.run import main

    y, url = write_grid(tmp_path)
    for k, v in env(0.0).items():
        monkeypatch.setenv(k, v)
    keys = ("STUDIES_TRIAL_FN", "PYTHONPATH", "SEQ_TEST_SLEEP", "AUXSEG_RUNS")
    trial_env = {k: env(0.0)[k] for k in keys}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": trial_env})
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["g", "--study-file", str(y), "--backend", "ray", "--workers", "2", "--cpus-per-trial", "1",
                   "--no-report"])  # fmt: skip
    finally:
        ray.shutdown()
    assert rc == 0
    expected_end(url)


@pytest.mark.slow
def test_a_tuning_study_ends_with_its_top_sets_confirmed_on_fresh_seeds(tmp_path, capsys, monkeypatch):
    from studies.run import main
    from studies.store import Store

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    y = tmp_path / "study.yaml"
    text = {
        "storage": url,
        "base": {"preset": "smoke", "set": {}},
        "studies": {
            "t": {"kind": "tuning", "n_trials": 4, "pruner": "none", "sampler": "random",
                  "confirm": {"top": 2, "seeds": {"max": 4}},
                  "params": {"loss.cls": {"type": "float", "low": 0.5, "high": 8.0, "log": True}}},
            "off": {"kind": "tuning", "n_trials": 2, "confirm": False,
                    "params": {"loss.cls": {"type": "float", "low": 0.5, "high": 8.0, "log": True}}},
        },
    }  # fmt: skip
    y.write_text(json.dumps(text))
    for k, v in env(0.0).items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    assert main(["t", "--study-file", str(y), "--workers", "1", "--artifacts", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    store = Store(url)
    search = {f"#{t.optuna_number}": t for t in store.trials("t")}
    conf = store.trials("t.confirm")
    rows = {t.row for t in conf}
    assert len(search) == 4 and "preset" in rows and len(rows) == 3 and rows - {"preset"} <= set(search)
    assert {t.seed for t in conf} <= {1, 2, 3, 4} and all(t.status == Status.COMPLETE for t in conf)
    for t in conf:  # each confirmed row runs its search trial's parameters; the baseline the preset's value
        want = 1.0 if t.row == "preset" else search[t.row].params["loss.cls"]
        assert t.config["loss"]["cls"] == pytest.approx(want)
    assert "t.confirm: final.miou" in out and "Δ vs preset" in out
    report = (tmp_path / "runs" / "reports").glob("t--*.md")
    md = next(p for p in report if ".confirm" not in p.name).read_text()
    assert "## Confirmation on fresh seeds (the answer)" in md and "**Answer:**" in md
    assert md.index("Confirmation on fresh seeds") < md.index("## Best trials")
    # a rerun confirms the same sets; `confirm: false` runs none
    assert main(["t", "--study-file", str(y), "--workers", "1", "--no-report"]) == 0
    assert len(store.trials("t.confirm")) == len(conf)
    assert main(["off", "--study-file", str(y), "--workers", "1", "--no-report"]) == 0
    assert "off.confirm" not in store.study_names()


def test_the_adaptive_main_job_in_study_yaml_is_table_3_with_a_seed_rule():
    from studies.plan import make_plan
    from studies.spec import load_spec

    spec = load_spec(ROOT / "study.yaml")
    fixed, adaptive = spec.study("ablation_tasks"), spec.study("ablation_tasks_adaptive")
    assert adaptive.adaptive == SeedRule((0, 1, 2), 8) and fixed.adaptive is None
    assert (
        adaptive.rows == fixed.rows
        and adaptive.overrides == fixed.overrides
        and adaptive.baseline == fixed.baseline
    )
    plan = make_plan(spec, "ablation_tasks_adaptive", preset="smoke")
    assert len(plan.points) == 5 * 8 and len(plan.wanted_keys([])) == 5 * 3


def test_initial_seeds_are_claimed_before_added_ones_longest_first(tmp_path):
    from studies.plan import make_plan
    from studies.spec import load_spec

    y, _ = write_grid(tmp_path, "{initial: [0, 1], max: 4}")
    text = y.read_text().replace("{label: up, set: {loss.cls: 2.0}}", "{label: up, set: {train.stages: 2}}")
    y.write_text(text)
    order = [(p.row, p.seed) for p in make_plan(load_spec(y), "g").claim_order]
    assert order[:2] == [("up", 0), ("up", 1)]  # the longest row first among the initial seeds
    assert {s for _, s in order[:6]} == {0, 1} and [s for _, s in order[6:]] == [2, 2, 2, 3, 3, 3]
