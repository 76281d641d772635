"""A tuning study's tables: its best trials with Optuna's parameter importances, and the answer, its
confirmation on fresh seeds (studies.plan.confirm_plan)."""

from __future__ import annotations

import warnings

import pandas as pd

from studies.records import dig
from studies.sequential import Decision, interval_text, status_text

from .format import markdown, mean_std, metric_label, pct
from .load import ReportError, StudyResults, load_study, optuna_study
from .tables import n_cell


def _fmt_param(v) -> str:
    return "–" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


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
            cells += [interval_text(d), status_text(d, rule, with_forecast=True), seeds]
        body.append(cells)
    seed = f" (seed {study.trials['seed'].iloc[0]})" if len(study.trials) else ""
    header = ["Set", *keys, f"search value{seed}", f"{metric_label(study.metric)} fresh seeds", "n",
              f"confirmed Δ vs {base} (deciding interval)", "status", "seeds used"]  # fmt: skip
    sign = -1 if study.direction == "minimize" else 1
    won = [d for d in dec.rows.values() if d.status == Decision.BETTER]
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
