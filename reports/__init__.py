"""Study reports: markdown tables in the paper's layout (Tables 3-6, Fig. 6) with paired-by-seed Δ against
the baseline (reports.paired), the metric per seed, per-class IoU (reports.per_class), collapsed trials
flagged (studies.quality), and seaborn figures, built from the results store (read by reports.load).
`build_report(name, storage_url, out_dir)` or `python -m reports NAME`."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from studies.store import DEFAULT_URL

from .load import ReportError, load_study

__all__ = ["DEFAULT_OUT", "ReportError", "build_report"]

DEFAULT_OUT = "runs/reports"


def build_report(name: str, storage_url: str = DEFAULT_URL, out_dir: str | Path = DEFAULT_OUT) -> Path:
    """Write out_dir/NAME.md (and NAME_*.png beside it) for study NAME; return the markdown path.
    Raises ReportError (one line) for a store that cannot be read, an empty store or an unknown study."""
    from . import figures, per_class, tables

    study = load_study(name, storage_url)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    spec = study.spec
    tuning = spec["kind"] == "tuning"
    md = [f"# Study report: {name}", "", tables.provenance(study), ""]

    def section(title: str, body: str | None, *figs: tuple[str, str | None]) -> None:
        if body:
            md.extend([f"## {title}", "", body, ""])
        md.extend(f"![{caption}]({f})\n" for caption, f in figs if f)

    def with_seeds(table: str) -> str:
        seeds = tables.per_seed_table(study)
        return table + (f"\n\n{seeds}" if seeds else "")

    section("Warnings", tables.collapsed_warnings(study))
    bars = (
        "metric per configuration: mean ± std over seeds, one line per seed",
        None if tuning else figures.metric_bars(study, out, f"{stem}_metric.png"),
    )
    if tuning:
        section(
            "Best trials",
            tables.tuning_tables(study),
            ("optimisation history", figures.history(study, out, f"{stem}_history.png")),
            ("metric vs each parameter", figures.param_scatter(study, out, f"{stem}_params.png")),
        )
    elif spec.get("variants") or study.trials["variant"].ne("").any():
        section("Results (Table 6 layout)", with_seeds(tables.variants_table(study)), bars)
    elif spec.get("paper_table") == 5:
        section("Results per stage (Table 5 layout)", with_seeds(tables.stages_table(study)), bars)
    else:
        table = f" (Table {spec['paper_table']} layout)" if spec.get("paper_table") else ""
        section(f"Results{table}", with_seeds(tables.ablation_table(study)), bars)
    if not tuning:
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
    section("Galleries", tables.galleries(study, out))
    section("Failed trials", tables.failures(study))
    path = out / f"{stem}.md"
    path.write_text("\n".join(md).rstrip() + "\n", encoding="utf-8")
    try:  # the dashboard's study note; the report file is written whatever happens here
        from .dashboard import publish_note

        publish_note(name, storage_url, path)
    except Exception as e:
        print(f"[reports] warning: dashboard note not written: {type(e).__name__}: {e}", file=sys.stderr)
    return path
