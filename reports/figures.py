"""Seaborn figures for a study report (PNG, Agg backend). Each function writes one file and returns
its name (relative to the report), or None when there is nothing to plot."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle
from matplotlib.transforms import blended_transform_factory

from studies.records import Status, group_label

from .format import metric_name
from .load import StudyResults
from .paired import PairedDelta, better_cell, delta_cell
from .tables import PGT, baseline_deltas, multi_stage_groups

sns.set_theme(style="whitegrid", context="notebook")


def _save(fig, out_dir: Path, filename: str) -> str:
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fig.savefig(out_dir / filename, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return filename


def _group(df: pd.DataFrame) -> pd.Series:
    return pd.Series(
        [group_label(r, v) for r, v in zip(df["row"], df["variant"])], index=df.index, dtype=object
    )


def _seed_offsets(seeds: list) -> dict:
    """A small vertical offset per seed, so equal values of two seeds stay visible as two dots."""
    step = min(0.08, 0.5 / max(len(seeds), 1))
    return {s: (k - (len(seeds) - 1) / 2) * step for k, s in enumerate(seeds)}


def _seed_panel(ax, study: StudyResults, d: pd.DataFrame, order: list[tuple[str, str]]) -> None:
    """The metric of each configuration (one y position per (row, variant)), one dot per seed, each seed's
    dots joined across the rows by a thin line (per variant), the row mean as a black bar, collapsed trials
    crossed out. No bars: the x axis is only as wide as the data."""
    seeds = sorted(d["seed"].unique())
    offset = _seed_offsets(seeds)
    variants = list(dict.fromkeys(v for _, v in order))
    markers = dict(zip(variants, "osD^vP"))
    for color, seed in zip(sns.color_palette("colorblind", len(seeds)), seeds):
        for j, v in enumerate(variants):
            ys = [i for i, (_, vv) in enumerate(order) if vv == v]
            xs = [
                d[(d["row"] == order[i][0]) & (d["variant"] == v) & (d["seed"] == seed)]["pct"].mean()
                for i in ys
            ]
            ax.plot(
                xs,
                [i + offset[seed] for i in ys],
                marker=markers[v],
                markersize=5,
                linewidth=0.9,
                alpha=0.85,
                color=color,
                label=f"seed {seed}" if j == 0 else None,
                gid=f"seed {seed}",
            )
    means = [d[(d["row"] == r) & (d["variant"] == v)]["pct"].mean() for r, v in order]
    ax.plot(
        means,
        range(len(order)),
        linestyle="none",
        marker="|",
        markersize=18,
        markeredgewidth=2.5,
        color="black",
        label="row mean",
        gid="row mean",
        zorder=4,
    )
    for i, m in enumerate(means):
        if pd.notna(m):
            ax.annotate(
                f"{m:.1f}",
                (m, i),
                xytext=(0, 12),
                textcoords="offset points",
                ha="center",
                va="bottom",
                fontsize="x-small",
            )
    bad = d[d["collapsed"]]
    if not bad.empty:
        ys = [order.index((t.row, t.variant)) + offset[t.seed] for t in bad.itertuples()]
        ax.scatter(bad["pct"], ys, marker="x", s=80, color="red", zorder=5, label="collapsed")
    if len(variants) > 1:  # the marker tells the variant
        for v in variants:
            ax.plot([], [], linestyle="none", marker=markers[v], color="0.4", label=f"variant {v}")
    ax.set_yticks(range(len(order)), [group_label(r, v) for r, v in order])
    ax.set_ylim(len(order) - 0.5, -0.5)  # first row on top
    ax.set_xlabel(metric_name(study.metric))
    ax.set_title("per seed (a line joins one seed across rows)", fontsize="medium")


FOREST = "0.15"  # the forest plot's intervals: dark grey, apart from the seeds' colours


def _forest_panel(
    ax,
    deltas: list[tuple[str, str, PairedDelta | None]],
    order: list[tuple[str, str]],
    base: str,
    metric: str,
    rope: float | None,
    interval: str = "95% CI",
    reach: float = math.inf,
) -> None:
    """Forest plot: each row's paired Δ against the baseline row (percent points) with its interval (the
    legend names it: `interval`), a vertical line at zero, the baseline row marked, and the region of
    practical equivalence [-rope, +rope] shaded when rope is given. Interval ends beyond ±reach percent
    points are drawn at ±reach with an arrow head (the label beside the row gives the true ends)."""
    ax.axvline(0, color="black", linewidth=1, zorder=1, gid="zero line", label="no difference")
    if rope is not None:
        ax.axvspan(
            -100 * rope, 100 * rope, color="0.85", zorder=0, gid="rope", label=f"ROPE ±{100 * rope:g} pp"
        )
    label = blended_transform_factory(ax.transAxes, ax.transData)
    for r, v, p in deltas:
        if (r, v) not in order:
            continue
        i = order.index((r, v))
        if p is None:
            ax.plot(
                0,
                i,
                marker="D",
                markersize=7,
                color="black",
                markerfacecolor="white",
                zorder=3,
                gid="baseline",
            )
            ax.annotate(
                "baseline", (0, i), xytext=(8, 0), textcoords="offset points", va="center", fontsize="small"
            )
            continue
        if p.n >= 2:
            x = 100 * p.mean
            lo, hi = max(100 * p.lo, -reach), min(100 * p.hi, reach)
            for end, clipped, head in ((lo, 100 * p.lo < -reach, "<"), (hi, 100 * p.hi > reach, ">")):
                if clipped:
                    ax.plot(end, i, marker=head, color=FOREST, markersize=7, zorder=3, gid="clipped end")
            ax.errorbar(
                x,
                i,
                xerr=[[x - lo], [hi - x]],
                fmt="o",
                color=FOREST,
                capsize=4,
                markersize=6,
                zorder=3,
                gid=f"interval {group_label(r, v)}",
            )
        elif p.n == 1:
            ax.plot(100 * p.mean, i, marker="o", markerfacecolor="white", color=FOREST, zorder=3)
        ax.text(
            1.03,
            i,
            f"{delta_cell(p)}  {better_cell(p)}" if p.n else delta_cell(p),
            transform=label,
            va="center",
            fontsize="small",
        )
    ax.errorbar([], [], xerr=[], fmt="o", color=FOREST, capsize=4, markersize=6, label=f"mean Δ, {interval}")
    ax.set_xlabel(f"paired Δ {metric_name(metric, 'percent points')}")
    ax.set_title(f"vs {base}, same seed", fontsize="medium")
    ax.tick_params(axis="y", left=False)

    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:+g}" if x else "0"))


def draw_metric(study: StudyResults, rope: float | None = None):
    """The report's metric figure, or None without complete values: left, the metric per configuration,
    one dot per seed joined across rows, row means marked (no bars); right, when the spec names a baseline
    row and there is another row, a forest plot of each row's paired Δ against it with its 95% interval (with
    adaptive seeds the rule's deciding interval, ends past 2.5x the largest |mean Δ| drawn as arrow heads)
    (tables.baseline_deltas: the numbers of the table's paired column), a zero line, the baseline marked,
    and [-rope, +rope] shaded when rope is given (rope in the store's unit, a fraction: 0.005 = 0.5 percent
    points). The panels' axes carry the labels "per seed" and "paired Δ" (Axes.get_label)."""
    d = study.complete[study.complete["value"].notna()].assign(pct=lambda x: 100 * x["value"])
    if d.empty:
        return None
    order = study.groups()  # every row, also one without a value yet (marked, not dropped)
    all_deltas = baseline_deltas(study)
    deltas = [x for x in all_deltas if (x[0], x[1]) in order]
    forest = any(p is not None for _, _, p in deltas)
    size = (12 if forest else 7.5, 0.55 * len(order) + 2.4)
    if forest:
        fig, (a, b) = plt.subplots(1, 2, figsize=size, sharey=True, width_ratios=[3, 2], layout="constrained")
    else:
        fig, a = plt.subplots(figsize=size, layout="constrained")
    a.set_label("per seed")
    _seed_panel(a, study, d, order)
    mark_rows_without_values(a, d, order)
    if forest:
        b.set_label("paired Δ")
        base = next((group_label(r, v) for r, v, p in all_deltas if p is None), study.spec.baseline)
        if study.seed_rule is None:
            _forest_panel(b, deltas, order, base, study.metric, rope)
        else:  # adaptive seeds: the rule's deciding interval, wide at the first looks: clipped to the data
            means = [abs(100 * p.mean) for _, _, p in deltas if p is not None and p.n >= 2]
            reach = max([FOREST_MIN_HALF_PP, 150 * rope if rope else 0.0] + [2.5 * m for m in means])
            name = f"deciding interval ({study.seed_rule.method})"
            _forest_panel(b, deltas, order, base, study.metric, rope, name, reach)
        mark_rows_without_pairs(b, deltas, order)
        widen_forest_axis(b, rope)
    handles, labels = [], []
    for ax in fig.axes:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize="small")
    fig.suptitle(f"{study.name}: {metric_name(study.metric)}{partial_suffix(study)}", fontsize="large")
    return fig


# A partial study's figure (trials running, points missing): the title says so, as the report's does, and a
# row without values or pairs yet keeps its place with a note instead of vanishing (issue #37).
PENDING = "0.45"  # the notes' grey


def partial_suffix(study: StudyResults) -> str:
    """' (partial: 8/15 points complete, 2 running)' while the study is partial, else ''."""
    from .provenance import partial_text

    what = partial_text(study)
    return f" (partial: {what})" if what else ""


def mark_rows_without_values(ax, d: pd.DataFrame, order: list[tuple[str, str]]) -> None:
    """'no complete trial yet' on the rows of the seed panel that have no value to plot."""
    present = set(zip(d["row"], d["variant"]))
    at = blended_transform_factory(ax.transAxes, ax.transData)
    for i, g in enumerate(order):
        if g not in present:
            ax.text(0.5, i, "no complete trial yet", transform=at, ha="center", va="center",
                    fontsize="small", fontstyle="italic", color=PENDING, gid="no values")  # fmt: skip


def mark_rows_without_pairs(ax, deltas: list[tuple[str, str, PairedDelta | None]], order) -> None:
    """'no paired seeds yet' on the forest rows whose row shares no complete seed with the baseline."""
    at = blended_transform_factory(ax.transAxes, ax.transData)
    for r, v, p in deltas:
        if p is not None and p.n == 0 and (r, v) in order:
            ax.text(0.5, order.index((r, v)), "no paired seeds yet", transform=at, ha="center", va="center",
                    fontsize="small", fontstyle="italic", color=PENDING, gid="no pairs",
                    bbox={"facecolor": "white", "edgecolor": "none", "pad": 1})  # fmt: skip


FOREST_MIN_HALF_PP = 1.0  # the forest axis spans at least ±1 percent point (or ±1.5 x the rope)


def widen_forest_axis(ax, rope: float | None) -> None:
    """Keep what is drawn and widen the forest's x axis around zero to at least ±FOREST_MIN_HALF_PP (±1.5 x
    the rope when wider): with nothing but the baseline at 0, matplotlib's own limits are ±0.04 points, an
    axis that means nothing."""
    half = max(FOREST_MIN_HALF_PP, 150 * rope if rope else 0.0)
    lo, hi = ax.get_xlim()
    ax.set_xlim(min(lo, -half), max(hi, half))


def metric_figure(study: StudyResults, out_dir: Path, filename: str, rope: float | None = None) -> str | None:
    """draw_metric, written to out_dir/filename."""
    fig = draw_metric(study, rope)
    return None if fig is None else _save(fig, out_dir, filename)


ABSENT = "absent from val"


def draw_per_class_heatmap(frame: pd.DataFrame | None, title: str):
    """Classes x configurations heat map of the per-class IoU (%), mean over seeds (reports.per_class), or
    None without data. A class absent from val in every configuration (IoU undefined: no pixel of it in the
    ground truth or the prediction) is labelled '<class> (absent from val)' and its row hatched grey with
    that text; a single undefined cell is hatched with '–'."""
    if frame is None or frame.empty:
        return None
    absent = frame.isna().all(axis=1).to_numpy()
    data = 100 * frame
    data.index = [f"{c} ({ABSENT})" if a else str(c) for c, a in zip(frame.index, absent)]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 * len(frame.columns) + 3.5), 0.32 * len(frame) + 1.6))
    sns.heatmap(
        data,
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
    for i, row in enumerate(data.to_numpy()):
        for j in (k for k, v in enumerate(row) if pd.isna(v)):
            ax.add_patch(
                Rectangle(
                    (j, i), 1, 1, facecolor="0.92", edgecolor="0.65", hatch="///", linewidth=0, gid=ABSENT
                )
            )
            if not absent[i]:
                ax.text(j + 0.5, i + 0.5, "–", ha="center", va="center", fontsize=7, color="0.3")
        if absent[i]:
            box = {"facecolor": "0.92", "edgecolor": "none", "pad": 1}
            ax.text(
                len(data.columns) / 2,
                i + 0.5,
                ABSENT,
                ha="center",
                va="center",
                fontsize=7,
                color="0.25",
                bbox=box,
            )
    for tick, a in zip(ax.get_yticklabels(), absent):
        if a:
            tick.set_color("0.4")
    ax.set(xlabel="", ylabel="", title=title)
    ax.tick_params(axis="x", labelrotation=20 if len(frame.columns) > 3 else 0)
    return fig


def per_class_heatmap(frame: pd.DataFrame | None, out_dir: Path, filename: str, title: str) -> str | None:
    """draw_per_class_heatmap, written to out_dir/filename."""
    fig = draw_per_class_heatmap(frame, title)
    return None if fig is None else _save(fig, out_dir, filename)


def stage_curves(study: StudyResults, out_dir: Path, filename: str) -> str | None:
    """Left: val mIoU vs stage; right: pseudo-label precision / recall / mIoU of the labels each stage
    trained on."""
    groups = multi_stage_groups(study)
    if not groups:
        return None
    g = study.stages[study.stages.status == Status.COMPLETE].copy()
    g = g[[k in set(groups) for k in zip(g["row"], g["variant"])]].assign(config=_group)
    init = study.complete.set_index("harness_id")
    for k in PGT:  # stage 0 trains on the initial labels: fill from the trial if the stage row lacks them
        g[f"pgt_{k}"] = g[f"pgt_{k}"].fillna(g["harness_id"].map(init[f"initial_{k}"]).where(g["stage"] == 0))
    long = g.melt(
        id_vars=["config", "stage", "harness_id"],
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
    log_scale = {p.name for p in study.spec.params if p.log}
    fig, axes = plt.subplots(1, len(keys), figsize=(3.6 * len(keys) + 0.5, 3.6), squeeze=False)
    for ax, k in zip(axes[0], keys):
        x = pd.DataFrame({"x": [p.get(k) for p in d["params"]], "pct": 100 * d["value"]}).dropna()
        numeric = pd.api.types.is_numeric_dtype(x["x"])
        (sns.scatterplot if numeric else sns.stripplot)(data=x, x="x", y="pct", ax=ax)
        if numeric and k in log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel=k, ylabel=metric_name(study.metric))
    fig.suptitle(f"{study.name}: {metric_name(study.metric)} vs each tuned parameter")
    return _save(fig, out_dir, filename)


def history(study: StudyResults, out_dir: Path, filename: str) -> str | None:
    """Tuning: objective per trial and the best-so-far curve."""
    d = study.complete[study.complete["value"].notna()].sort_values(["optuna_number", "harness_id"])
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
        xlabel="trial number", ylabel=metric_name(study.metric), title=f"{study.name}: optimisation history"
    )
    return _save(fig, out_dir, filename)
