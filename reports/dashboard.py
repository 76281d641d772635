"""The study's report as its optuna-dashboard note: what the dashboard shows on the study page.

The note is the report's markdown with each figure replaced by its file path (the dashboard cannot
serve files beside the report) and a link to the report file; optuna_dashboard.save_note stores it in
the study's system attributes, in the same database as the results.
"""

from __future__ import annotations

import re
from pathlib import Path

from studies.store import Store

FIGURE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<file>[^)]+)\)\s*$")


def note_body(markdown: str, report: Path) -> str:
    folder = report.resolve().parent
    lines = [f"*Report file: `{report.resolve()}` (figures beside it).*", ""]
    for line in markdown.splitlines():
        m = FIGURE.match(line)
        lines.append(f"*Figure: {m['caption']}: `{folder / m['file']}`*" if m else line)
    return "\n".join(lines).rstrip() + "\n"


def publish_note(name: str, url: str, report: Path) -> None:
    """Write report (a markdown file) as the note of Optuna study `name` in the store at url."""
    import optuna
    import optuna_dashboard

    store = Store(url, create=False)
    try:
        storage = store.optuna_storage()
        if name not in [
            s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)
        ]:
            return  # harness rows without an Optuna study (written through the Store API alone)
        study = optuna.load_study(study_name=name, storage=storage)
        optuna_dashboard.save_note(study, note_body(report.read_text(encoding="utf-8"), report))
    finally:
        store.close()
