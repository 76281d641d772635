"""Study reports: markdown tables in the paper's layout (Tables 3-6, Fig. 6) with paired-by-seed Δ against
the baseline (reports.paired), the metric per seed, per-class IoU (reports.per_class), collapsed trials
flagged (studies.quality), and seaborn figures, built from the results store (read by reports.load).
`build_report(name, storage_url, out_dir)` or `python -m reports NAME`.

A report's files are named by its study and its store (`report_stem`): NAME.md for the default store
(sqlite:///runs/studies.db), NAME--<store>-<hash>.md for any other, so reports of one study built from two
stores never overwrite each other; the figures share the stem (NAME_metric.png,
NAME--<store>-<hash>_metric.png)."""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

from studies.db import DEFAULT_URL, normalize_url, redact_url

from .load import ReportError, load_study

__all__ = ["DEFAULT_OUT", "ReportError", "build_report", "report_path", "report_stem", "store_identity"]

DEFAULT_OUT = "runs/reports"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL, absolute; None for other URLs, in-memory and URI databases."""
    import sqlalchemy as sa  # parses the URL only

    try:
        u = sa.engine.make_url(url)
    except Exception:  # a malformed URL: it is named as written
        return None
    db = u.database
    if u.get_backend_name() != "sqlite" or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return Path(db).expanduser().resolve()


def store_identity(url: str) -> str:
    """What names a store in report file names: its URL without the password (shown as ***), the PostgreSQL
    scheme normalised (postgres:// = postgresql+psycopg://), an SQLite file's path made absolute (relative
    URLs resolve against the working folder, as when the store is opened)."""
    db = _sqlite_file(url)
    return f"sqlite:///{db}" if db else redact_url(normalize_url(url))


def report_stem(name: str, url: str = DEFAULT_URL) -> str:
    """File stem of study `name`'s report from the store at url: NAME for the default store, else
    NAME--<readable store name>-<8 hex of sha256(store_identity)>, e.g. tasks--studies-1f0c2a9b (an SQLite
    file's stem) or tasks--dbhost_studies-3e5d7a01 (a server's host and database)."""
    ident = store_identity(url)
    if ident == store_identity(DEFAULT_URL):
        return _safe(name)
    db = _sqlite_file(url)
    if db:
        readable = db.stem
    else:
        m = re.match(r"^[^:]*://(?:[^@/]*@)?(?P<host>[^:/?]*)(?::\d+)?/?(?P<db>[^?]*)", ident)
        readable = "_".join(x for x in (m["host"], m["db"]) if x) if m else ""
    digest = hashlib.sha256(ident.encode()).hexdigest()[:8]
    return f"{_safe(name)}--{_safe(readable)[:40].strip('_') or 'store'}-{digest}"


def report_path(name: str, url: str = DEFAULT_URL, out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Where build_report writes study `name`'s report from the store at url: out_dir/<report_stem>.md."""
    return Path(out_dir) / f"{report_stem(name, url)}.md"


def build_report(
    name: str,
    storage_url: str = DEFAULT_URL,
    out_dir: str | Path = DEFAULT_OUT,
    artifacts: str | Path | None = None,
) -> Path:
    """Write report_path(name, storage_url, out_dir) (and <stem>_*.png beside it) for study NAME; return the
    markdown path. Raises ReportError (one line) for a store that cannot be read, an empty store or an
    unknown study. The report is also the study's optuna-dashboard note (reports.dashboard), its figures
    uploaded to the Optuna artifact store folder `artifacts` (None: the note names their files)."""
    from . import figures, per_class, provenance, tables, tuning

    study = load_study(name, storage_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = report_path(name, storage_url, out)
    stem = path.stem
    spec = study.spec
    is_tuning = not spec.kind.is_grid
    md = [provenance.title(study), "", provenance.provenance(study, path.name), ""]

    def section(title: str, body: str | None, *figs: tuple[str, str | None]) -> None:
        if body:
            md.extend([f"## {title}", "", body, ""])
        md.extend(f"![{caption}]({f})\n" for caption, f in figs if f)

    def with_seeds(table: str) -> str:
        seeds = tables.per_seed_table(study)
        return table + (f"\n\n{seeds}" if seeds else "")

    section("Warnings", provenance.collapsed_warnings(study))
    rope = study.seed_rule.rope / 100 if study.seed_rule is not None else None  # adaptive: shaded ±rope
    bars = (
        "metric per configuration, one dot per seed (a line joins each seed across rows, | = row mean); "
        "paired Δ against the baseline row with "
        + ("its 95% CI" if study.seed_rule is None else "the adaptive rule's deciding interval"),
        None if is_tuning else figures.metric_figure(study, out, f"{stem}_metric.png", rope=rope),
    )
    if is_tuning:
        section("Confirmation on fresh seeds (the answer)", tuning.confirmation(study))
        section(
            "Best trials",
            tuning.tuning_tables(study),
            ("optimisation history", figures.history(study, out, f"{stem}_history.png")),
            ("metric vs each parameter", figures.param_scatter(study, out, f"{stem}_params.png")),
        )
    elif spec.variants or study.trials["variant"].ne("").any():
        section("Results (Table 6 layout)", with_seeds(tables.variants_table(study)), bars)
    elif spec.paper_table == 5:
        section("Results per stage (Table 5 layout)", with_seeds(tables.stages_table(study)), bars)
    else:
        table = f" (Table {spec.paper_table} layout)" if spec.paper_table else ""
        section(f"Results{table}", with_seeds(tables.ablation_table(study)), bars)
    if not is_tuning:
        frame = per_class.per_class_frame(study)
        section(
            "Per-class IoU (val, last stage)",
            per_class.per_class_table(frame),
            (
                "per-class IoU (%), mean over seeds",
                figures.per_class_heatmap(
                    frame, out, f"{stem}_per_class.png", f"{name}: per-class IoU (%), mean over seeds"
                ),
            ),
        )
    section("The paper's reference rows", tables.paper_reference(study))
    section(
        "Pseudo-label quality (Fig. 6 quantities)",
        tables.pgt_table(study),
        (
            "val mIoU and pseudo-label precision / recall / mIoU per stage",
            figures.stage_curves(study, out, f"{stem}_stages.png"),
        ),
    )
    section("Galleries", provenance.galleries(study, out))
    section("Failed trials", provenance.failures(study))
    path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    try:  # the dashboard's study note; the report file is written whatever happens here
        from .dashboard import publish_note

        publish_note(name, storage_url, path, artifacts)
    except Exception as e:
        print(f"[reports] warning: dashboard note not written: {type(e).__name__}: {e}", file=sys.stderr)
    return path
