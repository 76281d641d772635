"""Seaborn figures for a study report (PNG, Agg backend). Each function writes one file and returns
its name (relative to the report), or None when there is nothing to plot."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .load import StudyResults
from .tables import PGT, metric_label, multi_stage_groups

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, out_dir: Path, filename: str) -> str:
    fig.tight_layout()
    fig.savefig(out_dir / filename, dpi=110)
    plt.close(fig)
    return filename


def _group(df: pd.DataFrame) -> pd.Series:
    return df["row"].astype(str) + df["variant"].map(lambda v: f" [{v}]" if v else "")


def metric_bars(study: StudyResults, out_dir: Path, filename: str) -> str | None:
    """Per-row bar (mean, error bar = std over seeds); each seed's values joined across rows by a thin
    line (one line per seed, so paired differences are visible); collapsed trials crossed out; hue = variant
    if any."""
    d = study.complete[study.complete["value"].notna()].assign(pct=lambda x: 100 * x["value"])
    if d.empty:
        return None
    order = [r for r in study.row_order() if r in set(d["row"])]
    variants = [v for v in study.variant_order() if v in set(d["variant"])]
    hue = "variant" if d["variant"].ne("").any() else None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.4 * len(order) + 1), 4.2))
    sns.barplot(
        data=d,
        x="row",
        y="pct",
        order=order,
        hue=hue,
        hue_order=variants if hue else None,
        errorbar="sd",
        alpha=0.45,
        capsize=0.15,
        ax=ax,
    )
    width = 0.8 / len(variants)  # seaborn's dodge: bars of one category share 0.8 of its slot
    seeds = sorted(d["seed"].unique())
    for color, seed in zip(sns.color_palette("dark", len(seeds)), seeds):
        for j, v in enumerate(variants):
            s = d[(d["seed"] == seed) & (d["variant"] == v)].groupby("row")["pct"].mean()
            x = [i + (-0.4 + width * (j + 0.5) if hue else 0.0) for i in range(len(order))]
            ax.plot(
                x,
                [s.get(r, float("nan")) for r in order],
                marker="o",
                markersize=4.5,
                linewidth=0.9,
                alpha=0.85,
                color=color,
                label=f"seed {seed}" if j == 0 else None,
            )
    bad = d[d["collapsed"]]
    if not bad.empty:
        xs = [
            order.index(t.row) + (-0.4 + width * (variants.index(t.variant) + 0.5) if hue else 0.0)
            for t in bad.itertuples()
        ]
        ax.scatter(xs, bad["pct"], marker="x", s=70, color="red", zorder=5, label="collapsed")
    ax.legend(fontsize="small", ncol=2 if len(seeds) > 4 else 1)
    lo, hi = d["pct"].min(), d["pct"].max()
    ax.set_ylim(max(0.0, lo - 0.15 * (hi - lo + 5)), hi + 0.15 * (hi - lo + 5))
    ax.set(xlabel="", ylabel=metric_label(study.metric))
    ax.set_title(f"{study.name}: {study.metric}\n(bars: mean ± std; lines: one seed each)", fontsize="medium")
    ax.tick_params(axis="x", labelrotation=15 if len(order) > 3 else 0)
    return _save(fig, out_dir, filename)


def per_class_heatmap(frame: pd.DataFrame | None, out_dir: Path, filename: str, title: str) -> str | None:
    """Classes x configurations heat map of the per-class IoU (%), mean over seeds (reports.per_class)."""
    if frame is None or frame.empty:
        return None
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(frame.columns) + 2.5), 0.32 * len(frame) + 1.6))
    sns.heatmap(
        100 * frame,
        annot=True,
        fmt=".1f",
        cmap="viridis",
        vmin=0,
        vmax=100,
        linewidths=0.5,
        cbar_kws={"label": "IoU (%)"},
        annot_kws={"size": 7},
        ax=ax,
    )
    ax.set(xlabel="", ylabel="", title=title)
    ax.tick_params(axis="x", labelrotation=20 if len(frame.columns) > 3 else 0)
    return _save(fig, out_dir, filename)


def stage_curves(study: StudyResults, out_dir: Path, filename: str) -> str | None:
    """Left: val mIoU vs stage; right: pseudo-label precision / recall / mIoU of the labels each stage
    trained on."""
    groups = multi_stage_groups(study)
    if not groups:
        return None
    g = study.stages[study.stages.status == "complete"].copy()
    g = g[[k in set(groups) for k in zip(g["row"], g["variant"])]].assign(config=_group)
    init = study.complete.set_index("id")
    for k in PGT:  # stage 0 trains on the initial labels: fill from the trial if the stage row lacks them
        g[f"pgt_{k}"] = g[f"pgt_{k}"].fillna(g["trial_id"].map(init[f"initial_{k}"]).where(g["stage"] == 0))
    long = g.melt(
        id_vars=["config", "stage", "trial_id"],
        value_vars=[f"pgt_{k}" for k in PGT],
        var_name="quantity",
        value_name="v",
    ).dropna(subset=["v"])
    long["quantity"] = long["quantity"].str.removeprefix("pgt_")
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    multi = g["config"].nunique() > 1
    sns.lineplot(
        data=g.assign(pct=100 * g["val_miou"]),
        x="stage",
        y="pct",
        hue="config" if multi else None,
        errorbar="sd",
        marker="o",
        ax=a,
    )
    a.set(xlabel="stage", ylabel="val mIoU (%)", title="Segmentation (val) after each stage")
    if not long.empty:
        sns.lineplot(
            data=long.assign(pct=100 * long["v"]),
            x="stage",
            y="pct",
            hue="quantity",
            style="config" if multi else None,
            errorbar="sd",
            marker="o",
            ax=b,
        )
    b.set(xlabel="labels trained on in stage", ylabel="%", title="Pseudo-label quality (train)")
    for ax in (a, b):
        ax.xaxis.get_major_locator().set_params(integer=True)
    return _save(fig, out_dir, filename)


def param_scatter(study: StudyResults, out_dir: Path, filename: str) -> str | None:
    """Tuning: objective vs each parameter, one panel per parameter."""
    d = study.complete[study.complete["value"].notna()]
    keys = study.param_keys()
    if d.empty or not keys:
        return None
    space = study.spec.get("params") or {}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys) + 0.5, 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        x = pd.DataFrame({"x": [p.get(k) for p in d["params"]], "pct": 100 * d["value"]}).dropna()
        numeric = pd.api.types.is_numeric_dtype(x["x"])
        (sns.scatterplot if numeric else sns.stripplot)(data=x, x="x", y="pct", ax=ax)
        if numeric and (space.get(k) or {}).get("log"):
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel=k, ylabel=metric_label(study.metric))
    fig.suptitle(f"{study.name}: {study.metric} vs parameters")
    return _save(fig, out_dir, filename)


def history(study: StudyResults, out_dir: Path, filename: str) -> str | None:
    """Tuning: objective per trial and the best-so-far curve."""
    d = study.complete[study.complete["value"].notna()].sort_values(["optuna_number", "id"])
    if d.empty:
        return None
    maximize = study.direction != "minimize"
    d = d.assign(
        trial=d["optuna_number"].fillna(pd.Series(range(len(d)), index=d.index)), pct=100 * d["value"]
    )
    d["best"] = d["pct"].cummax() if maximize else d["pct"].cummin()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    sns.scatterplot(data=d, x="trial", y="pct", label="trial", ax=ax)
    sns.lineplot(data=d, x="trial", y="best", drawstyle="steps-post", color="C3", label="best so far", ax=ax)
    ax.set(
        xlabel="trial number", ylabel=metric_label(study.metric), title=f"{study.name}: optimisation history"
    )
    return _save(fig, out_dir, filename)
