"""What studies.run prints about a study: the dry run (the plan, what is stored, the time estimate) and the
end-of-run summary (mean +- std per row, progress notes, adaptive decisions), both read from the store
through its read API, counted as the report counts them (studies.progress)."""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

from studies.plan import Plan, confirm_name
from studies.progress import grid_points, progress
from studies.quality import is_collapsed, last_stage_iou
from studies.records import Status, StoredTrial
from studies.sequential import decide_study, forecast_text, interval_text, status_text

# --dry-run's states of a grid point not run yet (adaptive seeds: "if needed" when its row may not need it).
TODO, IF_NEEDED = "todo", "if needed"


def stored_progress(plan: Plan, url: str) -> tuple[list[StoredTrial], list[float]]:
    """The study's stored trials, and the wall times of complete trials run with the same preset (any
    study of the store); ([], []) when the store does not exist yet."""
    from studies.db import StoreError
    from studies.store import Store

    store = Store(url, create=False)
    try:
        store.check_readable()
    except StoreError:
        return [], []
    except Exception as e:  # unreachable server: the dry run still lists the plan
        print(f"storage: cannot read it ({type(e).__name__}); progress unknown")
        return [], []
    trials = store.trials(plan.study.name) if plan.study.name in store.study_names() else []
    seconds = []
    for name, preset in store.presets().items():
        if preset == plan.preset:
            seconds += [t.seconds for t in store.trials(name, Status.COMPLETE) if t.seconds]
    store.close()
    return trials, seconds


def dry_run(plan: Plan, url: str, workers: int, how: str = "") -> None:
    from studies.db import redact_url

    s = plan.study
    print(f"study {s.name} ({s.kind}, preset {plan.preset}): {s.description}")
    trials, seconds = stored_progress(plan, url)
    done_keys = {t.key for t in trials if t.status in (Status.COMPLETE, Status.PRUNED)}
    failed_keys = {t.key for t in trials if t.status == Status.FAILED}
    print(f"storage: {redact_url(url)} ({len(trials)} trial(s) of this study stored)")
    print(f"workers: {workers} trial(s) at once{how}")
    if plan.is_grid:
        if plan.adaptive:
            rule, n_rows = s.adaptive, len(s.rows)
            print(
                f"adaptive seeds: initial {list(rule.initial)}, at most {rule.max} per row (then seeds "
                f"{', '.join(map(str, rule.sequence()[len(rule.initial) :])) or 'none'}, as rows need them); "
                f"{n_rows * len(rule.initial)} to {len(plan.points)} trials = {n_rows} rows x "
                f"{len(rule.initial)} to {rule.max} seeds; metric {s.metric}"
            )
            print(rule.describe(n_rows - 1))
        else:
            print(
                f"{len(plan.points)} trials = {len(s.rows)} rows x {max(1, len(s.variants))} variants x "
                f"{len(s.seeds)} seeds; metric {s.metric}"
            )
        wanted = plan.wanted_keys(trials)  # adaptive: the points the rule asks for now
        print(f"{'#':>3}  {'row':<34} {'variant':<10} {'seed':>4}  {'state':<9} overrides")
        for p in plan.points:
            ov = " ".join(f"{k}={_fmt(v)}" for k, v in p.overrides.items())
            state = Status.DONE if p.key in done_keys else Status.FAILED if p.key in failed_keys else TODO
            state = IF_NEEDED if state == TODO and wanted is not None and p.key not in wanted else state
            print(f"{p.grid_index:>3}  {p.row:<34} {p.variant or '-':<10} {p.seed:>4}  {state:<9} {ov}")
        print(f"{'row':<34} {'variant':<10} done / left")
        for r in s.rows:
            for v in list(s.variants) or [None]:
                pts = [p for p in plan.points if p.row == r.label and p.variant == (v.label if v else None)]
                n_done = sum(p.key in done_keys for p in pts)
                print(f"{r.label:<34} {v.label if v else '-':<10} {n_done:>4} / {len(pts) - n_done}")
        left = sum(p.key not in done_keys and p.key not in failed_keys for p in plan.points)
        if wanted is not None:  # adaptive: at least the points wanted now, at most every seed up to max
            lo_left = sum(k not in done_keys and k not in failed_keys for k in wanted)
            for r, d in plan.decide(trials).rows.items():
                fc = f"; {forecast_text(d, s.adaptive)}" if d.forecast else ""
                print(f"  {r}: {status_text(d, s.adaptive)}, {d.n} paired seed(s), {interval_text(d)}{fc}")
            _estimate(plan, seconds, workers, lo_left, left)
            return
    else:
        print(
            f"{s.n_trials} trials, sampler {s.sampler} (seed {s.sampler_seed}), pruner {s.pruner} on "
            f"{s.stage_metric} per stage; metric {s.metric}"
        )
        for p in s.params:
            rng = (
                f"choices {list(p.choices)}"
                if p.type == "categorical"
                else f"[{p.low}, {p.high}]"
                + (" log" if p.log else "")
                + (f" step {p.step}" if p.step else "")
            )
            print(f"  {p.name}: {p.type} {rng}")
        ov = " ".join(f"{k}={_fmt(v)}" for k, v in plan.overrides_for_params({}).items())
        print(f"  fixed overrides: {ov}")
        left = max(0, s.n_trials - sum(t.status != Status.INTERRUPTED for t in trials))
        print(f"done: {s.n_trials - left}, left: {left}")
        if s.confirm is not None:
            c = s.confirm
            lo_n, hi_n = (c.top + 1) * len(c.rule.initial), (c.top + 1) * c.rule.max
            print(
                f"then the confirmation ({confirm_name(s.name)}): the top {c.top} parameter sets and the "
                f"preset's values on fresh seeds {list(c.rule.initial)}, at most {c.rule.max} per row: "
                f"{lo_n} to {hi_n} trials ({c.rule.describe(c.top)}); `confirm: false` switches it off"
            )
            _estimate(plan, seconds, workers, left + lo_n, left + hi_n)
            return
    _estimate(plan, seconds, workers, left, left)


def _estimate(plan: Plan, seconds: list[float], workers: int, low: int, high: int) -> None:
    """The dry run's time estimate for low to high trials left (the same number for a fixed grid)."""
    if not high:
        return
    if not seconds:
        print(f"estimate: none yet (no complete trial of preset {plan.preset} in this store)")
        return
    per = statistics.median(seconds)
    n = f"{low}" if low == high else f"{low} to {high}"
    t = f"{low * per / workers / 60:.1f}" + ("" if low == high else f" to {high * per / workers / 60:.1f}")
    print(
        f"estimate: {n} trial(s) x {per:.0f} s (median of {len(seconds)} complete trial(s) of preset "
        f"{plan.preset} in this store) / {workers} worker(s) = {t} min"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) if v else "[]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def study_summary(plan: Plan, store) -> str:
    """row, variant, n, mean +- std of the metric (percent), then notes: what is not complete and the earlier
    attempts and collapsed trials; a last line with the points complete of the grid ("15/15 points complete;
    2 earlier attempts interrupted"). All trials in the store, counted as the report counts them
    (studies.progress: the same points, progress counts and collapse flags). Collapsed (studies.quality):
    complete, but IoU 0 on every foreground class; still in the mean."""
    s = plan.study
    spec = store.study(s.name).spec  # the definition stored with the trials, as the report reads them
    trials = store.trials(s.name)
    # Collapse from the stored stages, as the report decides it: stores written before the flag get it too.
    last_iou = {st.harness_id: st.per_class_iou for st in store.study_stages(s.name)}  # the last stage wins

    def collapsed(t: StoredTrial) -> bool:
        iou = last_iou.get(t.harness_id)
        return is_collapsed(iou if iou is not None else last_stage_iou(t.result))

    def value(t: StoredTrial) -> float | None:
        v = t.value(spec.metric)
        return None if v is None or math.isnan(v) else float(v)

    done = [t for t in trials if t.status == Status.COMPLETE]
    decision = None
    if spec.kind.is_grid and spec.adaptive is not None:
        records = [{"row": t.row, "seed": t.seed, "status": t.status, "value": value(t)} for t in trials]
        labels = [r.label for r in spec.rows]
        decision = decide_study(spec.adaptive, labels, spec.baseline, spec.direction, records)
    if plan.is_grid:
        rows = [r.label for r in spec.rows]
        rows += list(dict.fromkeys(t.row for t in trials if t.row is not None and t.row not in rows))
        variants = [v.label for v in spec.variants]
        variants = variants + sorted({t.variant or "" for t in trials} - set(variants)) or [""]
        order = [(row, v) for row in rows for v in variants]
    else:
        order = sorted({(t.row, t.variant or "") for t in trials}, key=str)
    ran = [(t.row, t.variant or "", t.seed) for t in trials]

    def progress_of(row: str | None = None, variant: str | None = None):
        mine = [
            t
            for t in trials
            if (row is None or t.row == row) and (variant is None or (t.variant or "") == variant)
        ]
        attempts = [((t.row, t.variant or "", t.seed), t.status) for t in mine]
        points = grid_points(spec, ran, decision, row, variant)
        return progress(attempts, points) if points is not None else progress(attempts, budget=spec.n_trials)

    lines = [
        f"{s.name}: {s.metric} (%), mean +- std over seeds",
        f"{'row':<34} {'variant':<10} {'n':>3}  {'mean':>6} +- {'std':<6} notes",
    ]
    for row, variant in order:
        g = [t for t in done if t.row == row and (t.variant or "") == variant]
        vals = [v for v in map(value, g) if v is not None]
        mean = f"{100 * statistics.fmean(vals):6.2f}" if vals else f"{'-':>6}"
        std = f"{100 * statistics.stdev(vals):<6.2f}" if len(vals) > 1 else f"{'-':<6}"
        if plan.is_grid:
            notes = progress_of(row, variant).notes()
        else:  # a tuning study's rows are single trials: the status is the note
            n = Counter(t.status for t in trials if t.row == row and (t.variant or "") == variant)
            notes = [f"{k} {x}" for x, k in sorted(n.items()) if x not in (Status.COMPLETE, Status.RUNNING)]
        n_collapsed = sum(map(collapsed, g))
        notes += [f"{n_collapsed} collapsed"] if n_collapsed else []
        lines.append(
            f"{row:<34} {variant or '-':<10} {len(vals):>3}  {mean} +- {std} {', '.join(notes)}".rstrip()
        )
    scored = [(t, v) for t in done if (v := value(t)) is not None]
    if not plan.is_grid and scored:
        pick = max if s.direction == "maximize" else min
        b, v = pick(scored, key=lambda tv: tv[1])  # the first of equals, as the report's idxmax
        lines.append(
            f"best: #{b.optuna_number} {100 * v:.2f} with "
            + " ".join(f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}" for k, x in b.params.items())
        )
    if plan.adaptive and decision is not None:
        lines.append(s.adaptive.describe(len(s.rows) - 1))
        for row, d in decision.rows.items():
            lines.append(
                f"  {row}: {status_text(d, s.adaptive)}; {d.n} paired seed(s) "
                f"{list(d.seeds)}; Δ vs {s.baseline} {interval_text(d)}"
                + (f"; {forecast_text(d, s.adaptive)}" if d.forecast else "")
            )
    lines.append(progress_of().line())
    return "\n".join(lines)
