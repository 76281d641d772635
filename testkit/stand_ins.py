"""Stand-in trials: functions with core.trial.run_trial's signature that return a result of its shape at
once, for tests and benchmarks of the study machinery (claims, stores, backends, reports). A studies.run
process runs one when STUDIES_TRIAL_FN="testkit.stand_ins:sleepy_trial" (studies.execute.trial_fn).

    write_grid(folder, url, rows=3, seeds=4)   # study.yaml of study "g": rows r0.. (loss.cls = 1 + i)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from core.records import Status


def stand_in_result(
    cfg, seconds: float, report=None, artifacts: dict | None = None, miou: float | None = None
):
    """A result shaped like core.trial's, its metric `miou` (default 0.30 + 0.01 x seed); the stage goes to
    report."""
    miou = 0.3 + 0.01 * cfg.seed if miou is None else miou
    stage = {"stage": 0, "val": {"miou": miou}, "pgt": {}, "seconds": 0.1, "epoch": 3}
    if report is not None:
        report(0, stage)
    return {
        "status": Status.COMPLETE,
        "error": None,
        "config": cfg.to_dict(),
        "final": {"miou": miou},
        "stages": [stage],
        "seconds": seconds,
        "artifacts": artifacts or {},
    }


def sleepy_trial(cfg, report=None, on_epoch=None, artifacts_dir=None, checkpoint_dir=None):
    """Sleeps $CLAIMS_TEST_SLEEP seconds (0.2), draws a learning curve, reports one stage, writes a tiny
    gallery."""
    time.sleep(float(os.environ.get("CLAIMS_TEST_SLEEP", "0.2")))
    if on_epoch is not None:  # a learning curve rising to the stage's value
        for epoch in range(3):
            on_epoch(epoch, 0.1 + 0.05 * epoch + 0.01 * cfg.seed)
    artifacts = {}
    if artifacts_dir is not None:  # a stand-in gallery, so the upload path runs
        from PIL import Image

        artifacts["gallery"] = str(Path(artifacts_dir) / "gallery.png")
        Image.new("RGB", (4, 4), (cfg.seed, 0, 0)).save(artifacts["gallery"])
    return stand_in_result(cfg, 0.2, report, artifacts)


def write_grid(
    folder: Path,
    url: str,
    rows: int = 3,
    seeds: int = 4,
    study: str = "g",
    label: Callable[[int], str] = lambda i: f"r{i}",
    description: str | None = None,
) -> Path:
    """folder/study.yaml with one ablation grid on the smoke preset: rows label(i) setting loss.cls = 1 + i
    (so a stand-in can tell its row from its config), seeds 0..seeds-1."""
    spec: dict = {"kind": "ablation", "metric": "final.miou", "seeds": list(range(seeds))}
    if description:
        spec["description"] = description
    spec["rows"] = [{"label": label(i), "set": {"loss.cls": 1.0 + i}} for i in range(rows)]
    text = {"storage": url, "base": {"preset": "smoke", "set": {}}, "studies": {study: spec}}
    path = folder / "study.yaml"
    path.write_text(json.dumps(text))  # JSON is YAML
    return path
