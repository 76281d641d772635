"""The study's report as its optuna-dashboard note: what the dashboard shows on the study page.

The note is the report's markdown with its figures embedded and its gallery links pointing into the
dashboard. optuna-dashboard renders notes as markdown and serves artifacts at /artifacts/<study_id>/<id>
(study) and /artifacts/<study_id>/<trial_id>/<id> (trial), the paths its own note editor inserts and
optuna_dashboard.artifact.get_artifact_path returns, when it is started with --artifact-dir on the artifact
store. So each figure is uploaded as a study artifact (optuna.artifacts.upload_artifact; a figure whose
bytes did not change keeps its artifact, a replaced one is removed as the dashboard's own delete does) and
embedded as ![caption](/artifacts/...); each gallery link, relative to the report file, becomes the
gallery's trial-artifact path. Without an artifact store the figures are named by their file path.
optuna_dashboard.save_note stores the note in the study's system attributes, in the same database as the
results.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from studies.store import Store

FIGURE = re.compile(r"^!\[(?P<caption>[^\]]*)\]\((?P<file>[^)]+)\)\s*$")
LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
ARTIFACT_PREFIX = "artifacts:"  # optuna's system-attribute key of an artifact's metadata
FIGURES_ATTR = "report:figures"  # study system attribute: figure file name -> {artifact_id, sha256}
DELETED = "null"  # an artifact's metadata once removed: the JSON text optuna-dashboard's own delete writes


def note_body(
    markdown: str, report: Path, figures: dict[str, str] | None = None, links: dict[str, str] | None = None
) -> str:
    """The note: the report's markdown, each figure line `![caption](file)` embedded from figures[file] (a
    dashboard URL path) or else named by its path, each link whose target's last part is a key of links
    (an artifact id) pointed at links[key]."""
    folder = report.resolve().parent
    figures, links = figures or {}, links or {}
    lines = [f"*Report file: `{report.resolve()}` (figures beside it).*", ""]

    def relink(m: re.Match) -> str:
        target = m["target"]
        return f"]({links[Path(target).name]})" if Path(target).name in links else m[0]

    for line in readable_tables(markdown.splitlines()):
        m = FIGURE.match(line)
        if m and m["file"] in figures:
            lines.append(f"![{m['caption']}]({figures[m['file']]})")
        elif m:
            lines.append(f"*Figure: {m['caption']}: `{folder / m['file']}`*")
        else:
            lines.append(LINK.sub(relink, line) if links else line)
    return "\n".join(lines).rstrip() + "\n"


TABLE_ROW = re.compile(r"^\|.*\|\s*$")
CELL_SPLIT = re.compile(r"(?<!\\)\|")  # a cell border: a pipe not escaped as \|


def readable_tables(lines: list[str]) -> list[str]:
    """The note's markdown tables as the dashboard can show them: its markdown renderer draws a table with
    neither borders nor padding, so the columns run together ("34.3 ± 0.6 3 (baseline)"), and raw HTML (a
    bordered <table>) needs its --allow-unsafe. A table without links becomes a fenced block of padded
    columns between | borders, in a fixed-width font; one with links (the galleries) stays a table, so that
    they still open."""
    out: list[str] = []
    i = 0
    while i < len(lines):
        j = i
        while j < len(lines) and TABLE_ROW.match(lines[j]):
            j += 1
        block = lines[i:j]
        if (
            len(block) >= 2
            and set(block[1].replace("|", "").split()) <= {"---"}
            and "](" not in "".join(block)
        ):
            out += ["```text", *_aligned([_cells(x) for x in block[:1] + block[2:]]), "```"]
            i = j
        elif block:
            out += block
            i = j
        else:
            out.append(lines[i])
            i += 1
    return out


def _cells(line: str) -> list[str]:
    cells = CELL_SPLIT.split(line.strip())[1:-1]
    return [c.strip().replace("\\|", "|").replace("**", "").replace("`", "") for c in cells]


def _aligned(rows: list[list[str]]) -> list[str]:
    """Header, a rule, then the rows, each column padded to its widest cell."""
    n = max(len(r) for r in rows)
    rows = [r + [""] * (n - len(r)) for r in rows]
    width = [max(len(r[k]) for r in rows) for k in range(n)]
    line = [" | ".join(c.ljust(w) for c, w in zip(r, width)).rstrip() for r in rows]
    return [line[0], "-+-".join("-" * w for w in width), *line[1:]]


def gallery_links(study) -> dict[str, str]:
    """artifact id -> its dashboard path, for every artifact of the study's trials (their galleries)."""
    out = {}
    for t in study.get_trials(deepcopy=False):
        for key, value in t.system_attrs.items():
            if key.startswith(ARTIFACT_PREFIX) and value not in (None, DELETED):
                aid = key[len(ARTIFACT_PREFIX) :]
                out[aid] = f"/artifacts/{study._study_id}/{t._trial_id}/{aid}"
    return out


def upload_figures(study, report: Path, markdown: str, artifacts: str | Path) -> dict[str, str]:
    """Upload the report's figures as study artifacts into the artifact store at `artifacts` and return
    figure file (as the markdown names it) -> dashboard path. An unchanged figure keeps its artifact; the
    one it replaces, or one no longer in the report, is removed (file and metadata, as the dashboard's
    delete does)."""
    from optuna.artifacts import FileSystemArtifactStore, upload_artifact

    folder = Path(artifacts)
    folder.mkdir(parents=True, exist_ok=True)
    store = FileSystemArtifactStore(str(folder))
    storage, sid = study._storage, study._study_id
    attrs = storage.get_study_system_attrs(sid)
    before = attrs.get(FIGURES_ATTR)  # Optuna keeps system attributes as JSON: a mapping comes back
    if not isinstance(before, dict):  # none yet (or a note written before the figures map was a mapping)
        before = {}
    after: dict[str, dict] = {}
    out: dict[str, str] = {}
    for line in markdown.splitlines():
        m = FIGURE.match(line)
        if not m or m["file"] in after:
            continue
        path = report.parent / m["file"]
        if not path.is_file():
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        old = before.get(m["file"])
        if old and old["sha256"] == digest and (folder / old["artifact_id"]).is_file():
            after[m["file"]] = old
        else:
            aid = upload_artifact(artifact_store=store, file_path=str(path), study_or_trial=study,
                                  mimetype="image/png")  # fmt: skip
            after[m["file"]] = {"artifact_id": aid, "sha256": digest}
        out[m["file"]] = f"/artifacts/{sid}/{after[m['file']]['artifact_id']}"
    kept = {v["artifact_id"] for v in after.values()}
    for old in before.values():
        if old["artifact_id"] not in kept:
            try:
                store.remove(old["artifact_id"])
            except Exception:  # already gone
                pass
            storage.set_study_system_attr(sid, ARTIFACT_PREFIX + old["artifact_id"], DELETED)
    storage.set_study_system_attr(sid, FIGURES_ATTR, after)
    return out


def publish_note(name: str, url: str, report: Path, artifacts: str | Path | None = None) -> None:
    """Write report (a markdown file) as the note of Optuna study `name` in the store at url; its figures
    go to the artifact store at `artifacts` (None: named by path only)."""
    import sys

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
        markdown = report.read_text(encoding="utf-8")
        figures = {}
        if artifacts is not None:
            try:
                figures = upload_figures(study, report, markdown, artifacts)
            except Exception as e:  # the note still lists the figures by path
                print(f"[reports] warning: figures not uploaded to {artifacts}: {type(e).__name__}: {e}",
                      file=sys.stderr)  # fmt: skip
        optuna_dashboard.save_note(study, note_body(markdown, report, figures, gallery_links(study)))
    finally:
        store.close()
