"""What a researcher sees while a study runs, and what is checked before anything trains: the live progress
in a terminal (a pseudo-terminal) and in a log file, Ctrl-C / SIGTERM closing the run's own trials as
interrupted in both stores, `core.trial --out` on a file, and a corrupt image caught before the first trial
(the data set check, cached by the files' stats)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from studies.records import Status
from studies.store import Store
from tests.conftest import ROOT, TINY_SET, run_module

PY = sys.executable
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def run_cmd(study: Path, workers: int) -> list[str]:
    """studies.run on the test's study `live`, without a report."""
    return [
        PY,
        "-m",
        "studies.run",
        "live",
        "--study-file",
        str(study),
        "--workers",
        str(workers),
        "--no-report",
    ]


def in_pty(cmd: list[str], cwd: Path, env: dict, limit_s: float) -> tuple[subprocess.Popen, list]:
    """Run cmd in a 160x40 pseudo-terminal until it exits; (the finished process, [(seconds since the
    start, bytes read), ...])."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    t0 = time.time()
    p = subprocess.Popen(cmd, cwd=cwd, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                chunks.append((time.time() - t0, data))
            elif p.poll() is not None:
                break
            assert time.time() - t0 < limit_s, "the study did not finish"
        p.wait(60)
    finally:
        os.close(master)
        if p.poll() is None:
            p.kill()
    return p, chunks


def write_study(tmp_path: Path, rows: int = 1, seeds: int = 2, base_set: dict | None = None) -> Path:
    """Study `live` in tmp_path/study.yaml: seg-only rows a, b, ... (loss.seg differs) x seeds 0..n-1."""
    labels = "abcdefgh"[:rows]
    text = {
        "storage": f"sqlite:///{tmp_path / 'studies.db'}",
        "base": {"preset": "smoke", "set": base_set or {}},
        "studies": {
            "live": {
                "kind": "ablation",
                "metric": "final.miou",
                "seeds": list(range(seeds)),
                "rows": [
                    {
                        "label": lab,
                        "set": {
                            "model.branches": ["seg"],
                            "model.affinity": "none",
                            "model.constraints": [],
                            "loss.seg": 1.0 - 0.1 * i,
                        },
                    }
                    for i, lab in enumerate(labels)
                ],  # fmt: skip
            }
        },
    }
    p = tmp_path / "study.yaml"
    p.write_text(json.dumps(text))  # JSON is YAML
    return p


def stand_in_env(sleep: float) -> dict:
    """The stand-in trial of testkit.stand_ins (sleeps, reports a stage, writes a tiny gallery)."""
    return {**os.environ, "STUDIES_TRIAL_FN": "testkit.stand_ins:sleepy_trial", "PYTHONPATH": str(ROOT),
            "CLAIMS_TEST_SLEEP": str(sleep)}  # fmt: skip


@pytest.fixture(scope="module")
def smoke_data(runs) -> Path:
    """The smoke benchmark, generated once where the studies of this module look for it."""
    out = runs / "data" / "synthetic-smoke-seed0"
    p = run_module(
        "core.data.synthetic", ["--out", str(out), "--preset", "smoke", "--seed", "0"], timeout=600
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return out


# ------------------------------------------------------------------------------------ live progress
@pytest.mark.slow
def test_a_terminal_shows_the_study_line_within_10_s_and_updates_it_at_every_trial(tmp_path, smoke_data):
    """A real smoke study (TINY, two rows sharing one warm-up) in a pseudo-terminal: the study line
    ('live k/2 points | ... ETA') is on the screen within 10 s, each running trial has its own line, and the
    count moves at every trial."""
    study = write_study(tmp_path, rows=2, seeds=1, base_set={**TINY_SET, "eval.gallery_images": 0})
    p, raw = in_pty(run_cmd(study, 1), tmp_path, {**os.environ}, limit_s=900)
    chunks = [(t, data.decode(errors="replace")) for t, data in raw]
    screen = [(t, ANSI.sub("", line)) for t, text in chunks for line in re.split(r"[\r\n]", text)]
    study_lines = [(t, int(m[1])) for t, line in screen if (m := re.search(r"live (\d)/2 points \|", line))]
    assert p.returncode == 0, "".join(text for _, text in chunks)[-3000:]
    assert study_lines and study_lines[0][0] < 10.0, study_lines[:3]
    assert any("live 0/2 points" in line and "ETA" in line for _, line in screen)
    counts = [n for _, n in study_lines]
    assert counts[0] == 0 and counts[-1] == 2 and 1 in counts  # moved at each trial, in order
    assert counts == sorted(counts)
    for name in ("#0 a seed 0", "#1 b seed 0"):  # each running trial's own line, with its stage
        assert any(name in line and ("warm-up" in line or "stage" in line or "starting" in line)
                   for _, line in screen), name  # fmt: skip
    text = "".join(t for _, t in chunks)
    assert text.index("trial #0 a seed 0: complete") < text.index("trial #1 b seed 0: complete")


def test_a_log_file_grows_while_the_trials_run(tmp_path):
    """stdout redirected to a file (`nohup ... > log`): a flushed status line at once, the trial lines and a
    status line at every trial event, all while the study runs, not at its exit."""
    study = write_study(tmp_path, rows=1, seeds=3)
    log = tmp_path / "log.txt"
    cmd = run_cmd(study, 1)
    with open(log, "w") as fh:
        p = subprocess.Popen(cmd, cwd=tmp_path, stdout=fh, stderr=subprocess.DEVNULL, env=stand_in_env(1.5))
        seen = []  # the log's contents while the process runs
        while p.poll() is None:
            seen.append(log.read_text())
            time.sleep(0.2)
            assert len(seen) < 1500, "the study did not finish"
    assert p.returncode == 0
    final = log.read_text()
    while_running = [s for s in seen if s]
    assert len({len(s) for s in while_running}) >= 4, "the log grew in at most a few steps"
    assert any("[studies] trial #0 a seed 0: complete" in s and "trial #2" not in s for s in while_running)
    lines = final.splitlines()
    assert next(x for x in lines if x.startswith("[studies] progress")).startswith(
        "[studies] progress: 0/3 points done"
    )
    for k in range(3):  # each trial: a status line when it starts, its line and a status line when it ends
        i = next(i for i, line in enumerate(lines) if line.startswith(f"[studies] trial #{k} "))
        assert lines[i + 1].startswith(f"[studies] progress: {k + 1}/3 points done")
        assert any(f"#{k} a seed {k}:" in line for line in lines[:i] if line.startswith("[studies] progress"))
    # one status line per event: a hand-off (one trial ends, the next starts) is one line, not a pair
    progress = [line.startswith("[studies] progress") for line in lines]
    assert not any(a and b for a, b in zip(progress, progress[1:])), final
    assert sum(progress) == 4, final  # the first trial's start, then each trial's end (with the next start)
    assert max(len(line) for line, p in zip(lines, progress) if p) <= 120, final


# ------------------------------------------------------------------------------------ Ctrl-C, SIGTERM
@pytest.mark.slow
@pytest.mark.parametrize("sig,workers", [(signal.SIGINT, 2), (signal.SIGTERM, 1)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_leaves_no_running_trial_in_either_store(tmp_path, sig, workers):
    """The signal goes to studies.run alone (not its trial processes): it stops its trials and closes them
    as interrupted in its harness rows and in Optuna, frees their grid points, prints their lines, and only
    then says it was interrupted (exit 130)."""
    import optuna
    from optuna.trial import TrialState

    study = write_study(tmp_path, rows=1, seeds=2)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    cmd = run_cmd(study, workers)

    # A runner started in the background of a shell without job control inherits SIGINT ignored, and Python
    # keeps it so: the child starts with the default disposition, as from a terminal.
    def sigint_default() -> None:
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=stand_in_env(120), preexec_fn=sigint_default)  # fmt: skip
    try:
        deadline = time.time() + 300
        while True:  # until its trials run (their harness rows exist)
            assert p.poll() is None and time.time() < deadline, "no trial started"
            try:
                if (
                    sum(t.status == Status.RUNNING for t in Store(url, create=False).trial_progress("live"))
                    == workers
                ):
                    break
            except Exception:  # the store is not created yet
                pass
            time.sleep(0.3)
        p.send_signal(sig)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, out[-2000:]
    store = Store(url, create=False)
    trials = store.trial_progress("live")
    assert len(trials) == workers and {t.status for t in trials} == {Status.INTERRUPTED}
    assert store.claims("live") == []  # the points run again on the next invocation
    ot = optuna.load_study(study_name="live", storage=store.optuna_storage()).get_trials(deepcopy=False)
    assert len(ot) == workers and all(t.state == TrialState.FAIL for t in ot)
    assert all(t.user_attrs["status"] == Status.INTERRUPTED for t in ot)
    stopped = [m.start() for m in re.finditer(r"\[studies\] trial #\d a seed \d: interrupted", out)]
    assert len(stopped) == workers and max(stopped) < out.index("studies.run: interrupted"), out


# ------------------------------------------------------------------------------------ early checks
def test_trial_out_on_a_file_or_unwritable_path_is_one_line_before_any_training(tmp_path, capsys):
    f = tmp_path / "result"
    f.write_text("keep me")
    env = {**os.environ, "AUXSEG_RUNS": str(tmp_path / "runs")}
    t0 = time.time()
    p = run_module("core.trial", ["--preset", "smoke", "--out", str(f)], env=env, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "--out" in p.stderr and "is a file" in p.stderr, p.stderr
    assert f.read_text() == "keep me"
    assert not (tmp_path / "runs").exists(), "nothing may be generated or trained"
    assert time.time() - t0 < 120
    from core.cli import main

    assert main(["--preset", "smoke", "--out", str(f / "sub")]) == 2  # under a file: cannot be created
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "not a writable folder" in err, err


def test_a_corrupt_image_stops_the_study_before_any_trial(tmp_path, smoke_data):
    data = tmp_path / "data"
    shutil.copytree(smoke_data, data)
    bad = data / "JPEGImages" / "train_00003.jpg"
    bad.write_bytes(b"\xff\xd8 this is not a JPEG " * 8)
    study = write_study(tmp_path, rows=1, seeds=1, base_set={**TINY_SET, "data.root": str(data)})
    p = run_module("studies.run", ["live", "--study-file", str(study)], timeout=600)
    assert p.returncode == 2, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stderr.strip().count("\n") == 0 and str(bad) in p.stderr, p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "studies.db").exists(), "no trial may run"


def test_the_data_check_runs_once_per_file_state_and_names_a_bad_file(tmp_path, smoke_data):
    from core.data import DataError, VOCDataset
    from core.data.check import check_splits

    data = tmp_path / "data"
    shutil.copytree(smoke_data, data)
    cache = tmp_path / "runs" / "cache" / "data-check"

    def splits():
        train = VOCDataset(data, "train", saliency="sr")
        return [train, VOCDataset(data, "val", num_classes=train.num_classes)]

    first = check_splits(splits(), cache)
    assert not first.cached and first.items == 200 and first.files > 400
    again = check_splits(splits(), cache)
    assert again.cached and again.seconds < first.seconds
    assert [p.suffix for p in cache.iterdir()] == [".json"]  # one record, no temporary file left
    mask = data / "SegmentationClass" / "val_00007.png"
    mask.write_bytes(mask.read_bytes()[:40])  # truncated: its size and mtime change, so it is decoded again
    with pytest.raises(DataError, match=re.escape(str(mask))):
        check_splits(splits(), cache)


def chatty_trial(cfg, report=None, on_epoch=None, artifacts_dir=None, checkpoint_dir=None):
    """A stand-in trial that writes what real trials write while the bars are drawn: core.trial's resume
    line on stderr, a print on stdout, and a Python warning; then sleeps and returns."""
    import warnings

    from testkit.stand_ins import stand_in_result

    print(f"resuming from {checkpoint_dir}: stage 0 after 1 epoch(s)", file=sys.stderr, flush=True)
    print(f"chatty trial seed {cfg.seed} says hello", flush=True)
    warnings.warn(f"chatty trial seed {cfg.seed} warns", stacklevel=1)
    time.sleep(float(os.environ.get("CLAIMS_TEST_SLEEP", "2")))
    return stand_in_result(cfg, 2.0, report)


@pytest.mark.parametrize("workers", [1, 2], ids=["in-process", "trial-processes"])
def test_no_foreign_text_lands_inside_a_bar_line(tmp_path, workers):
    """A fresh store in a 160x40 pseudo-terminal, rendered by a terminal emulator (pyte) with its scrollback:
    Optuna's "A new study created" line, each trial's "resuming from ..." line, its print and its warning
    each stand whole on a line of their own, at its start, and no line holds both a bar and foreign text
    (issue #37). With 2 workers the lines come from trial processes (relayed), with 1 from this process."""
    import pyte

    study = write_study(tmp_path, rows=1, seeds=2)
    env = {**stand_in_env(2.0), "STUDIES_TRIAL_FN": "tests.test_live:chatty_trial",
           "AUXSEG_RUNS": str(tmp_path / "runs"), "TERM": "xterm"}  # fmt: skip
    p, raw = in_pty(run_cmd(study, workers), tmp_path, env, limit_s=300)
    screen = pyte.HistoryScreen(160, 40, history=10000, ratio=1)
    stream = pyte.ByteStream(screen)
    for _, data in raw:
        stream.feed(data)  # the pty turned each \n into \r\n, as a terminal gets it
    lines = [
        "".join(line[x].data for x in range(screen.columns)).rstrip() for line in list(screen.history.top)
    ] + [line.rstrip() for line in screen.display]
    text = "\n".join(lines)
    assert p.returncode == 0, text[-3000:]
    bar = re.compile(r"\|.{20}\|")  # a bar's 20 cells between pipes (studies.live's bar_format)
    foreign = ["A new study created in RDB with name: live"]
    for seed in range(2):
        foreign += [f"chatty trial seed {seed} says hello", f"chatty trial seed {seed} warns"]
    foreign += ["resuming from "]
    for f in foreign:
        holding = [line for line in lines if f in line]
        assert holding, f"{f!r} is not on the screen:\n{text}"
        for line in holding:
            assert not bar.search(line), f"foreign text inside a bar line: {line!r}\n{text}"
    resumes = [line for line in lines if "resuming from " in line]
    assert len(resumes) == 2 and all(line.startswith("resuming from ") for line in resumes), text
    assert any(bar.search(line) and "live 2/2 points" in line for line in lines), text  # the bars were drawn
