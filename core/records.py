"""The shape of a trial's result record (``TrialResult.to_dict()``, written as result.json).

    {status, error, config, initial_pgt, stages: [{stage, val, pgt, seconds}, ...], final, warmup,
     seconds, timings, dataset, environment}

Plain typed dicts: they describe what core.trial, core.evaluate and core.metrics already return; nothing
checks them at run time.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, NotRequired, TypedDict


class Status(StrEnum):
    """A trial's state, as result.json and the results store write it (a StrEnum: the stored values are
    these strings). A trial is running, then ends in exactly one of END_STATUSES: `interrupted` means its
    process died or was stopped while it ran (its grid point runs again), `failed` needs --retry-failed.
    DONE is a grid point's claim state once its trial ended (studies.models.ClaimRow), never a trial's."""

    RUNNING = "running"
    COMPLETE = "complete"
    FAILED = "failed"
    PRUNED = "pruned"
    INTERRUPTED = "interrupted"
    DONE = "done"


# The states a trial's record ends in (what finishing a trial may write).
END_STATUSES = (Status.COMPLETE, Status.FAILED, Status.PRUNED, Status.INTERRUPTED)
# The ends that stand: an interrupted trial's grid point runs again, so its end is not final.
FINAL_STATUSES = (Status.COMPLETE, Status.FAILED, Status.PRUNED)


class PgtMetrics(TypedDict):
    """Pseudo-label quality against the true masks (core.metrics.pgt_summary)."""

    precision: float
    recall: float
    miou: float


class ValMetrics(TypedDict):
    """Segmentation on val (core.evaluate.evaluate); miou_post is None without post-processing."""

    miou: float
    miou_post: float | None
    per_class_iou: list[float | None]  # None: the class is in neither ground truth nor prediction


class CurvePoint(TypedDict):
    """Val mIoU on the fixed curve subset (eval.curve_images) after one epoch; epoch counts across stages."""

    epoch: int
    miou: float


class StageRecord(TypedDict, total=False):
    """One stage: val metrics of the net trained on pseudo labels of quality pgt; what report() gets.
    epoch: the global epoch the stage ends on (its step in a learning curve); curve: the stage's
    per-epoch points on the curve subset, its last epoch included (`val`: that epoch on the whole val
    set)."""

    stage: int
    val: ValMetrics
    pgt: PgtMetrics
    seconds: float
    epoch: int
    curve: list[CurvePoint]
    losses: dict[str, float]  # the stage's mean training loss per Eq. 8 term (cls, sal1, sal2, seg1, seg2)


class FinalMetrics(TypedDict):
    """The last stage's val mIoU without and with post-processing."""

    miou: float
    miou_post: float | None


class WarmupRecord(TypedDict):
    cached: bool
    seconds: float  # of the run that trained it, when cached


class DatasetRecord(TypedDict):
    root: str
    n_train: int
    n_val: int
    num_classes: int
    saliency: str
    class_names: list[str]


class EnvironmentRecord(TypedDict):
    precision: str  # bf16 (autocast) or fp32
    torch: str
    python: str
    threads: int
    device: str
    cpu: str
    cpu_capability: str
    kernel_caps: NotRequired[str]  # oneDNN / MKL ISA caps set ("" none); results before issue #38 lack it
    gpu: str | None


class TrialRecord(TypedDict):
    """result.json: one trial."""

    status: Status  # complete | failed
    error: str | None
    config: dict[str, Any]  # Config.to_dict()
    initial_pgt: PgtMetrics | None
    stages: list[StageRecord]
    final: FinalMetrics | None
    warmup: WarmupRecord | None
    seconds: float
    timings: dict[str, float]
    dataset: DatasetRecord | None
    environment: EnvironmentRecord | None
    artifacts: dict[str, str]  # name -> file: "gallery" (core.gallery) when the trial wrote one
