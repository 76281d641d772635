"""Re-decide a stored study under each adaptive seed rule: no training, a decision is a function of values.

    python -m bench.bench_redecide STUDY [--storage URL] [--initial 3] [--max N] [--alpha A] [--rope R]

For every row against the study's baseline it prints, under the group-sequential rule (the default) and the
t-mixture confidence sequence (`method: confseq`), the status, the seed count at which the row decided (or
the last one) and the deciding interval, with the forecast of an unresolved row; then the Student-t 95 %
interval over every stored seed, read once (descriptive: the interval a user who looked after every seed
cannot claim). The design: the study's own `seeds: {initial, max, rope, alpha}` when it is adaptive; for a
fixed seed list its first --initial seeds (default 3) and at most --max (default: every stored seed), with
alpha --alpha (default 0.05, family-wise over the compared rows, Bonferroni) and rope --rope (0.5 points).
Each rule sees the seeds in the study's seed order, exactly as if it had run the study: it stops a row at its
first deciding look, so it never uses a seed it would not have asked for.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from reports.paired import delta_cell, paired_delta
from studies.db import DEFAULT_URL
from studies.records import Status
from studies.sequential import Method, SeedRule, decide_study, forecast_text, interval_text, status_text
from studies.store import Store


def redecide(store: Store, name: str, initial: int, n_max: int | None, alpha: float, rope: float) -> str:
    study = store.study(name).spec
    trials = store.trials(name)
    rule = study.adaptive
    if rule is None:
        seeds = tuple(study.seeds)
        rule = SeedRule(seeds[:initial], n_max or len(seeds), rope, alpha)
        if rule.sequence() != seeds[: rule.max]:
            raise SystemExit(
                f"bench_redecide: seeds {list(seeds)} are not initial seeds then consecutive integers"
            )
    rows = [r.label for r in study.rows]
    records = [
        {"row": t.row, "seed": t.seed, "status": t.status, "value": t.value(study.metric)} for t in trials
    ]
    m = len(rows) - 1
    lines = [
        f"{name}: {study.metric}, baseline {study.baseline}; initial {len(rule.initial)} seeds, at most "
        f"{rule.max}; alpha {rule.alpha:g} over {m} rows ({rule.alpha / m:.4g} per row), "
        f"rope ±{rule.rope:g} points",
        "",
        "| row | rule | status | seeds used | deciding interval | forecast |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    done = {(t.row, t.seed): t.value(study.metric) for t in trials if t.status == Status.COMPLETE}
    for method in Method:
        r = dataclasses.replace(rule, method=method)
        dec = decide_study(r, rows, study.baseline, study.direction, records)
        for row, d in dec.rows.items():
            cells = [row, method, status_text(d, r), d.n, interval_text(d), forecast_text(d, r)]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    planned = set(rule.sequence())
    for row in rows:
        if row == study.baseline:
            continue
        a = {s: v for (rr, s), v in done.items() if rr == row and s in planned}
        b = {s: v for (rr, s), v in done.items() if rr == study.baseline and s in planned}
        p = paired_delta(a, b, study.direction)
        lines.append(f"| {row} | Student-t 95 %, read once | – | {p.n} | {delta_cell(p)} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("study")
    p.add_argument("--storage", default=DEFAULT_URL)
    p.add_argument("--initial", type=int, default=3)
    p.add_argument("--max", type=int, default=None)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--rope", type=float, default=0.5)
    a = p.parse_args(argv)
    print(redecide(Store(a.storage), a.study, a.initial, a.max, a.alpha, a.rope))
    return 0


if __name__ == "__main__":
    sys.exit(main())
