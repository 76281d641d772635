"""studies/plan.py: a study's grid points, each once and in the grid's order (--dry-run lists them without
touching the store), and the order workers claim them in (the longest trial first)."""

from __future__ import annotations

import pytest

from tests.conftest import write_study

pytestmark = pytest.mark.usefixtures("runs")


def test_dry_run_lists_every_grid_point_once(tmp_path, capsys):
    from studies.run import main

    y, _ = write_study(tmp_path, rows=3, seeds=(0, 1, 2))
    assert main(["g", "--study-file", str(y), "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    pts = [
        line.split()[:4]
        for line in out
        if line.split() and line.split()[0].isdigit() and "trials" not in line
    ]
    assert [p[0] for p in pts] == [str(i) for i in range(9)]
    assert {(p[1], p[3]) for p in pts} == {(r, str(s)) for r in ("seg", "full", "seg+sal") for s in range(3)}
    assert not (tmp_path / "studies.db").exists(), "--dry-run must not touch the store"


def test_grid_points_are_claimed_longest_trial_first(tmp_path):
    from studies.plan import make_plan
    from studies.spec import parse_spec

    text = """
storage: sqlite:///x.db
base: {preset: smoke}
studies:
  t:
    kind: ablation
    metric: final.miou
    seeds: [0, 1]
    set: {train.stages: 1}
    rows:
      - {label: seg, set: {model.branches: [seg], model.affinity: none, model.constraints: []}}
      - {label: full, set: {}}
      - {label: full-2, set: {train.stages: 2}}
"""
    plan = make_plan(parse_spec(text, "t.yaml"), "t")
    order = [(p.row, p.seed) for p in plan.claim_order]
    assert order == [("full-2", 0), ("full-2", 1), ("full", 0), ("full", 1), ("seg", 0), ("seg", 1)]
    assert [p.grid_index for p in plan.points] == list(range(6))  # the grid itself keeps its order


def test_derive_gives_what_planning_with_the_derived_keys_gives(tmp_path):
    """plan.derive(d) (the runner's thread counts, set without building any config again) is the plan that
    make_plan(..., derived_overrides=d) builds: the same configs and overrides for every grid point, --set
    still winning over a derived key, and the same tuning base config."""
    from studies.plan import make_plan
    from studies.spec import load_spec

    y, _ = write_study(tmp_path, rows=3, seeds=(0, 1))
    spec = load_spec(str(y))
    derived = {"train.threads": 2, "train.loader_workers": 1}
    for name in ("g", "t"):
        cli = {"train.loader_workers": 0}
        derived_plan = make_plan(spec, name, "smoke", cli).derive(derived)
        built = make_plan(spec, name, "smoke", cli, derived)
        assert [p.config for p in derived_plan.points] == [p.config for p in built.points]
        assert [p.overrides for p in derived_plan.points] == [p.overrides for p in built.points]
        assert [list(p.overrides) for p in derived_plan.points] == [list(p.overrides) for p in built.points]
        assert derived_plan.base_config == built.base_config
        assert derived_plan.run_overrides == built.run_overrides
        for cfg in derived_plan.configs():
            assert cfg.train.threads == 2 and cfg.train.loader_workers == "0"
