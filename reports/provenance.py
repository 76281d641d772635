"""The report's frame around its tables: the title and provenance block (store, progress, data, compute,
environment, the command that reproduces it), collapsed-trial warnings, failed trials, image galleries."""

from __future__ import annotations

import os
import shlex
from collections import Counter
from pathlib import Path

import pandas as pd

from studies.db import redact_url
from studies.quality import COLLAPSED_MEANING
from studies.records import Status, dig

from .format import markdown, metric_label, pct
from .load import StudyResults

REPRO_NOTE = (
    "Metrics are bit-identical only for the same machine (CPU model and kernel level), torch build and "
    "thread count; compare across machines with the paired Δ, not raw values."
)


# Listed under "Failed trials"; pruned and running trials are not.
NOT_COMPLETE = (Status.FAILED, Status.INTERRUPTED)


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


def partial_text(study: StudyResults) -> str | None:
    """'8/15 points complete, 2 running' while trials run or points are missing, else None (the report's
    title and its figure's say it alike)."""
    p = study.progress()
    return p.done_text() + (f", {p.running} running" if p.running else "") if p.partial else None


def title(study: StudyResults) -> str:
    """The report's title line; 'partial' with the points complete while trials run or points are missing."""
    what = partial_text(study)
    return f"# Study report: {study.name}" + (f" (partial: {what})" if what else "")


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
    if e.get("kernel_caps"):
        cap += f" [{e['kernel_caps']}]"
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
        for row, variant in study.groups()
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
