"""A study's tables as markdown (reports.load reads the study from the store).

The only figures not computed from the store are the paper's reference numbers, which come from the study
spec stored with the study. Metrics are fractions in the store and printed as percent with one decimal.
"""

from __future__ import annotations

import math
import os
import shlex
import warnings
from collections import Counter
from pathlib import Path

import pandas as pd

from studies.db import redact_url
from studies.quality import COLLAPSED_MEANING
from studies.records import Status, dig, finite, group_label
from studies.sequential import interval_text, status_text

from .load import ReportError, StudyResults, load_study, optuna_study
from .paired import PairedDelta, better_cell, delta_cell, paired_delta

PAPER_COL = "Paper (VOC val)"
NOTE = (
    "*{col}: the figure reported by Xu et al. (ICCV 2021) on PASCAL VOC 2012 {split}, copied from the study "
    "spec for reference. It is not a result of this harness (different data, backbone and schedule): compare "
    "trends, not absolute values.*"
)
PAPER_NOTE = NOTE.format(col=PAPER_COL, split="val")
PGT = ("precision", "recall", "miou")
REPRO_NOTE = (
    "Metrics are bit-identical only for the same machine (CPU model and kernel level), torch build and "
    "thread count; compare across machines with the paired Δ, not raw values."
)
PAIRED_NOTE = (
    "*Δ of means: mean of the row − mean of the baseline row, each over its own complete seeds. Δ paired: "
    "mean over seeds of (row − baseline row, same seed), seeds where both trials are complete, in percent "
    "points; [95% CI] = mean ± t(0.975, n−1)·sd/√n (Student t, needs n ≥ 2). seeds better: paired seeds "
    "where the row beats the baseline ({direction}).*"
)
# Listed under "Failed trials"; pruned and running trials are not.
NOT_COMPLETE = (Status.FAILED, Status.INTERRUPTED)


def leaf(df: pd.DataFrame, path: str) -> pd.Series:
    """result.json leaf `path` of each trial in df, as floats (NaN where missing)."""
    return pd.Series([finite(dig(r, path)) for r in df["result"]], index=df.index, dtype=float)


# --------------------------------------------------------------------------------------------- formatting
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


def n_cell(study: StudyResults, label: str, variant: str | None = None) -> str:
    """Complete seeds of the row (with a value), then what is not complete and the earlier attempts
    (reports.progress): '3', '2/3 (incomplete; 1 running)', '3 (1 earlier attempt interrupted)'."""
    t = study.trials[
        (study.trials["row"] == label)
        & ((study.trials["variant"] == variant) if variant is not None else True)
    ]
    n = int(((t.status == Status.COMPLETE) & t["value"].notna()).sum())
    expected = study.n_seeds
    other = ", ".join(study.progress(label, variant).notes())
    if expected is not None and n < expected:
        return f"{n}/{expected} (incomplete{'; ' + other if other else ''})"
    return f"{n}" + (f" ({other})" if other else "")


def seed_values(df: pd.DataFrame, column: str = "value") -> dict[int, float]:
    """seed -> the column's value over these trials (the mean if a seed ran twice); missing values skipped."""
    d = df[df[column].notna()]
    return {int(k): float(v) for k, v in d.groupby("seed")[column].mean().items()}


def config_cell(study: StudyResults, label: str) -> str:
    """The row's label, plus '⚠ collapsed (k/n seeds)' when k of its n complete trials collapsed
    (per variant, 'baseline: k/n seeds', in a study with variants)."""
    done = study.complete[study.complete["row"] == label]
    parts = []
    for v in study.variant_order():
        g = done[done["variant"] == v]
        if g["collapsed"].any():
            parts.append(f"{v + ': ' if v else ''}{int(g['collapsed'].sum())}/{len(g)} seeds")
    return label + (f" ⚠ collapsed ({'; '.join(parts)})" if parts else "")


# ------------------------------------------------------------------------------------------------ tables
def cli_set(study: StudyResults) -> str:
    """The run's --set overrides (stored with the study by studies.run) as command-line text."""
    items = study.cli_overrides
    if not items:
        return ""

    def fmt(v) -> str:
        if isinstance(v, (list, tuple)):
            return ",".join(map(str, v)) if v else "[]"
        return str(v).lower() if isinstance(v, bool) else str(v)

    return " --set " + " ".join(shlex.quote(f"{k}={fmt(v)}") for k, v in items.items())


def title(study: StudyResults) -> str:
    """The report's title line; 'partial' with the points complete while trials run or points are missing."""
    p = study.progress()
    what = p.done_text() + (f", {p.running} running" if p.running else "")
    return f"# Study report: {study.name}" + (f" (partial: {what})" if p.partial else "")


def provenance(study: StudyResults, report_file: str | None = None) -> str:
    t, spec = study.trials, study.spec
    counts = t.status.value_counts()
    # Always these, then any other status present (interrupted).
    shown = (Status.COMPLETE, Status.FAILED, Status.PRUNED, Status.RUNNING)
    status = " / ".join(
        f"{counts.get(k, 0)} {k}" for k in [*shown, *(k for k in counts.index if k not in shown)]
    )
    cfgs = [r.get("config") or {} for r in t["result"].dropna()] + list(t["config"])
    # The resolved root (result.dataset) names the generated benchmark folder when data.root was empty.
    roots = {(r.get("dataset") or {}).get("root") for r in t["result"].dropna()} - {None}
    root = ", ".join(sorted(roots)) or "(generated)"
    data = sorted(
        {f"{dig(c, 'data.name')} at {dig(c, 'data.root') or root}" for c in cfgs if dig(c, "data.name")}
    )
    sizes = sorted(
        {
            (d.get("n_train"), d.get("n_val"), d.get("num_classes"), d.get("saliency"))
            for d in (r.get("dataset") or {} for r in t["result"].dropna())
            if d
        }
    )
    seconds = pd.to_numeric(t["seconds"], errors="coerce").fillna(0).sum()
    cached = pd.to_numeric(t["warmup_cached"], errors="coerce").fillna(0).astype(bool)
    preset = f" --preset {study.preset}" if study.preset else ""
    url = redact_url(study.url)  # a report is shared; a database password is not
    study_file = f" --study-file {shlex.quote(study.study_file)}" if study.study_file else ""
    lines = [
        f"- **Study:** `{study.name}` ({spec.kind}"
        + (f", paper Table {spec.paper_table}" if spec.paper_table else "")
        + ")",
        f"- **Description:** {spec.description or '–'}",
        (
            f"- **Metric:** `{study.metric}` ({study.direction}); percent, mean ± std over seeds (std with "
            "ddof=1, – for n=1)"
        ),
        f"- **Store:** `{url}`" + (f" (this report: `{report_file}`)" if report_file else ""),
        f"- **Progress:** {study.progress().line()}",
        f"- **Trials (every attempt):** {len(t)} ({status})",
        f"- **Code version(s):** {', '.join(sorted(t.code_version.dropna().astype(str).unique())) or '–'}",
        f"- **Preset:** {study.preset or '–'}",
        f"- **Data set:** {'; '.join(data) or '–'}"
        + "".join(f"; n_train={a}, n_val={b}, classes={c}, saliency={s}" for a, b, c, s in sizes),
        (
            f"- **Compute:** {seconds / 3600:.2f} h total trial time ({seconds:.0f} s); "
            f"warm-up cached in {int(cached.sum())}/{len(t)} trials"
        ),
        f"- **Environment:** {environments(study)}",
        f"- *{REPRO_NOTE}*",
        (
            f"- **Study created:** {str(study.created_at)[:19]}; **report generated:** "
            f"{pd.Timestamp.now(tz='UTC').strftime('%Y-%m-%d %H:%M UTC')}"
        ),
        (
            f"- **Reproduce:** `python -m studies.run {study.name}{preset}{cli_set(study)}{study_file} "
            f"--storage {url}` "
            f"(report only: `python -m reports {study.name} --storage {url}`)"
        ),
    ]
    return "\n".join(lines)


def _environment(e) -> str:
    if not isinstance(e, dict) or not e:
        return "– (not recorded)"
    cap = f" ({e['cpu_capability']})" if e.get("cpu_capability") else ""
    gpu = f", GPU {e['gpu']}" if e.get("gpu") else ""
    python = f", Python {e['python']}" if e.get("python") else ""
    cpu = f"CPU {e.get('cpu') or '?'}{cap}{gpu}{python}"
    precision = f", {e['precision']}" if e.get("precision") else ""
    threads = e.get("threads", "?")
    return f"torch {e.get('torch') or '?'}, {threads} thread{'' if threads == 1 else 's'}{precision}, {cpu}"


def environments(study: StudyResults) -> str:
    """The distinct (torch, threads, CPU / GPU) combinations of the trials' results, with counts;
    results from before result.environment existed count as '– (not recorded)'."""
    counts = Counter(
        _environment(r.get("environment")) for r in study.trials["result"] if isinstance(r, dict)
    )
    return "; ".join(f"{k} ({n} trial{'' if n == 1 else 's'})" for k, n in counts.most_common()) or "–"


def variant_pair(study: StudyResults) -> tuple[str, str]:
    """Table 6's two variants: (the one named baseline, else the first; the one named full, else the last)."""
    labels = study.variant_order()
    return (
        "baseline" if "baseline" in labels else labels[0],
        "full" if "full" in labels else labels[-1],
    )


def baseline_deltas(study: StudyResults) -> list[tuple[str, str, PairedDelta | None]]:
    """(row, variant, paired Δ against the baseline row) for every row in the report's order, None for the
    baseline row itself: the numbers of the tables' paired column (ablation_table's "Δ paired" of the
    study's metric; in a study with variants, variants_table's Final* (full variant, final.miou) against the
    baseline row's Final*). [] when the spec names no baseline row."""
    base, done = study.spec.baseline, study.complete
    if not base:
        return []
    if study.variant_order() == [""]:  # the study's metric, in its direction
        variant, d, column, direction = "", done, "value", study.direction
    else:  # Final*: the full variant's final.miou, higher is better
        variant = variant_pair(study)[1]
        d = done[done["variant"] == variant].assign(miou=lambda x: leaf(x, "final.miou"))
        column, direction = "miou", "maximize"
    base_seeds = seed_values(d[d["row"] == base], column)
    return [
        (
            r,
            variant,
            None if r == base else paired_delta(seed_values(d[d["row"] == r], column), base_seeds, direction),
        )
        for r in study.row_order()
    ]


ADAPTIVE_NOTE = (
    "*Δ paired (deciding interval): mean over seeds of (row − baseline row, same seed) in percent points, "
    "with the anytime-valid interval at the seed count that decided (or the last one): it holds at every "
    "seed count at once, so adding seeds and looking again keeps its level; ±∞ while too few seeds bound it. "
    "seeds used: the paired seeds up to the decision, in the order they were added. The figure's forest "
    "panel shows the Student-t 95% interval over every paired seed (descriptive, not the decision).*"
)


def adaptive_rows(study: StudyResults) -> dict[str, list[str]]:
    """Per compared row: [status, seeds used, Δ paired with its deciding interval] (studies.sequential)."""
    rule, dec = study.seed_rule, study.decisions()
    out = {}
    for r, d in dec.rows.items():
        seeds = f"{d.n}" + (f" ({', '.join(map(str, d.seeds))})" if d.seeds else "")
        out[r] = [status_text(d, rule), seeds, interval_text(d)]
    return out


def ablation_table(study: StudyResults) -> str:
    """Tables 3/4 layout: one row per configuration, check-mark columns, mean ± std, n, Δ of means, paired Δ
    against the baseline row (95% CI) and seeds better, paper. With adaptive seeds (studies.sequential) the
    paired columns are each row's status, the seeds it used and the interval that decided it, under a line
    naming the method, alpha and rope."""
    rows, done = study.row_order(), study.complete
    checks = list(
        dict.fromkeys(
            [
                *study.spec.columns,
                *(k for r in rows for k in study.row_spec(r).columns),
            ]
        )
    )
    papers = {r: study.row_spec(r).paper for r in rows}
    has_paper = any(isinstance(p, (int, float)) for p in papers.values())
    base = study.spec.baseline
    base_mean = stats(done[done["row"] == base]["value"])[0] if base else math.nan
    deltas = {r: p for r, _, p in baseline_deltas(study)}
    adaptive = adaptive_rows(study) if study.seed_rule is not None and base else None
    header = ["Config", *checks, metric_label(study.metric), "n", f"Δ of means vs {base or 'baseline'}"]
    if adaptive is not None:
        header += ["status", "seeds used", "Δ paired (deciding interval)"]
    elif base:
        header += ["Δ paired (95% CI)", "seeds better"]
    body = []
    for r in rows:
        cols = study.row_spec(r).columns
        values = done[done["row"] == r]["value"]
        body.append(
            [config_cell(study, r), *(check(cols.get(k)) for k in checks), mean_std(values), n_cell(study, r)]
        )
        if r == base:
            body[-1] += ["(baseline)"] * (4 if adaptive is not None else 3)
        else:
            body[-1].append(signed(stats(values)[0] - base_mean))
            if adaptive is not None:
                body[-1] += adaptive.get(r, ["–"] * 3)
            elif base:
                p = deltas[r]
                body[-1] += [delta_cell(p), better_cell(p)]
        if has_paper:
            p = papers[r]
            body[-1].append(paper(p) if isinstance(p, (int, float)) else "–")
    text = markdown(header + ([PAPER_COL] if has_paper else []), body)
    if adaptive is not None:
        text = f"**{study.seed_rule.describe(len(rows) - 1)}**\n\n{text}\n\n{ADAPTIVE_NOTE}"
    else:
        text += ("\n\n" + PAIRED_NOTE.format(direction=study.direction)) if base else ""
    return text + ("\n\n" + PAPER_NOTE if has_paper else "")


def stage_paper(study: StudyResults, label: str) -> dict[int, float]:
    """The paper's per-stage numbers: the row's `paper` mapping {0: 64.1, ...} (the stage is the digits of the
    key, so "stage 1" works too); {} for a row without one."""
    p = study.row_spec(label).paper
    if not isinstance(p, dict):
        return {}
    digits = {k: "".join(c for c in str(k) if c.isdigit()) for k in p}
    return {int(digits[k]): v for k, v in p.items() if digits[k] and isinstance(v, (int, float))}


def stages_table(study: StudyResults) -> str:
    """Table 5 layout: one column per stage (the spec's stage_metric), mean ± std over seeds."""
    g = study.stages[study.stages.status == Status.COMPLETE]
    column = study.stage_metric.replace(".", "_")
    stages = sorted(g["stage"].dropna().astype(int).unique())
    header = ["Config", *(f"Stage {s}" for s in stages), "n"]
    body, papers = [], []
    for r in study.row_order():
        body.append(
            [
                config_cell(study, r),
                *(mean_std(g[(g["row"] == r) & (g["stage"] == s)][column]) for s in stages),
                n_cell(study, r),
            ]
        )
        if ref := stage_paper(study, r):
            papers.append(
                [
                    PAPER_COL + ("" if len(study.row_order()) == 1 else f": {r}"),
                    *(paper(ref.get(s)) for s in stages),
                    "",
                ]
            )
    text = (
        markdown(header, body + papers) + f"\n\n*`{column.replace('_', '.', 1)}` (%) after each stage; "
        "complete trials only.*"
    )
    return text + ("\n\n" + PAPER_NOTE if papers else "")


def paper_reference(study: StudyResults) -> str | None:
    """The spec's `paper_reference` rows (the paper's own configurations), printed as-is."""
    ref = [r for r in study.spec.paper_reference if isinstance(r, dict)]
    if not ref:
        return None
    nice = {
        "baseline": "Baseline",
        "final_star": "Final*",
        "delta": "Δ",
        "final": "Final",
    }  # Table 6 order first
    found = {k for r in ref for k in r if k != "label"}
    keys = [k for k in nice if k in found] + sorted(found - nice.keys(), key=str)
    table = markdown(
        ["Paper's configuration", *(nice.get(k, k) for k in keys)],
        [
            [
                r.get("label", ""),
                *(paper(r[k]) if isinstance(r.get(k), (int, float)) else r.get(k, "–") for k in keys),
            ]
            for r in ref
        ],
    )
    return table + "\n\n" + NOTE.format(col="These rows", split="val")


def variants_table(study: StudyResults) -> str:
    """Table 6 layout: Baseline (baseline variant final.miou), Final* (full variant final.miou),
    Δ = Final* − Baseline (of means, and paired by seed with its 95% CI and seeds better), Final (full variant
    final.miou_post, post-processed), and Final* paired by seed against the baseline row's Final*.
    The columns are mIoU, so "better" means higher whatever the study's direction."""
    done = study.complete.copy()
    done["miou"], done["post"] = leaf(done, "final.miou"), leaf(done, "final.miou_post")
    base_v, full_v = variant_pair(study)
    base_row = study.spec.baseline
    has_paper = any(isinstance(study.row_spec(r).paper, dict) for r in study.row_order())
    header = ["Config", "Baseline", "Final*", "Δ of means", "Δ paired (95% CI)", "seeds better", "Final"]
    header.append(f"n ({base_v}/{full_v})")
    if base_row:
        header += [f"Final* Δ paired vs {base_row} (95% CI)", f"seeds better vs {base_row}"]
    vs_base = {r: p for r, _, p in baseline_deltas(study)}
    body = []
    for r in study.row_order():
        b, f = (
            done[(done["row"] == r) & (done["variant"] == base_v)],
            done[(done["row"] == r) & (done["variant"] == full_v)],
        )
        within = paired_delta(seed_values(f, "miou"), seed_values(b, "miou"))
        body.append(
            [
                config_cell(study, r),
                mean_std(b["miou"]),
                mean_std(f["miou"]),
                signed(stats(f["miou"])[0] - stats(b["miou"])[0]),
                delta_cell(within),
                better_cell(within),
                mean_std(f["post"]),
                f"{n_cell(study, r, base_v)} / {n_cell(study, r, full_v)}",
            ]
        )
        if base_row and r == base_row:
            body[-1] += ["(baseline)"] * 2
        elif base_row:
            vs = vs_base[r]
            body[-1] += [delta_cell(vs), better_cell(vs)]
        if has_paper:
            p = study.row_spec(r).paper
            p = p if isinstance(p, dict) else {}
            d = p["final_star"] - p["baseline"] if {"final_star", "baseline"} <= p.keys() else None
            body[-1].append(
                " / ".join(map(paper, (p.get("baseline"), p.get("final_star"), d, p.get("final"))))
            )
    text = markdown(header + ([f"{PAPER_COL} B / F* / Δ / F"] if has_paper else []), body)
    text += (
        "\n\n*\\* without post-processing. Final = full variant with post-processing (`final.miou_post`; "
        "– when post-processing was off). Δ = Final* − Baseline within the row: of the means, and paired by "
        "seed (mean of the per-seed differences in percent points, [95% CI] = mean ± t(0.975, n−1)·sd/√n, "
        "seeds better = seeds where Final* > Baseline)."
        + (
            f" Final* Δ paired vs {base_row}: this row's Final* − {base_row}'s Final*, same seed."
            if base_row
            else ""
        )
        + "*"
    )
    return text + ("\n\n" + PAPER_NOTE if has_paper else "")


def multi_stage_groups(study: StudyResults) -> list[tuple[str, str]]:
    """(row, variant) groups whose complete trials ran at least two stages."""
    g = study.stages[study.stages.status == Status.COMPLETE]
    n = g.groupby(["row", "variant", "harness_id"])["stage"].nunique().groupby(["row", "variant"]).max()
    order = {r: i for i, r in enumerate(study.row_order())}
    return sorted((k for k, v in n.items() if v >= 2), key=lambda k: (order.get(k[0], 1e9), k[1]))


def pgt_table(study: StudyResults) -> str | None:
    """Fig. 6 quantities: precision / recall / mIoU of the initial labels and of the labels each stage
    trained on, mean ± std over the group's complete trials; one block per multi-stage (row, variant)."""
    groups = multi_stage_groups(study)
    if not groups:
        return None
    done, g = study.complete, study.stages[study.stages.status == Status.COMPLETE]
    header = ["Config", "Labels", "Precision", "Recall", "mIoU", "n"]
    body = []
    for row, variant in groups:
        name = group_label(row, variant)
        t = done[(done["row"] == row) & (done["variant"] == variant)]
        init = [t[f"initial_{k}"].where(t[f"initial_{k}"].notna(), leaf(t, f"initial_pgt.{k}")) for k in PGT]
        body.append([name, "initial (stage 0)", *map(mean_std, init), int(init[0].notna().sum())])
        s = g[(g["row"] == row) & (g["variant"] == variant)]
        for stage in sorted(set(s["stage"].astype(int)) - {0}):
            x = s[s["stage"] == stage]
            body.append(
                [
                    name,
                    f"stage {stage}",
                    *(mean_std(x[f"pgt_{k}"]) for k in PGT),
                    int(x["pgt_miou"].notna().sum()),
                ]
            )
    return markdown(header, body) + (
        "\n\n*Pseudo-label quality on the training set (the paper's Fig. 6 quantities): `stage s` = the "
        "labels stage s trained on (after s label updates). Shown for every configuration whose trials ran "
        "two or more stages; complete trials only.*"
    )


def tuning_tables(study: StudyResults, k: int = 10) -> str:
    """Top-k trials (params, value) and Optuna's parameter importances."""
    import optuna

    maximize = study.direction != "minimize"
    done = study.complete[study.complete["value"].notna()].sort_values("value", ascending=not maximize)
    keys = study.param_keys()
    body = [
        [
            i + 1,
            int(t.optuna_number) if pd.notna(t.optuna_number) else "–",
            pct(t.value),
            *(_fmt_param(t.params.get(p)) for p in keys),
            t.seed,
        ]
        for i, t in enumerate(done.head(k).itertuples())
    ]
    out = [
        (
            f"**Top {min(k, len(done))} of {len(done)} complete trials** "
            f"({'max' if maximize else 'min'}imising `{study.metric}`):"
        ),
        "",
        markdown(["Rank", "Trial", metric_label(study.metric), *keys, "seed"], body)
        if body
        else "*No complete trials.*",
    ]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            imp = optuna.importance.get_param_importances(optuna_study(study))
        small = [str(w.message) for w in caught if "too small" in str(w.message)]
        if small or not imp:
            raise ValueError(small[0] if small else "no parameters")
        out += [
            "",
            "**Parameter importances** (Optuna's default evaluator):",
            "",
            markdown(["Parameter", "Importance"], [[p, f"{v:.3f}"] for p, v in imp.items()]),
        ]
    except Exception as e:  # noqa: BLE001  too few trials, no Optuna study, single-valued parameters ...
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        out += [
            "",
            f"*Parameter importances unavailable: {why} "
            "(needs enough complete trials with varying parameters in the Optuna study).*",
        ]
    return "\n".join(out)


def confirmation(study: StudyResults) -> str | None:
    """A tuning study's confirmation (studies.plan.confirm_plan: the ablation NAME.confirm in the same store):
    each top parameter set's Δ against the preset's own values on fresh seeds, its status, seeds and deciding
    interval, beside its value in the search; then the answer: the confirmed Δ, not the search's best value.
    None when the store holds no confirmation."""
    try:
        conf = load_study(f"{study.name}.confirm", study.url)
    except ReportError:
        return None
    rule, dec = conf.seed_rule, conf.decisions()
    if rule is None or dec is None:
        return None
    keys = study.param_keys()
    search = {
        f"#{int(t.optuna_number)}": t.value for t in study.trials.itertuples() if pd.notna(t.optuna_number)
    }
    base = conf.spec.baseline
    body = []
    for r in conf.row_order():
        spec_row = conf.row_spec(r)
        values = conf.complete[conf.complete["row"] == r]["value"]
        if r == base:  # the preset's own values, as its trials ran them
            cfg = next(iter(conf.trials[conf.trials["row"] == r]["config"]), {})
            cells = [r, *(_fmt_param(dig(cfg, p)) for p in keys)]
        else:
            cells = [r, *(_fmt_param(spec_row.overrides.get(p)) for p in keys)]
        cells += [pct(search.get(r)) if r != base else "–", mean_std(values), n_cell(conf, r)]
        if r == base:
            cells += ["(baseline)"] * 3
        else:
            d = dec.rows[r]
            seeds = f"{d.n}" + (f" ({', '.join(map(str, d.seeds))})" if d.seeds else "")
            cells += [interval_text(d), status_text(d, rule), seeds]
        body.append(cells)
    seed = f" (seed {study.trials['seed'].iloc[0]})" if len(study.trials) else ""
    header = ["Set", *keys, f"search value{seed}", f"{metric_label(study.metric)} fresh seeds", "n",
              f"confirmed Δ vs {base} (deciding interval)", "status", "seeds used"]  # fmt: skip
    sign = -1 if study.direction == "minimize" else 1
    won = [d for d in dec.rows.values() if d.status == "better"]
    if won:
        best = max(won, key=lambda d: sign * d.mean)
        answer = (
            f"**Answer:** set {best.row} is confirmed better than the preset's values: "
            f"Δ {interval_text(best)} points over {best.n} fresh seeds (its search value, one seed: "
            f"{pct(search.get(best.row))})."
        )
    else:
        answer = (
            "**Answer:** no set is confirmed better than the preset's values on fresh seeds ("
            + "; ".join(f"{d.row}: {status_text(d, rule)}, Δ {interval_text(d)}" for d in dec.rows.values())
            + "); the search's best value is not evidence on its own (winner's curse)."
        )
    return "\n\n".join(
        [
            answer,
            f"**{rule.describe(len(dec.rows))}**",
            markdown(header, body),
            f"*The search picked these sets on one seed among {len(study.trials)} trials, so their search "
            f"values are biased upward; the confirmed Δ is measured on fresh seeds (study `{conf.name}`, "
            f"its own report: `python -m reports {conf.name}`).*",
        ]
    )


def _fmt_param(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def failures(study: StudyResults) -> str | None:
    """The failed and interrupted trials with the last line of their error; a Status column (and a note)
    when some were interrupted."""
    f = study.trials[study.trials.status.isin(NOT_COMPLETE)]
    if f.empty:
        return None
    interrupted = bool((f.status == Status.INTERRUPTED).any())
    done = set(zip(study.complete["row"], study.complete["variant"], study.complete["seed"]))

    def status(t) -> str:  # an attempt whose grid point has run again and completed since
        return t.status + ("; rerun complete" if (t.row, t.variant, t.seed) in done else "")

    table = markdown(
        ["Trial", "Config", "Variant", "Seed", *(["Status"] if interrupted else []), "Error"],
        [
            [
                t.optuna_number,
                t.row,
                t.variant or "",
                t.seed,
                *([status(t)] if interrupted else []),
                (t.error or "").strip().splitlines()[-1][:160] if t.error else "",
            ]
            for t in f.itertuples()
        ],
    )
    return table + (
        "\n\n*interrupted: the trial's process died (or was stopped) while it ran; it never counts as "
        'complete, and the next `python -m studies.run` runs its grid point again ("rerun complete": '
        "that has happened, nothing is missing).*"
        if interrupted
        else ""
    )


def groups(study: StudyResults) -> list[tuple[str, str]]:
    """(row, variant) in the report's order: rows as in the spec, variants as in the spec."""
    return [(r, v) for r in study.row_order() for v in study.variant_order()]


def per_seed_table(study: StudyResults) -> str | None:
    """The metric of every (row, variant) and seed, percent: the numbers behind the means and paired Δ."""
    seeds = sorted(int(s) for s in study.trials["seed"].dropna().unique())
    if not seeds:
        return None
    done = study.complete[study.complete["value"].notna()]
    variants = study.variant_order() != [""]
    header = ["Config", *(["Variant"] if variants else []), *(f"seed {s}" for s in seeds)]
    body = []
    for row, variant in groups(study):
        g = done[(done["row"] == row) & (done["variant"] == variant)]
        cells = []
        for s in seeds:
            t = g[g["seed"] == s]
            cells.append("–" if t.empty else pct(t["value"].mean()) + (" ⚠" if t["collapsed"].any() else ""))
        body.append([row, *([variant] if variants else []), *cells])
    return (
        f"**{metric_label(study.metric)} per seed** (`{study.metric}`; – = no complete trial, "
        "⚠ = collapsed):\n\n" + markdown(header, body)
    )


def galleries(study: StudyResults, out_dir: Path) -> str | None:
    """Per (row, variant): a link to each seed's image gallery (core.gallery, stored as an Optuna artifact
    by studies.run), relative to the report's folder; None when no trial has one."""
    done = study.complete
    links = {}
    for t in done.itertuples():
        path = dig(t.result, "artifacts.gallery") if isinstance(t.result, dict) else None
        if path:
            rel = os.path.relpath(path, Path(out_dir).resolve())
            links.setdefault((t.row, t.variant), []).append((int(t.seed), rel))
    if not links:
        return None
    variants = study.variant_order() != [""]
    body = [
        [
            row,
            *([variant] if variants else []),
            " ".join(f"[seed {s}]({p})" for s, p in sorted(links[(row, variant)])),
        ]
        for row, variant in groups(study)
        if (row, variant) in links
    ]
    return (
        "Image | ground truth | CAM | initial pseudo label | last pseudo label | prediction, for the same "
        "val images in every trial (also on each trial's page in optuna-dashboard):\n\n"
        + markdown(["Config", *(["Variant"] if variants else []), "Galleries"], body)
    )


def collapsed_warnings(study: StudyResults) -> str | None:
    """The complete trials that collapsed (studies.quality.is_collapsed on the last stage's per-class IoU)."""
    c = study.complete[study.complete["collapsed"]]
    if c.empty:
        return None
    table = markdown(
        ["Trial", "Config", "Variant", "Seed", metric_label(study.metric), "What it means"],
        [
            [
                int(t.optuna_number) if pd.notna(t.optuna_number) else "–",
                t.row,
                t.variant or "",
                t.seed,
                pct(t.value),
                COLLAPSED_MEANING,
            ]
            for t in c.itertuples()
        ],
    )
    return (
        f"**⚠ {len(c)} collapsed trial{'' if len(c) == 1 else 's'}** (marked ⚠ in the tables): the network "
        "gets IoU 0 on every foreground class of the val set after its last stage. They are kept in the "
        "means and paired Δ below, so a marked row may be a failed run rather than a worse configuration.\n\n"
        + table
    )
