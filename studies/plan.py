"""A study's plan: its preset, every trial config resolved and validated, its grid points or search space.

    plan = make_plan(spec, "ablation_tasks", preset=None, cli_overrides={"train.stages": "1"})
    plan.points   -> [GridPoint(grid_index, row, variant, seed, overrides, config)]  (rows x variants x seeds)
    plan.derive({"train.threads": 1})     (the runner's derived keys, applied to every config already built)
    plan.config_for_params({"loss.cls": 0.3})  (tuning: the config of one sampled trial)
    plan.wanted_keys(store.trials(name))   (adaptive seeds: the points the study needs now; None: all)
    confirm_plan(plan, trials)             (a tuning study's confirmation: its top sets on fresh seeds)

Every config a study can produce is built here, once, with core.config.make_config before anything runs
(a grid point's travels with it and its Job; a tuning trial's is built when its params are sampled), and a
bad value is blamed on its source: the study file's line (rows, variants, study set), --set or --preset.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from core.config import PRESETS, Config, ConfigError, apply_overrides, make_config
from studies.records import Status, StoredTrial
from studies.sequential import StudyDecision, decide_study
from studies.spec import Row, SourceLines, Spec, SpecError, Study, StudyKind, Variant


@dataclass(frozen=True)
class GridPoint:
    grid_index: int  # position in the grid (stable: rows, then variants, then seeds)
    row: str
    variant: str | None
    seed: int
    overrides: dict[str, Any]  # own, then the run's (Plan.run_overrides)
    cost: float = 1.0  # relative trial time (trial_cost), for claiming the longest trials first
    config: Config = field(default_factory=Config, compare=False)  # the resolved, validated config
    own: dict[str, Any] = field(default_factory=dict, compare=False)  # base, study, row, variant, seed

    @property
    def key(self) -> tuple:
        return (self.row, self.variant, self.seed)

    @property
    def params(self) -> dict[str, Any]:
        p: dict[str, Any] = {"row": self.row, "seed": self.seed}
        if self.variant is not None:
            p["variant"] = self.variant
        return p


def trial_cost(cfg: Config) -> float:
    """A trial's time relative to a one-stage seg-only trial of the same schedule: training steps weighted
    by what each branch and the affinity add to a step (default preset, 1 thread: seg-only 45 s,
    seg+cls+sal 54 s, + cross-task affinity 66 s). Only the order matters: studies claim the longest
    grid points first, so that the last trial to finish is a short one and no core idles long at the end
    (longest processing time first)."""
    m, t = cfg.model, cfg.train
    step = 1.0 + 0.1 * (len(m.branches) - 1) + (0.25 if m.affinity != "none" else 0.0)
    return t.stages * t.stage_epochs * step


@dataclass(frozen=True)
class Plan:
    """One study ready to run: its preset, its trial configs (validated), its optuna search space."""

    study: Study
    preset: str
    base_overrides: dict[str, Any]  # base.set <- study.set (before rows, params and --set)
    cli_overrides: dict[str, Any]  # --set exactly as the user gave it
    derived_overrides: dict[str, Any]  # what the runner derives (threads per trial); --set wins over them
    points: tuple[GridPoint, ...] = ()
    study_file: str = "study.yaml"  # the file the study came from (--study-file)
    base_config: Config = field(default_factory=Config, compare=False)  # tuning: the params at the preset's

    def derive(self, derived_overrides: dict[str, Any]) -> Plan:
        """This plan with the keys the runner derives (threads per trial) set in every config, --set winning
        over them as in make_plan: each config is the one make_plan would build with them, not built again."""
        run = {**derived_overrides, **self.cli_overrides}
        # each config already holds --set, which wins: only the derived keys it does not set go in
        derived = {k: v for k, v in derived_overrides.items() if k not in self.cli_overrides}
        points = tuple(
            dataclasses.replace(p, overrides={**p.own, **run}, config=apply_overrides(p.config, derived))
            for p in self.points
        )
        base = apply_overrides(self.base_config, derived)
        plan = dataclasses.replace(
            self, derived_overrides=dict(derived_overrides), points=points, base_config=base
        )
        return plan

    def configs(self) -> list[Config]:
        """Every config this plan runs: its grid points', or a tuning study's with the params unset."""
        return [p.config for p in self.points] or [self.base_config]

    @property
    def run_overrides(self) -> dict[str, Any]:
        """What this run sets on top of every trial's row, variant, seed or params: derived, then --set."""
        return {**self.derived_overrides, **self.cli_overrides}

    @property
    def is_grid(self) -> bool:
        return self.study.kind.is_grid

    @functools.cached_property  # claim_next asks on every claim; the grid does not change
    def claim_order(self) -> tuple[GridPoint, ...]:
        """The grid points, longest trial first (grid order among equals). With adaptive seeds the initial
        seeds come first (longest first), then the added seeds in the order they are added, so that every
        row has its initial seeds before any row gets more."""
        if self.adaptive:
            rule = self.study.adaptive
            rank = {s: max(0, i - len(rule.initial) + 1) for i, s in enumerate(rule.sequence())}
            return tuple(sorted(self.points, key=lambda p: (rank[p.seed], -p.cost, p.grid_index)))
        return tuple(sorted(self.points, key=lambda p: (-p.cost, p.grid_index)))

    @property
    def adaptive(self) -> bool:
        return self.is_grid and self.study.adaptive is not None

    def decide(self, trials: list[StoredTrial]) -> StudyDecision:
        """The adaptive rule on the study's trials: each row's decision and the (row, seed) points wanted
        now (studies.sequential.decide_study)."""
        s = self.study
        records = [
            {"row": t.row, "seed": t.seed, "status": t.status, "value": t.value(s.metric)} for t in trials
        ]
        return decide_study(s.adaptive, [r.label for r in s.rows], s.baseline, s.direction, records)

    def wanted_keys(
        self, trials: list[StoredTrial], decision: StudyDecision | None = None
    ) -> set[tuple] | None:
        """The grid keys the study needs now: None (every point) unless its seeds are adaptive; then each
        row's initial seeds and the next seed of every unresolved row and of the baseline. decision: the
        rule already applied to these trials (self.decide), not computed again."""
        if not self.adaptive:
            return None
        return {(row, None, seed) for row, seed in (decision or self.decide(trials)).wanted}

    def expected_keys(self, trials: list[StoredTrial], decision: StudyDecision | None = None) -> list[tuple]:
        """The grid keys the study counts as its points so far: every point; with adaptive seeds the points
        the rule wants now plus any that have trials (a point the rule stopped wanting after it ran)."""
        wanted = self.wanted_keys(trials, decision)
        if wanted is None:
            return [p.key for p in self.points]
        have = wanted | {t.key for t in trials}
        return [p.key for p in self.points if p.key in have]

    def search_space(self) -> dict[str, Any]:
        """Optuna distributions: row/variant/seed categoricals (ablation) or the tuned params."""
        import optuna.distributions as d

        s = self.study
        if self.is_grid:
            space = {"row": d.CategoricalDistribution([r.label for r in s.rows])}
            if s.variants:
                space["variant"] = d.CategoricalDistribution([v.label for v in s.variants])
            space["seed"] = d.CategoricalDistribution(list(s.seeds))
            return space
        return {p.name: p.distribution() for p in s.params}

    def point_for_params(self, params: dict[str, Any]) -> GridPoint:
        key = (params["row"], params.get("variant"), params["seed"])
        for p in self.points:
            if p.key == key:
                return p
        raise KeyError(f"no grid point {key}")

    def overrides_for_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Overrides of one tuning trial: base <- study <- sampled params <- --set <- seed."""
        o = dict(self.base_overrides)
        o["seed"] = self.study.seed
        o.update(self.run_overrides)
        o.update(params)
        return o

    def config_for_params(self, params: dict[str, Any]) -> Config:
        """The config of one tuning trial (sampled within the validated search space)."""
        return make_config(self.preset, self.overrides_for_params(params))


def make_plan(
    spec: Spec,
    name: str,
    preset: str | None = None,
    cli_overrides: dict[str, Any] | None = None,
    derived_overrides: dict[str, Any] | None = None,
) -> Plan:
    """Resolve and validate every trial config of study `name` (make_config on each). cli_overrides: --set;
    derived_overrides: keys the runner derives (threads per trial), which --set overrides."""
    study = spec.study(name)
    preset = preset or spec.preset
    cli = dict(cli_overrides or {})
    ctx = SourceLines(spec.path, study.lines)
    base = {**spec.base_overrides, **study.overrides}
    run = {**(derived_overrides or {}), **cli}
    if preset not in PRESETS:
        raise SpecError(f"--preset: unknown preset {preset!r} (expected one of {list(PRESETS)})")
    try:
        base_config = make_config(preset, {**base, **run})
    except ConfigError as e:
        # Blame the source: a preset may be incomplete on its own (paper needs data.root from --set),
        # so judge the preset together with --set, and the study's set on top of both.
        try:
            make_config(preset, run)
        except ConfigError:
            raise SpecError(f"{'--set' if cli else '--preset'}: {e}") from None
        raise ctx.err(("studies", name, "set"), str(e)) from None
    points: list[GridPoint] = []
    if study.kind.is_grid:
        n = 0
        variants: list[Variant | None] = list(study.variants) or [None]
        for (ri, row), (vi, var) in itertools.product(enumerate(study.rows), enumerate(variants)):
            o = {**base, **row.overrides, **(var.overrides if var else {})}
            where = (
                ("studies", name, "variants", vi, "set")
                if var is not None and var.overrides
                else ("studies", name, "rows", ri, "set")
            )
            for seed in study.seeds:
                own = {**o, "seed": seed}
                ov = {**own, **run}
                try:
                    cfg = make_config(preset, ov)
                except ConfigError as e:
                    try:  # the row alone, or only with its variant?
                        make_config(preset, {**base, **row.overrides, "seed": seed, **run})
                    except ConfigError:
                        where = ("studies", name, "rows", ri, "set")
                    raise ctx.err(where, str(e)) from None
                point = GridPoint(
                    n, row.label, var.label if var else None, seed, ov, trial_cost(cfg), cfg, own
                )
                points.append(point)
                n += 1
    else:
        base_config = make_config(preset, {**base, "seed": study.seed, **run})
        for p in study.params:
            path = ("studies", name, "params", p.name)
            if p.name in cli:
                raise SpecError(f"--set {p.name}: this key is tuned by study {name!r}; drop it from --set")
            values = list(p.choices) if p.type == "categorical" else [p.low, p.high]
            for v in values:
                try:
                    make_config(preset, {**base, "seed": study.seed, **run, p.name: v})
                except ConfigError as e:
                    raise ctx.err(path, str(e)) from None
    derived = dict(derived_overrides or {})
    return Plan(study, preset, base, cli, derived, tuple(points), spec.path, base_config)


CONFIRM_BASELINE = "preset"  # the confirmation's baseline row: the preset's own values of the tuned keys


def confirm_name(name: str) -> str:
    """The confirmation of tuning study NAME is the ablation study NAME.confirm, in the same store."""
    return f"{name}.confirm"


def top_sets(plan: Plan, trials: list[StoredTrial]) -> list[Row]:
    """The tuning study's `confirm.top` best complete trials with distinct parameters, best first, as rows
    labelled by their Optuna number ("#12")."""
    s = plan.study
    sign = -1.0 if s.direction == "minimize" else 1.0
    done = [(t, t.value(s.metric)) for t in trials if t.status == Status.COMPLETE]
    done = sorted(
        ((t, v) for t, v in done if v is not None), key=lambda x: (-sign * x[1], x[0].optuna_number)
    )
    rows, seen = [], set()
    for t, v in done:
        key = tuple(sorted(t.params.items()))
        if key in seen:
            continue
        seen.add(key)
        what = f"search trial #{t.optuna_number}: {100 * v:.2f} % on seed {t.seed}"
        rows.append(Row(label=f"#{t.optuna_number}", overrides=dict(t.params), description=what))
        if len(rows) == s.confirm.top:
            break
    return rows


def confirm_plan(
    plan: Plan, trials: list[StoredTrial], stored_rows: Sequence[Row] | None = None
) -> Plan | None:
    """The confirmation of a tuning study: an adaptive ablation NAME.confirm whose baseline row is the
    preset's own values (no tuned key set) and whose other rows are the search's top sets (top_sets;
    stored_rows, the rows a previous run chose, win, so a rerun confirms the same sets), on fresh seeds
    under the study's confirm rule. None when the study has no confirmation or no complete trial."""
    s = plan.study
    if plan.is_grid or s.confirm is None:
        return None
    if stored_rows:
        rows = [r for r in stored_rows if r.label != CONFIRM_BASELINE]
    else:
        rows = top_sets(plan, trials)
    if not rows:
        return None
    rows = [
        Row(label=CONFIRM_BASELINE, overrides={}, description="the preset's own values of the tuned keys")
    ] + rows
    name = confirm_name(s.name)
    rule = s.confirm.rule
    raw = {
        "kind": StudyKind.ABLATION.value,
        "description": f"Confirmation of {s.name}: its top {len(rows) - 1} parameter sets re-run on fresh "
        "seeds, each paired against the preset's own values",
        "metric": s.metric,
        "stage_metric": s.stage_metric,
        "direction": s.direction,
        "seeds": rule.record(),
        "baseline": CONFIRM_BASELINE,
        "rows": [{"label": r.label, "set": r.overrides, "description": r.description} for r in rows],
        "confirms": s.name,
    }
    study = Study(name=name, kind=StudyKind.ABLATION, description=raw["description"], paper_table=None,
                  metric=s.metric, stage_metric=s.stage_metric, direction=s.direction, overrides={},
                  seeds=rule.sequence(), adaptive=rule, baseline=CONFIRM_BASELINE, rows=tuple(rows),
                  raw=raw, lines={})  # fmt: skip
    spec = Spec(plan.study_file, "", plan.preset, dict(plan.base_overrides), {name: study})
    return make_plan(spec, name, plan.preset, plan.cli_overrides, plan.derived_overrides)
