"""studies.run's command line fails early and in one line, and tells what it will do: the study name after
--set, --help listing studies and presets, train.device=cuda on a CPU machine, --dry-run with the
storage, progress per row and a time estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from testkit.stand_ins import write_grid


@pytest.fixture
def grid(tmp_path, monkeypatch):
    monkeypatch.setenv("STUDIES_TRIAL_FN", "testkit.stand_ins:sleepy_trial")
    monkeypatch.setenv("CLAIMS_TEST_SLEEP", "0.05")
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    return write_grid(tmp_path, url, rows=2, seeds=2), url


def test_study_name_after_set_is_the_name(grid, capsys):
    from studies.run import main

    y, _ = grid
    assert main(["--study-file", str(y), "--set", "loss.sal=0.5", "g", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("study g (ablation") and "loss.sal=0.5" in out
    assert main(["--study-file", str(y), "--set", "loss.sal=0.5", "g", "h", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected KEY=VALUE" in err


def test_help_lists_studies_and_presets(grid, capsys):
    from studies.run import main

    y, _ = grid
    assert main(["--study-file", str(y), "--help"]) == 0
    out = capsys.readouterr().out
    assert "presets: smoke, default, paper" in out and f"studies in {y}:" in out and "\n  g  " in out


def test_cuda_on_a_cpu_machine_is_one_line_before_any_trial(grid, capsys):
    import torch

    from studies.run import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    y, _ = grid
    assert main(["g", "--study-file", str(y), "--set", "train.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("train.device=cuda: this machine has no CUDA")
    assert not (y.parent / "studies.db").exists()  # checked before the store is even opened


def test_dry_run_shows_storage_progress_and_estimate(grid, capsys):
    from studies.run import main

    y, url = grid
    assert main(["g", "--study-file", str(y), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"storage: {url} (0 trial(s) of this study stored)" in out
    assert "r0                                 -             0 / 2" in out
    assert "estimate: none yet" in out
    assert main(["g", "--study-file", str(y), "--n-trials", "3", "--no-report"]) == 0
    capsys.readouterr()
    assert main(["g", "--study-file", str(y), "--dry-run", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "(3 trial(s) of this study stored)" in out
    assert "r0                                 -             2 / 0" in out
    assert "r1                                 -             1 / 1" in out
    assert "estimate: 1 trial(s) x " in out and "/ 2 worker(s)" in out


def test_workers_default_to_one_single_threaded_trial_per_core(grid, capsys, monkeypatch):
    import torch

    from studies.run import main

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: trials run one at a time on it")
    y, _ = grid
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert main(["g", "--study-file", str(y), "--dry-run"]) == 0  # 4 points: no more workers than that
    assert "workers: 4 trial(s) at once, 2 thread(s) each (automatic" in capsys.readouterr().out
    assert main(["g", "--study-file", str(y), "--dry-run", "--n-trials", "3"]) == 0
    assert "workers: 3 trial(s) at once" in capsys.readouterr().out
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert main(["g", "--study-file", str(y), "--dry-run"]) == 0
    assert "workers: 2 trial(s) at once, 1 thread(s) each (automatic" in capsys.readouterr().out
    assert main(["g", "--study-file", str(y), "--dry-run", "--set", "model.width=1.0"]) == 0  # a wide net
    assert "workers: 1 trial(s) at once (automatic" in capsys.readouterr().out
    assert main(["g", "--study-file", str(y), "--dry-run", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "workers: 1 trial(s) at once\n" in out


def test_report_reproduce_line_carries_the_set_overrides(grid, capsys, tmp_path):
    from studies.run import main

    y, url = grid
    assert (
        main(["g", "--study-file", str(y), "--n-trials", "1", "--set", "loss.sal=0.5", "train.lr=3e-4"]) == 0
    )
    from reports import report_path

    md = report_path("g", url, tmp_path / "runs" / "reports").read_text()  # a report per study and store
    line = [x for x in md.splitlines() if x.startswith("- **Reproduce:**")][0]
    assert "python -m studies.run g --preset smoke --set loss.sal=0.5 train.lr=3e-4 --study-file " in line
    assert f"--study-file {y.resolve()} --storage" in line  # the study is not in ./study.yaml


@pytest.mark.parametrize("case", ["not a database", "a folder", "unwritable", "bad --artifacts"])
def test_a_bad_storage_or_artifacts_is_one_line_within_5_s_and_creates_nothing(tmp_path, case):
    """As a user runs it (a subprocess: imports included in the 5 s): one line, exit 2, before the data set
    check, and nothing created: no store, no artifact folder, no folder under runs/ (issue #37)."""
    import os
    import time

    from tests.conftest import run_module

    y = write_grid(tmp_path, "sqlite:///unused.db", rows=2, seeds=2)
    (tmp_path / "notes.db").write_text("my notes, not a database\n")
    (tmp_path / "folder.db").mkdir()
    storage, artifacts, expect = {
        "not a database": (tmp_path / "notes.db", tmp_path / "art", "is not an SQLite database"),
        "a folder": (tmp_path / "folder.db", tmp_path / "art", "is a folder, not a database file"),
        # /proc/1 is a folder that not even root can create a file in
        "unwritable": (Path("/proc/1/s.db"), tmp_path / "art", "cannot write the SQLite store"),
        "bad --artifacts": (tmp_path / "s.db", tmp_path / "notes.db" / "art", "not a writable folder"),
    }[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    env = {
        **os.environ,
        "AUXSEG_RUNS": str(tmp_path / "runs"),
        "STUDIES_TRIAL_FN": "testkit.stand_ins:sleepy_trial",
    }
    t0 = time.monotonic()
    p = run_module("studies.run", ["g", "--study-file", str(y), "--storage", f"sqlite:///{storage}",
                                   "--artifacts", str(artifacts)], env=env, timeout=60)  # fmt: skip
    seconds = time.monotonic() - t0
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and expect in p.stderr and "Traceback" not in p.stderr
    assert seconds < 5, f"{seconds:.1f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no artifact folder, no runs/
    assert (tmp_path / "notes.db").read_text() == "my notes, not a database\n"
