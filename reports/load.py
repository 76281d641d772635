"""One study's results, read from the results store through its read API (studies.store), as pandas frames.

Every number in a report comes from here: the harness's trials and stages and, for tuning studies, Optuna's
study in the same database. The spec is the study's study.yaml mapping as stored with the study, already
validated, so only the defaults study.yaml may leave out are applied (once, below).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pandas as pd

from studies.db import StoreError, check_reachable, redact_url
from studies.quality import is_collapsed, last_stage_iou
from studies.sequential import SeedRule, StudyDecision, decide_study, rule_from_record
from studies.store import Store, dig, finite

from .progress import Progress, progress

# The spec keys study.yaml may leave out (studies.spec applies the same defaults when it runs the study).
DEFAULT_METRIC = "final.miou"
DEFAULT_STAGE_METRIC = "val.miou"
DEFAULT_DIRECTION = "maximize"

# The columns the tables read, for a study without trials (or stages) yet: the store returns rows, no schema.
TRIAL_COLUMNS = (
    "id", "optuna_number", "row", "variant", "seed", "status", "error", "seconds", "warmup_cached",
    "code_version", "initial_precision", "initial_recall", "initial_miou", "params", "config", "result",
)  # fmt: skip
STAGE_COLUMNS = (
    "trial_id", "stage", "val_miou", "val_miou_post", "per_class_iou_json", "pgt_precision", "pgt_recall",
    "pgt_miou", "row", "variant", "seed", "status",
)  # fmt: skip


class ReportError(Exception):
    """A report cannot be built (malformed URL, unreachable or missing store, empty store, unknown study)."""


@dataclass
class StudyResults:
    name: str
    url: str
    spec: dict  # the study's study.yaml mapping, as stored
    preset: str | None
    created_at: object
    trials: (
        pd.DataFrame
    )  # one row per trial (store.trials): `params`/`config`/`result` decoded, `value` = the
    # spec metric, `per_class_iou` = the last stage's val per-class IoU, `collapsed` = is_collapsed of it
    stages: pd.DataFrame  # one row per (trial, stage), with the trial's row/variant/seed/status

    @property
    def metric(self) -> str:
        return self.spec.get("metric") or DEFAULT_METRIC

    @property
    def stage_metric(self) -> str:
        return self.spec.get("stage_metric") or DEFAULT_STAGE_METRIC

    @property
    def direction(self) -> str:
        return self.spec.get("direction") or DEFAULT_DIRECTION

    @property
    def complete(self) -> pd.DataFrame:
        return self.trials[self.trials.status == "complete"]

    @property
    def n_seeds(self) -> int | None:
        """Seeds every (row, variant) should have: len(spec seeds); None for a tuning study."""
        seeds = self.spec.get("seeds")
        return len(seeds) if isinstance(seeds, list) else None

    @property
    def seed_rule(self) -> SeedRule | None:
        """The adaptive seed rule of an ablation whose spec gives `seeds: {initial, max, ...}`, else None."""
        seeds = self.spec.get("seeds")
        return (
            rule_from_record(seeds)
            if self.spec.get("kind") == "ablation" and isinstance(seeds, dict)
            else None
        )

    def decisions(self) -> StudyDecision | None:
        """Each row's adaptive-seed decision (studies.sequential) from the stored trials, or None."""
        rule = self.seed_rule
        if rule is None:
            return None
        rows = [r["label"] for r in self.spec.get("rows") or []]
        records = self.trials[["row", "seed", "status", "value"]].to_dict("records")
        return decide_study(rule, rows, self.spec.get("baseline") or rows[0], self.direction, records)

    def points(self, row: str | None = None, variant: str | None = None) -> list[tuple[str, str, int]] | None:
        """The grid's (row, variant, seed) keys from the spec (only those of `row` / `variant` when given);
        with adaptive seeds the points the rule wants so far and those that ran; None for a tuning study."""
        seeds = self.spec.get("seeds")
        if self.spec.get("kind") != "tuning" and isinstance(seeds, dict):
            t = self.trials
            keys = {(r, "", int(s)) for r, s in self.decisions().wanted}
            keys |= {(r, v, int(s)) for r, v, s in zip(t["row"], t["variant"], t["seed"])}
            return sorted(
                k for k in keys if (row is None or k[0] == row) and (variant is None or k[1] == variant)
            )
        if self.spec.get("kind") == "tuning" or not isinstance(seeds, list):
            return None
        rows = [r["label"] for r in self.spec.get("rows") or []]
        variants = [v["label"] for v in self.spec.get("variants") or []] or [""]
        return [
            (r, v, int(s))
            for r in rows
            for v in variants
            for s in seeds
            if (row is None or r == row) and (variant is None or v == variant)
        ]

    def progress(self, row: str | None = None, variant: str | None = None) -> Progress:
        """Points complete vs attempts (reports.progress), for the whole study or one row / (row, variant)."""
        t = self.trials
        if row is not None:
            t = t[t["row"] == row]
        if variant is not None:
            t = t[t["variant"] == variant]
        records = t[["id", "row", "variant", "seed", "status"]].to_dict("records")
        points = self.points(row, variant)
        if points is not None:
            return progress(records, points)
        budget = self.spec.get("n_trials")  # tuning: the trial budget
        return progress(records, budget=budget if isinstance(budget, int) else 0)

    def variant_order(self) -> list[str]:
        """The spec's variant labels, then any others found; [""] for a study without variants."""
        labels = [v["label"] for v in self.spec.get("variants") or []]
        found = [v for v in self.trials["variant"].unique() if v not in labels]
        return labels + sorted(found) or [""]

    def row_order(self) -> list[str]:
        labels = [r["label"] for r in self.spec.get("rows") or []]
        return labels + [r for r in self.trials["row"].dropna().unique() if r not in labels]

    def param_keys(self) -> list[str]:
        """Tuned parameter names: the spec's order, then any others found in the trials."""
        found = (p for ps in self.trials["params"] for p in ps)
        return list(dict.fromkeys([*(self.spec.get("params") or {}), *found]))

    def row_spec(self, label: str) -> dict:
        return next((r for r in self.spec.get("rows") or [] if r["label"] == label), {})


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


def _frame(rows: list[dict], columns: tuple[str, ...]) -> pd.DataFrame:
    return pd.DataFrame(rows) if rows else pd.DataFrame(columns=list(columns))


def load_study(name: str, url: str) -> StudyResults:
    """Study `name` from the store at url; ReportError for a store that cannot be read or an unknown study."""
    store = open_store(name, url)
    try:
        record = store.study_record(name)
        trials = _frame(store.trials(name), TRIAL_COLUMNS)
        stages = _frame(store.study_stages(name), STAGE_COLUMNS)
    except StoreError as e:  # unknown study (the message names the known ones)
        raise ReportError(str(e)) from e
    finally:
        store.close()
    for df in (trials, stages):
        df["variant"] = df["variant"].fillna("").astype(str)
    trials["params"] = trials["params"].map(lambda p: p or {})
    trials["config"] = trials["config"].map(lambda c: c or {})
    study = StudyResults(name, url, record["spec"], record["preset"], record["created_at"], trials, stages)
    column = study.metric.replace(".", "_")  # a trial without result.json: its final_* column, if any
    trials["value"] = pd.Series(
        [
            finite(dig(r, study.metric)) if r else finite(t.get(column))
            for r, (_, t) in zip(trials["result"], trials.iterrows())
        ],
        index=trials.index,
        dtype=float,
    )
    # Collapse is decided here, from the stored stages, so stores written before the flag existed get it too.
    last = stages.sort_values("stage").groupby("trial_id").tail(1)
    last_iou = {i: json.loads(s) if s else None for i, s in zip(last["trial_id"], last["per_class_iou_json"])}
    trials["per_class_iou"] = pd.Series(
        [
            last_iou.get(i) if last_iou.get(i) is not None else last_stage_iou(r)
            for i, r in zip(trials["id"], trials["result"])
        ],
        index=trials.index,
        dtype=object,
    )
    trials["collapsed"] = trials["per_class_iou"].map(is_collapsed).astype(bool)
    return study


def optuna_study(study: StudyResults):
    """The Optuna study of the same name (tuning studies), through the store's Optuna storage."""
    import optuna

    return optuna.load_study(study_name=study.name, storage=Store(study.url, create=False).optuna_storage())
