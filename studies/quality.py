"""Trial quality checks shared by the run summary, the Optuna user attributes and the reports.

A trial is *collapsed* when its val prediction gets IoU 0 on every foreground class: the network
predicts background everywhere (or never a correct foreground pixel). Its mIoU is then the
background IoU over the number of classes present, a small number that looks like a real result.
"""

from __future__ import annotations

import math
from typing import Any

COLLAPSED_MEANING = "predicts background everywhere on val (IoU 0 on every foreground class)"


def is_collapsed(per_class_iou: Any) -> bool:
    """True when every foreground entry (index 1 on) that has a value is exactly 0 and there is at
    least one such entry. None / NaN entries are classes absent from val and are skipped; a list with
    no foreground value at all (or no list) cannot be decided and counts as not collapsed."""
    if not isinstance(per_class_iou, (list, tuple)):
        return False
    values = []
    for v in per_class_iou[1:]:
        try:
            v = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(v):
            values.append(v)
    return bool(values) and all(v == 0.0 for v in values)


def last_stage_iou(result: dict | None) -> list | None:
    """per_class_iou of the last stage of a result.json (None when absent)."""
    stages = (result or {}).get("stages") or []
    last = stages[-1] if stages and isinstance(stages[-1], dict) else {}
    return (last.get("val") or {}).get("per_class_iou")


def result_collapsed(result: dict | None) -> bool:
    """is_collapsed on the last stage of a result.json."""
    return is_collapsed(last_stage_iou(result))
