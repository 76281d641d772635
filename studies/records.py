"""What the results store hands to everything above it (the run's summary, the live display, the plan's
adaptive rule, reports): typed records with their JSON already decoded and statuses as `Status`.

    store.study(name)     -> StoredStudy   (its spec.Study rebuilt from the stored study.yaml mapping)
    store.trials(name)    -> [StoredTrial]  (ordered by Optuna number)
    store.study_stages(name), store.stages(harness_id) -> [StoredStage]
    store.trial_progress(name) -> [TrialProgress]  (what a live display polls: no JSON columns)
    store.claims(name)    -> [StoredClaim]

Identifiers: `harness_id` is the harness's trial id (the primary key of harness_trials), `optuna_number`
the trial's number in its Optuna study. A grid point is `key` = (row, variant, seed), its (row, variant)
pair a `group`, labelled by group_label.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from core.records import END_STATUSES, Status

if TYPE_CHECKING:
    from studies.spec import Study

__all__ = [
    "END_STATUSES",
    "Status",
    "StoredClaim",
    "StoredStage",
    "StoredStudy",
    "StoredTrial",
    "TrialPoint",
    "TrialProgress",
    "dig",
    "finite",
    "group_label",
]


def finite(x: Any) -> float | None:
    """A finite float or None (NaN/inf are not portable across databases, nor meaningful as metrics)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def dig(d: Any, path: str) -> Any:
    """A result.json leaf by dotted path ("final.miou"); None when missing."""
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d


def group_label(row: str, variant: str | None) -> str:
    """The label of a (row, variant) group, wherever one is printed: 'seg', or 'seg [full]' with a variant."""
    return row + (f" [{variant}]" if variant else "")


@dataclass(frozen=True)
class StoredStudy:
    """A study as stored: its definition (rebuilt from the stored study.yaml mapping, defaults applied by
    studies.spec), the preset it ran on, and the last run's --set and --study-file (for a reproduce line)."""

    name: str
    spec: Study
    preset: str | None
    created_at: datetime | None
    cli_overrides: dict[str, Any] = field(default_factory=dict)
    study_file: str | None = None  # absolute path, when not ./study.yaml


@dataclass(frozen=True)
class TrialPoint:
    """What every trial record starts with: which trial, at which grid point, in which state."""

    harness_id: int
    optuna_number: int
    row: str
    variant: str | None
    seed: int
    status: Status
    error: str | None

    @property
    def key(self) -> tuple[str, str | None, int]:
        return (self.row, self.variant, self.seed)

    @property
    def group(self) -> tuple[str, str | None]:
        return (self.row, self.variant)


@dataclass(frozen=True)
class StoredTrial(TrialPoint):
    """One harness trial (an attempt at a grid point, or one tuning trial)."""

    params: dict[str, Any]  # the Optuna params (grid: row, variant, seed; tuning: the sampled values)
    config: dict[str, Any]  # the resolved core Config (Config.to_dict())
    result: dict[str, Any] | None  # result.json (core.records.TrialRecord); None until the trial ends
    started_at: datetime | None
    finished_at: datetime | None
    seconds: float | None
    warmup_cached: bool | None
    warmup_seconds: float | None
    code_version: str
    host: str
    pid: int | None
    heartbeat_at: float | None  # unix time
    final_miou: float | None
    final_miou_post: float | None
    initial_precision: float | None
    initial_recall: float | None
    initial_miou: float | None

    def value(self, metric: str) -> float | None:
        """The trial's value of a study metric ("final.miou"): its result.json leaf, else (a trial stored
        without result.json) the column of the same name."""
        if self.result is not None:
            return finite(dig(self.result, metric))
        return finite(getattr(self, metric.replace(".", "_"), None))


@dataclass(frozen=True)
class StoredStage:
    """One stage of a trial (result.json's stages[i]) with its trial's grid point and status."""

    harness_id: int
    stage: int
    row: str
    variant: str | None
    seed: int
    status: Status
    val_miou: float | None
    val_miou_post: float | None
    per_class_iou: list[float | None] | None
    pgt_precision: float | None
    pgt_recall: float | None
    pgt_miou: float | None
    seconds: float | None


@dataclass(frozen=True)
class TrialProgress(TrialPoint):
    """What a live display polls every few seconds: a trial without its JSON, with its stage count."""

    started_at: datetime | None
    seconds: float | None
    host: str
    pid: int | None
    stages: int


@dataclass(frozen=True)
class StoredClaim:
    """A grid point's claim (studies.models.ClaimRow): state running (held) or done (its trial ended)."""

    point: str  # canonical JSON of [row, variant, seed] (store.point_key)
    state: Status
    owner: str
    host: str
    pid: int
    heartbeat_at: float
    harness_id: int | None
