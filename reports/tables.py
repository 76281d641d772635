"""A study's result tables as markdown, in the paper's layouts (Tables 3-6, Fig. 6 quantities), with paired
Δ against the baseline row (reports.paired) and the metric per seed; reports.load reads the study from the
store.

The only figures not computed from the store are the paper's reference numbers, which come from the study
spec stored with the study. Metrics are fractions in the store and printed as percent with one decimal.
"""

from __future__ import annotations

import math

from studies.records import Status, group_label
from studies.sequential import RowDecision, interval_text, status_text

from .format import check, leaf, markdown, mean_std, metric_label, paper, pct, seed_values, signed, stats
from .load import StudyResults
from .paired import PairedDelta, better_cell, delta_cell, paired_delta

PAPER_COL = "Paper (VOC val)"


NOTE = (
    "*{col}: the figure reported by Xu et al. (ICCV 2021) on PASCAL VOC 2012 {split}, copied from the study "
    "spec for reference. It is not a result of this harness (different data, backbone and schedule): compare "
    "trends, not absolute values.*"
)


PAPER_NOTE = NOTE.format(col=PAPER_COL, split="val")


PGT = ("precision", "recall", "miou")


PAIRED_NOTE = (
    "*Δ of means: mean of the row − mean of the baseline row, each over its own complete seeds. Δ paired: "
    "mean over seeds of (row − baseline row, same seed), seeds where both trials are complete, in percent "
    "points; [95% CI] = mean ± t(0.975, n−1)·sd/√n (Student t, needs n ≥ 2). seeds better: paired seeds "
    "where the row beats the baseline ({direction}).*"
)


def n_cell(study: StudyResults, label: str, variant: str | None = None) -> str:
    """Complete seeds of the row (with a value), then what is not complete and the earlier attempts
    (studies.progress): '3', '2/3 (incomplete; 1 running)', '3 (1 earlier attempt interrupted)'."""
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
    if study.seed_rule is not None:  # adaptive seeds: the rule's deciding interval, one interval per row
        decided = study.decisions().rows
        rows = {r: seed_values(d[d["row"] == r], column) for r in study.row_order()}
        return [
            (r, variant, None if r == base else deciding_delta(decided.get(r), v, base_seeds, direction))
            for r, v in rows.items()
        ]
    return [
        (
            r,
            variant,
            None if r == base else paired_delta(seed_values(d[d["row"] == r], column), base_seeds, direction),
        )
        for r in study.row_order()
    ]


def deciding_delta(
    dec: RowDecision | None, a: dict[int, float], b: dict[int, float], direction: str
) -> PairedDelta:
    """An adaptive row's decision as a PairedDelta: its deciding interval over the seeds it used (±inf
    while the design has no bound yet), seeds better counted over those seeds."""
    if dec is None or dec.n == 0:
        return PairedDelta(math.nan, math.nan, math.nan, 0, 0)
    used = paired_delta({s: a[s] for s in dec.seeds if s in a}, b, direction)
    return PairedDelta(dec.mean, dec.lo, dec.hi, dec.n, used.better)


ADAPTIVE_NOTE = (
    "*Δ paired (deciding interval): mean over seeds of (row − baseline row, same seed) in percent points, "
    "with the rule's interval at the seed count that decided (or the last one): it holds at every look of "
    "the design at once, so adding seeds and looking again keeps its level; ±∞ while too few seeds bound "
    "it. seeds used: the paired seeds up to the decision, in the order they were added. An unresolved row's "
    "forecast: if its observed mean ± sd of the paired differences held, about how many seeds the rule "
    "would need to decide, and its conditional power (the chance to decide by max, simulated from the seeds "
    "so far). The figure's forest panel shows the same deciding interval.*"
)


def adaptive_rows(study: StudyResults) -> dict[str, list[str]]:
    """Per compared row: [status, seeds used, Δ paired with its deciding interval] (studies.sequential)."""
    rule, dec = study.seed_rule, study.decisions()
    out = {}
    for r, d in dec.rows.items():
        seeds = f"{d.n}" + (f" ({', '.join(map(str, d.seeds))})" if d.seeds else "")
        out[r] = [status_text(d, rule, with_forecast=True), seeds, interval_text(d)]
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


def per_seed_table(study: StudyResults) -> str | None:
    """The metric of every (row, variant) and seed, percent: the numbers behind the means and paired Δ."""
    seeds = sorted(int(s) for s in study.trials["seed"].dropna().unique())
    if not seeds:
        return None
    done = study.complete[study.complete["value"].notna()]
    variants = study.variant_order() != [""]
    header = ["Config", *(["Variant"] if variants else []), *(f"seed {s}" for s in seeds)]
    body = []
    for row, variant in study.groups():
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
