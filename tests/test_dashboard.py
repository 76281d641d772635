"""What optuna-dashboard shows for a study, read from a real `optuna-dashboard` server's HTTP API: the
report as the study note (its figures embedded, its gallery links served), the metric's name and unit,
clean user attributes, per-epoch learning curves of one measurement and each trial's gallery artifact."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from core.records import Status
from reports import report_path
from testkit.pgserver import free_port
from testkit.stand_ins import write_grid
from tests.conftest import ROOT


def get(port: int, path: str) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return json.loads(r.read())


@pytest.fixture
def served_study(tmp_path):
    """A 2 x 2 grid run by `studies.run` with a stand-in trial, then a dashboard server on its store."""
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study = write_grid(tmp_path, url, rows=2, seeds=2)
    env = {**os.environ, "STUDIES_TRIAL_FN": "testkit.stand_ins:sleepy_trial", "PYTHONPATH": str(ROOT),
           "CLAIMS_TEST_SLEEP": "0.01"}  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "studies.run", "g", "--study-file", str(study)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    port = free_port()
    server = subprocess.Popen(  # README's command: the study file's store, runs/artifacts
        [sys.executable, "-m", "studies.dashboard", "--study-file", str(study), "--port", str(port)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                get(port, "/api/studies")
                break
            except OSError:
                time.sleep(0.2)
        else:
            pytest.fail("optuna-dashboard did not answer within 20 s")
        yield port, tmp_path
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
def test_dashboard_shows_the_report_note_metric_name_curves_and_clean_attributes(served_study):
    port, tmp_path = served_study
    (summary,) = get(port, "/api/studies")["study_summaries"]
    d = get(port, f"/api/studies/{summary['study_id']}")
    note = d["note"]["body"]
    assert "# Study report: g" in note and "Δ paired (95% CI)" in note
    # the tables as padded columns between | borders in a fixed-width block (the dashboard draws a markdown
    # table without borders or padding); the galleries' table keeps its links
    assert "```text\n" in note and re.search(r"^r0 +\| ", note, re.M) and re.search(r"^r1 +\| ", note, re.M)
    report = report_path("g", f"sqlite:///{tmp_path / 'studies.db'}", tmp_path / "runs" / "reports")
    assert report.name.startswith("g--studies-")  # not the default store: the file name names the store
    assert f"Report file: `{report}`" in note
    assert "- **Reproduce:** `python -m studies.run g --preset smoke" in note
    # each row links its seeds' galleries at the path the dashboard serves them (not ../artifacts/<id>)
    sid = summary["study_id"]
    links = re.findall(r"\[seed (\d)\]\((/artifacts/[^)]+)\)", note)
    assert "## Galleries" in note and len(links) == 4 and "../artifacts/" not in note
    for _, link in links:
        assert link.startswith(f"/artifacts/{sid}/")
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}{link}").read().startswith(b"\x89PNG")
    # the report's figures are study artifacts, embedded in the note as images the dashboard serves
    figures = re.findall(r"^!\[[^\]]*\]\((/artifacts/[^)]+)\)$", note, flags=re.M)
    assert figures and "*Figure:" not in note  # the stand-in trials draw the metric figure
    for link in figures:
        assert link.startswith(f"/artifacts/{sid}/")
        assert urllib.request.urlopen(f"http://127.0.0.1:{port}{link}").read().startswith(b"\x89PNG")
    assert d["objective_names"] == ["final.miou (%)"]
    assert {a["key"]: a["value"] for a in summary["user_attrs"]}["value_unit"] == "percent"
    assert len(d["trials"]) == 4
    for t in d["trials"]:
        attrs = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert attrs["status"] == Status.COMPLETE and attrs["collapsed"] == "False"
        assert not {"row", "variant", "seed", "harness_trial_id", "owner_host", "owner_pid", "error"} & set(
            attrs
        )
        assert all(v not in (None, "None", "null") for v in attrs.values())
        seed = int(t["params"][[p["name"] for p in t["params"]].index("seed")]["param_external_value"])
        row = t["params"][[p["name"] for p in t["params"]].index("row")]["param_external_value"]
        # the trial list shows only "Trial N": row and seed are the trial's note, at the top of its page
        assert t["note"]["body"] == f"**{row}**, seed {seed}"
        assert t["values"] == [pytest.approx(30.0 + seed)]  # percent: the stand-in trial's 0.30 + 0.01 seed
        (gallery,) = t["artifacts"]  # the trial's gallery, uploaded to the default runs/artifacts
        assert gallery["mimetype"] == "image/png" and gallery["filename"] == "gallery.png"
        png = urllib.request.urlopen(
            f"http://127.0.0.1:{port}/artifacts/{summary['study_id']}/{t['trial_id']}/{gallery['artifact_id']}"
        ).read()
        assert png.startswith(b"\x89PNG")
        # one measurement: the curve subset's val mIoU per epoch; the stage end's whole-val value is not
        # on it (it is a user attribute and a stage row)
        curve = {p["step"]: p["value"] for p in t["intermediate_values"]}
        assert sorted(curve) == [0, 1, 2]
        assert curve[0] == pytest.approx(10.0 + seed) and curve[2] == pytest.approx(20.0 + seed)
        assert float(attrs["stage0_val_miou"]) == pytest.approx(30.0 + seed)
