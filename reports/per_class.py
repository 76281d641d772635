"""Per-class IoU: mean over seeds of the last stage's val per-class IoU, per (row, variant)."""

from __future__ import annotations

import pandas as pd

from core.data.voc import VOC_CLASSES  # numpy and PIL only: the report never loads torch
from studies.records import dig, group_label

from .format import markdown, pct
from .load import StudyResults


def class_names(study: StudyResults, n: int) -> list[str]:
    """result.dataset.class_names when some result of length n has them; else VOC's 21 names (results
    written before dataset.class_names existed), or 'class k'."""
    for r in study.trials["result"]:
        names = dig(r, "dataset.class_names")
        if isinstance(names, list) and len(names) == n:
            return [str(x) for x in names]
    return list(VOC_CLASSES) if n == 21 else ["background", *(f"class {k}" for k in range(1, n))]


def per_class_frame(study: StudyResults) -> pd.DataFrame | None:
    """Classes x configurations: mean over the complete trials' last-stage per-class IoU (fractions; NaN
    where the class is absent from val in every seed). None when no trial recorded per-class IoU."""
    done = study.complete[study.complete["per_class_iou"].map(lambda x: isinstance(x, list) and len(x) > 0)]
    if done.empty:
        return None
    n = int(done["per_class_iou"].map(len).max())
    columns = {}
    for row, variant in study.groups():
        g = done[(done["row"] == row) & (done["variant"] == variant)]
        if not g.empty:
            seeds = pd.DataFrame([list(x) + [None] * (n - len(x)) for x in g["per_class_iou"]], dtype=float)
            columns[group_label(row, variant)] = seeds.mean(skipna=True).to_numpy()
    return pd.DataFrame(columns, index=class_names(study, n))


def per_class_table(frame: pd.DataFrame | None) -> str | None:
    if frame is None:
        return None
    body = [
        [f"{name} (absent from val)" if pd.isna(values).all() else name, *map(pct, values)]
        for name, values in zip(frame.index, frame.to_numpy())
    ]
    return markdown(["Class", *frame.columns], body) + (
        "\n\n*IoU (%) of each class on val after the last stage, mean over the complete seeds "
        "(– = class absent from val in every seed: no pixel of it in the ground truth or the prediction).*"
    )
