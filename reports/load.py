"""One study's results, read from the results store through its read API (studies.store), as pandas frames.

Every number in a report comes from here: the store's typed records (studies.records: the study's definition
as a spec.Study, its trials and stages, JSON already decoded) and, for tuning studies, Optuna's study in the
same database. The frames' columns are the records' fields, plus what a report derives per trial.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

import pandas as pd

from core.errors import HarnessError
from studies.db import StoreError, check_reachable, redact_url
from studies.progress import Progress, grid_points, progress
from studies.quality import is_collapsed, last_stage_iou
from studies.records import Status, StoredStage, StoredTrial
from studies.sequential import SeedRule, StudyDecision, decide_study
from studies.spec import Row, Study
from studies.store import Store


class ReportError(HarnessError):
    """A report cannot be built (malformed URL, unreachable or missing store, empty store, unknown study)."""


@dataclass
class StudyResults:
    name: str
    url: str
    spec: Study  # the study's definition, as stored with it
    preset: str | None
    created_at: object
    trials: pd.DataFrame  # one row per trial: StoredTrial's fields, `value` = the spec metric,
    # `per_class_iou` = the last stage's val per-class IoU, `collapsed` = is_collapsed of it
    stages: pd.DataFrame  # one row per (trial, stage): StoredStage's fields
    cli_overrides: dict[str, Any] = field(default_factory=dict)  # the last run's --set
    study_file: str | None = None  # the last run's --study-file (None: ./study.yaml)

    @property
    def metric(self) -> str:
        return self.spec.metric

    @property
    def stage_metric(self) -> str:
        return self.spec.stage_metric

    @property
    def direction(self) -> str:
        return self.spec.direction

    @property
    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials.status == Status.COMPLETE]

    @property
    def n_seeds(self) -> int | None:
        """Seeds every (row, variant) should have; None for a tuning study or adaptive seeds."""
        return len(self.spec.seeds) if self.spec.kind.is_grid and self.seed_rule is None else None

    @property
    def seed_rule(self) -> SeedRule | None:
        """The adaptive seed rule of an ablation whose spec gives `seeds: {initial, max, ...}`, else None."""
        return self.spec.adaptive if self.spec.kind.is_grid else None

    def decisions(self) -> StudyDecision | None:
        """Each row's adaptive-seed decision (studies.sequential) from the stored trials, or None."""
        rule = self.seed_rule
        if rule is None:
            return None
        records = self.trials[["row", "seed", "status", "value"]].to_dict("records")
        return decide_study(
            rule, [r.label for r in self.spec.rows], self.spec.baseline, self.direction, records
        )

    def points(self, row: str | None = None, variant: str | None = None) -> list[tuple[str, str, int]] | None:
        """The grid's (row, variant, seed) keys from the spec (only those of `row` / `variant` when given);
        with adaptive seeds the points the rule wants so far and those that ran; None for a tuning study."""
        t = self.trials
        ran = zip(t["row"], t["variant"], t["seed"])
        return grid_points(self.spec, ran, self.decisions(), row, variant)

    def progress(self, row: str | None = None, variant: str | None = None) -> Progress:
        """Points complete vs attempts (studies.progress), for the whole study or one row / (row, variant)."""
        t = self.trials
        if row is not None:
            t = t[t["row"] == row]
        if variant is not None:
            t = t[t["variant"] == variant]
        attempts = list(zip(zip(t["row"], t["variant"], t["seed"]), t["status"]))
        points = self.points(row, variant)
        if points is not None:
            return progress(attempts, points)
        return progress(attempts, budget=self.spec.n_trials)  # tuning: the trial budget

    def variant_order(self) -> list[str]:
        """The spec's variant labels, then any others found; [""] for a study without variants."""
        labels = [v.label for v in self.spec.variants]
        found = [v for v in self.trials["variant"].unique() if v not in labels]
        return labels + sorted(found) or [""]

    def groups(self) -> list[tuple[str, str]]:
        """(row, variant) in the report's order: rows as in the spec, variants as in the spec."""
        return [(r, v) for r in self.row_order() for v in self.variant_order()]

    def row_order(self) -> list[str]:
        labels = [r.label for r in self.spec.rows]
        return labels + [r for r in self.trials["row"].dropna().unique() if r not in labels]

    def param_keys(self) -> list[str]:
        """Tuned parameter names: the spec's order, then any others found in the trials."""
        found = (p for ps in self.trials["params"] for p in ps)
        return list(dict.fromkeys([*(p.name for p in self.spec.params), *found]))

    def row_spec(self, label: str) -> Row:
        """The spec's row of that label; an empty Row for a label the trials have but the spec does not."""
        return next((r for r in self.spec.rows if r.label == label), Row(label=label))


def open_store(name: str, url: str) -> Store:
    """The store at url, checked readable (it exists and holds a study); ReportError in one line if not."""
    try:
        store = Store(url, create=False)
    except Exception as e:  # a malformed URL or unknown database kind comes out of SQLAlchemy as raised
        raise ReportError(_unreadable(url, e)) from e
    try:
        store.check_readable()
    except StoreError as e:  # no file, no harness tables, no studies
        store.close()
        raise ReportError(f"{e} (run `python -m studies.run {name}` first)") from e
    except Exception as e:  # server unreachable, not a database, ...
        store.close()
        raise ReportError(_unreadable(url, e)) from e
    return store


def _unreadable(url: str, e: Exception) -> str:
    """check_reachable's one line (malformed URL, unknown database kind, missing driver, unreachable
    server, SQLite folder not writable), else the error's first line."""
    try:
        check_reachable(url)
    except StoreError as why:
        return str(why)
    first = str(e).strip().splitlines()
    return (
        f"cannot read the results store {redact_url(url)} ({type(e).__name__}: {first[0] if first else ''})"
    )


def _frame(records: list, kind: type) -> pd.DataFrame:
    """One row per record, one column per field of the record type (also when there are none)."""
    names = [f.name for f in fields(kind)]
    return pd.DataFrame([[getattr(r, n) for n in names] for r in records], columns=names)


def load_study(name: str, url: str) -> StudyResults:
    """Study `name` from the store at url; ReportError for a store that cannot be read or an unknown study."""
    store = open_store(name, url)
    try:
        stored = store.study(name)
        trial_records = store.trials(name)
        stage_records = store.study_stages(name)
    except StoreError as e:  # unknown study (the message names the known ones)
        raise ReportError(str(e)) from e
    finally:
        store.close()
    trials, stages = _frame(trial_records, StoredTrial), _frame(stage_records, StoredStage)
    for df in (trials, stages):
        df["variant"] = df["variant"].fillna("").astype(str)
    trials["value"] = pd.Series(
        [t.value(stored.spec.metric) for t in trial_records], index=trials.index, dtype=float
    )
    # Collapse is decided here, from the stored stages, so stores written before the flag existed get it too.
    last_iou = {s.harness_id: s.per_class_iou for s in stage_records}  # ordered by stage: the last one wins
    trials["per_class_iou"] = pd.Series(
        [
            last_iou.get(t.harness_id) if last_iou.get(t.harness_id) is not None else last_stage_iou(t.result)
            for t in trial_records
        ],
        index=trials.index,
        dtype=object,
    )
    trials["collapsed"] = trials["per_class_iou"].map(is_collapsed).astype(bool)
    return StudyResults(
        name,
        url,
        stored.spec,
        stored.preset,
        stored.created_at,
        trials,
        stages,
        stored.cli_overrides,
        stored.study_file,
    )


def optuna_study(study: StudyResults):
    """The Optuna study of the same name (tuning studies), through the store's Optuna storage."""
    import optuna

    return optuna.load_study(study_name=study.name, storage=Store(study.url, create=False).optuna_storage())
