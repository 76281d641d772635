"""Cells and formats the report's tables share: percent with one decimal, mean ± std, markdown tables, metric
names for headers and axes, a trial's result.json leaf, values per seed."""

from __future__ import annotations

import math

import pandas as pd

from studies.records import dig, finite


def leaf(df: pd.DataFrame, path: str) -> pd.Series:
    """result.json leaf `path` of each trial in df, as floats (NaN where missing)."""
    return pd.Series([finite(dig(r, path)) for r in df["result"]], index=df.index, dtype=float)


def pct(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * x:.1f}"


def signed(x) -> str:
    return "–" if x is None or pd.isna(x) else f"{100 * x:+.1f}"


def paper(x) -> str:
    return "–" if x is None else f"{float(x):.1f}"


def stats(values: pd.Series) -> tuple[float, float, int]:
    v = pd.Series(values, dtype=float).dropna()
    return (v.mean() if len(v) else math.nan), (v.std(ddof=1) if len(v) > 1 else math.nan), len(v)


def mean_std(values: pd.Series) -> str:
    m, s, n = stats(values)
    return "–" if n == 0 else f"{pct(m)} ± {pct(s) if n > 1 else '–'}"


def markdown(header: list[str], rows: list[list]) -> str:
    def cell(c) -> str:
        return str(c).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(cell, r)) + " |" for r in rows])


def check(v) -> str:
    """A check-mark column cell: ✓ for true, blank for false/missing, other values as written ("seg")."""
    return "✓" if v is True else "" if v in (False, None) else str(v)


def metric_label(metric: str) -> str:
    last = metric.split(".")[-1]
    return {"miou": "mIoU (%)", "miou_post": "mIoU post-proc. (%)"}.get(last, f"{metric} (%)")


# What a result.json leaf (a study's metric or stage_metric) measures, for figure axes: name and unit.
METRIC_NAMES = {
    "final.miou": "final val mIoU",
    "final.miou_post": "final val mIoU, post-processed",
    "initial_pgt.miou": "initial pseudo-label mIoU (train)",
    "initial_pgt.precision": "initial pseudo-label precision (train)",
    "initial_pgt.recall": "initial pseudo-label recall (train)",
    "val.miou": "val mIoU",
    "val.miou_post": "val mIoU, post-processed",
    "pgt.miou": "pseudo-label mIoU (train)",
    "pgt.precision": "pseudo-label precision (train)",
    "pgt.recall": "pseudo-label recall (train)",
}


def metric_name(metric: str, unit: str = "%") -> str:
    """'final val mIoU (%)' for 'final.miou': a figure axis label, human name and unit."""
    return f"{METRIC_NAMES.get(metric, metric)} ({unit})"


def seed_values(df: pd.DataFrame, column: str = "value") -> dict[int, float]:
    """seed -> the column's value over these trials (the mean if a seed ran twice); missing values skipped."""
    d = df[df[column].notna()]
    return {int(k): float(v) for k, v in d.groupby("seed")[column].mean().items()}
