"""A killed trial resumes from its last checkpoint with the same final numbers as an uninterrupted run
(core.trial --out DIR, and a grid point of studies.run), and a killed studies.run leaves no process behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core import checkpoint
from core.config import make_config
from core.records import Status
from tests.conftest import ROOT, kill_when, run_module, sigkill_leaves_nothing

PY = sys.executable
# Two stages of two epochs: a kill in the second stage after one of its epochs has a label update, a
# finished stage and a half-done one behind it. No post-processing or gallery: the numbers are the point.
SHORT = ["train.stage_epochs=2", "eval.post=false", "eval.gallery_images=0", "train.threads=1"]


def comparable(result: dict) -> dict:
    """What an interrupted and resumed trial must reproduce bit for bit (not its times)."""
    stages = [{k: v for k, v in s.items() if k != "seconds"} for s in result["stages"]]
    return {"initial_pgt": result["initial_pgt"], "stages": stages, "final": result["final"]}


def trial_cmd(out: Path, *extra: str) -> list[str]:
    return [PY, "-m", "core.trial", "--preset", "smoke", "--set", *SHORT, *extra, "--out", str(out)]


def wait_for_checkpoint(
    folder: Path, pattern: str, proc: subprocess.Popen, stage: int, trials: int = 1
) -> dict:
    """Poll the checkpoints folder.glob(pattern) until one holds an epoch of `stage` (not only its start)
    and `trials` of them hold a trained epoch (a trial still in its warm-up has none to resume from)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        states = []
        for path in folder.glob(pattern):
            try:
                states.append(torch.load(path, weights_only=True))
            except Exception:  # being replaced right now
                continue
        trained = [st for st in states if st["train"] is not None]
        at_stage = [st for st in trained if st["stage"] == stage]
        if at_stage and len(trained) >= trials:
            return at_stage[0]
        time.sleep(0.1)
    raise AssertionError(
        f"no checkpoint of stage {stage} (and {trials} trained) in {folder} (process rc {proc.poll()})"
    )


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """The uninterrupted trial (seed 0), run without checkpoints from a folder whose checkpoint is
    garbage: the trial warns in one line naming the file and starts from its first epoch."""
    out = tmp_path_factory.mktemp("reference")
    (out / "checkpoint").mkdir()
    (out / "checkpoint" / checkpoint.LAST).write_bytes(b"PK\x03\x04 truncated by a full disk")
    r = subprocess.run(trial_cmd(out, "train.checkpoint_every=0"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"checkpoint {out / 'checkpoint' / checkpoint.LAST} is unreadable" in r.stderr, r.stderr[-2000:]
    assert "starting the trial from its first epoch" in r.stderr
    assert not (out / "checkpoint").exists()  # the trial ended: nothing left to resume
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == [] and result["status"] == Status.COMPLETE
    return result


@pytest.mark.slow
def test_a_trial_killed_in_its_second_stage_resumes_with_identical_numbers(runs, reference, tmp_path):
    out = tmp_path / "t"
    p = subprocess.Popen(trial_cmd(out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        st = wait_for_checkpoint(out / "checkpoint", checkpoint.LAST, p, stage=1)
        p.send_signal(signal.SIGKILL)
    finally:
        p.kill()
        p.wait()
    assert st["train"]["epoch"] == 0  # killed after the second stage's first epoch
    assert not (out / "result.json").exists()
    # a kill in the middle of the next write left a torn temporary file: it is ignored
    (out / "checkpoint" / (checkpoint.LAST + ".tmp")).write_bytes(b"torn")
    r = subprocess.run(trial_cmd(out, "train.keep_checkpoint=true"), cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed in stage 1 after 1 of its epochs" in r.stdout, r.stdout
    result = json.loads((out / "result.json").read_text())
    assert result["resumed_from"] == [{"stage": 1, "epoch": 1}]
    assert comparable(result) == comparable(reference)
    assert result["seconds"] >= result["timings"]["train"]
    # train.keep_checkpoint: the trained network stays, as the last epoch's checkpoint
    kept = torch.load(out / "checkpoint" / checkpoint.LAST, weights_only=True)
    assert kept["stage"] == 1 and kept["train"]["epoch"] == 1 and "seg_conv4.weight" in kept["net"]
    assert result["checkpoint"]["bytes"] == (out / "checkpoint" / checkpoint.LAST).stat().st_size


@pytest.mark.slow
def test_a_trial_with_loader_workers_matches_the_synchronous_one_and_resumes_exactly(
    runs, reference, tmp_path
):
    """Batches prepared by 2 loader workers (core.loader) from the warm-up on, killed in the second stage
    and resumed: the same numbers as the synchronous reference. data.root names the reference's data, so
    the warm-up is not served from its cache (its key holds the root) and runs with the workers too. The
    kill leaves none of the trial's processes (loader workers, CRF pool) behind."""
    data = runs / "data" / "synthetic-smoke-seed0"
    cmd = trial_cmd(tmp_path / "t", "train.loader_workers=2", "train.workers=2", f"data.root={data}")
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_checkpoint(tmp_path / "t" / "checkpoint", checkpoint.LAST, p, stage=1)
        sigkill_leaves_nothing(p, at_least=5)  # 2 loader workers, a CRF pool of 2, the resource tracker
    finally:
        p.kill()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / "t" / "result.json").read_text())
    assert result["warmup"]["cached"] is False and result["resumed_from"] == [{"stage": 1, "epoch": 1}]
    assert comparable(result) == comparable(reference)


def test_a_checkpoint_of_another_config_is_refused_in_one_line(tmp_path):
    cfg = make_config("smoke", ["loss.cls=0.5"])
    folder = tmp_path / "t" / "checkpoint"
    checkpoint.save(folder, {"fingerprint": checkpoint.config_fingerprint(cfg), "stage": 0, "train": None})
    r = run_module("core.trial", ["--preset", "smoke", "--set", *SHORT, "--out", str(tmp_path / "t")])
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith(
        f"error: checkpoint {folder / checkpoint.LAST} was written by a trial of another"
    )
    # what a checkpoint must match: not how often it is written or whether it is kept
    other = make_config(
        "smoke",
        ["loss.cls=0.5", "train.checkpoint_every=3", "train.keep_checkpoint=true", "train.loader_workers=2"],
    )
    assert checkpoint.config_fingerprint(other) == checkpoint.config_fingerprint(cfg)


def test_unreadable_checkpoint_labels_fall_back_to_the_start(tmp_path, capsys):
    cfg = make_config("smoke")
    fp = checkpoint.config_fingerprint(cfg)
    checkpoint.save(tmp_path, {"fingerprint": fp, "stage": 1, "train": None})
    assert checkpoint.load(tmp_path, fp) is None  # labels-s1.npz is missing
    assert f"checkpoint labels {tmp_path / 'labels-s1.npz'} are unreadable" in capsys.readouterr().err
    segs = [
        torch.randint(0, 21, (5, 7), dtype=torch.uint8).numpy(),
        torch.zeros(3, 2, dtype=torch.uint8).numpy(),
    ]
    checkpoint.save_labels(tmp_path, 1, segs, None)
    state = checkpoint.load(tmp_path, fp)
    assert state is not None and state["sal_targets"] is None
    assert [s.tolist() for s in state["segs"]] == [s.tolist() for s in segs]


def write_study(tmp_path: Path) -> Path:
    text = {
        "base": {"preset": "smoke", "set": {}},
        "studies": {
            "r": {
                "kind": "ablation",
                "metric": "final.miou",
                "seeds": [0, 1],
                "set": {
                    k: json.loads(v) if v[0].isdigit() or v in ("true", "false") else v
                    for k, v in (x.split("=", 1) for x in SHORT)
                },  # fmt: skip
                # a CRF pool in each trial process; both seeds start from seed 0's warm-up, which `reference`
                # cached, so that both are training (and checkpointing) before either ends
                "rows": [{"label": "full", "set": {"train.workers": 2, "train.warmup_seed": "0"}}],
            }
        },
    }
    p = tmp_path / "study.yaml"
    p.write_text(json.dumps(text))
    return p


@pytest.mark.slow
def test_a_killed_study_leaves_no_process_and_its_rerun_resumes_each_trial(runs, reference, tmp_path):
    study = write_study(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"
    cmd = [PY, "-m", "studies.run", "r", "--study-file", str(study), "--storage", url, "--workers", "2",
           "--no-report"]  # fmt: skip
    env = {**os.environ, "AUXSEG_RUNS": str(runs)}
    ckpts = runs / "checkpoints" / "r"
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_checkpoint(ckpts, f"*/*/{checkpoint.LAST}", p, stage=1, trials=2)  # store-*/<point>/
        sigkill_leaves_nothing(p, at_least=6)  # 2 trial processes with a CRF pool of 2 each, the tracker
    finally:
        p.kill()

    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    import optuna

    from studies.store import Store

    store = Store(url)
    trials = store.trials("r")
    ot = optuna.load_study(study_name="r", storage=store.optuna_storage()).get_trials(deepcopy=False)
    store.close()
    # the resumed Optuna trials carry the whole learning curve (2 stages x 2 epochs), replayed ones included
    assert [sorted(t.intermediate_values) for t in ot if t.state.name == "COMPLETE"] == [[0, 1, 2, 3]] * 2
    done = {t.seed: t for t in trials if t.status == Status.COMPLETE}
    assert sorted(done) == [0, 1] and sum(t.status == Status.INTERRUPTED for t in trials) == 2, trials
    for t in done.values():
        assert t.result["resumed_from"], t.result  # neither started over
    assert comparable(done[0].result) == comparable(reference)
    assert not any(p.is_file() for p in ckpts.rglob("*"))  # complete trials leave no checkpoint behind


def checkpointing_trial(cfg, report=None, on_epoch=None, artifacts_dir=None, checkpoint_dir=None):
    """A stand-in trial that logs each call (its parameter, its checkpoint folder, whether that held a
    checkpoint) to $RESUME_TEST_DIR/calls.jsonl; the first call ever checkpoints and then hangs until
    killed."""
    from testkit.stand_ins import stand_in_result

    ctrl, folder = Path(os.environ["RESUME_TEST_DIR"]), Path(checkpoint_dir)
    found = (folder / "progress").exists()
    with open(ctrl / "calls.jsonl", "a") as f:
        f.write(json.dumps({"loss.cls": cfg.loss.cls, "dir": str(folder), "found": found}) + "\n")
    if not (ctrl / "hung").exists():
        folder.mkdir(parents=True)
        (folder / "progress").write_text("1")
        (ctrl / "hung").write_text("")
        time.sleep(600)
    res = stand_in_result(cfg, 0.0, report)
    res["resumed_from"] = [{"stage": 0, "epoch": 1}] if found else []
    shutil.rmtree(folder, ignore_errors=True)  # as run_trial: an ended trial leaves nothing to resume
    return res


def test_an_interrupted_tuning_trial_is_asked_again_and_finds_its_checkpoint(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(json.dumps({"base": {"preset": "smoke"}, "studies": {"t": {
        "kind": "tuning", "metric": "final.miou", "n_trials": 2, "sampler": "random", "confirm": False,
        "params": {"loss.cls": {"type": "float", "low": 0.1, "high": 10.0, "log": True}}}}}))  # fmt: skip
    url = f"sqlite:///{tmp_path / 's.db'}"
    cmd = [PY, "-m", "studies.run", "t", "--study-file", str(study), "--storage", url, "--workers", "1",
           "--no-report"]  # fmt: skip
    env = {**os.environ, "AUXSEG_RUNS": str(tmp_path / "runs"), "RESUME_TEST_DIR": str(tmp_path),
           "STUDIES_TRIAL_FN": "tests.test_resume:checkpointing_trial"}  # fmt: skip
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    kill_when(p, (tmp_path / "hung").exists, 120, poll_s=0.1, never="no trial started")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    calls = [json.loads(line) for line in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert len(calls) == 3, calls  # the killed trial, its rerun, one new trial
    killed, rerun, new = calls
    assert rerun == {**killed, "found": True}  # same parameters, same folder, checkpoint found
    assert not new["found"]
    import optuna

    from studies.store import Store

    store = Store(url)
    trials = store.trials("t")
    ot = optuna.load_study(study_name="t", storage=store.optuna_storage()).get_trials(deepcopy=False)
    store.close()
    assert [t.status for t in trials] == [Status.INTERRUPTED, Status.COMPLETE, Status.COMPLETE], trials
    assert trials[1].result["resumed_from"] and trials[1].params == trials[0].params
    assert ot[1].user_attrs["resumes"] == ot[0].number


def test_two_stores_of_one_study_never_resume_each_others_checkpoints(tmp_path):
    """The same study run into two stores from one working folder (issue #37): a run into b.db is killed
    mid-trial; a fresh run into c.db neither resumes nor deletes b.db's checkpoint; b.db's rerun still
    resumes it. A checkpoint folder of the layout before store tags is noted in one line, never resumed, and
    left where it is."""
    study = tmp_path / "study.yaml"
    grid = {"kind": "ablation", "metric": "final.miou", "seeds": [0], "rows": [{"label": "a", "set": {}}]}
    study.write_text(json.dumps({"base": {"preset": "smoke"}, "studies": {"r": grid}}))
    env = {**os.environ, "AUXSEG_RUNS": str(tmp_path / "runs"), "RESUME_TEST_DIR": str(tmp_path),
           "STUDIES_TRIAL_FN": "tests.test_resume:checkpointing_trial", "PYTHONPATH": str(ROOT)}  # fmt: skip

    def cmd(store: str) -> list[str]:
        return [PY, "-m", "studies.run", "r", "--study-file", str(study), "--storage",
                f"sqlite:///{tmp_path / store}", "--workers", "1", "--no-report"]  # fmt: skip

    p = subprocess.Popen(
        cmd("b.db"), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    kill_when(p, (tmp_path / "hung").exists, 120, poll_s=0.1, never="no trial started")
    old = tmp_path / "runs" / "checkpoints" / "r" / "0123456789ab-0123456789ab"  # the layout before #37
    old.mkdir(parents=True)
    (old / "progress").write_text("1")

    c = subprocess.run(cmd("c.db"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert c.returncode == 0, c.stderr[-3000:]
    b = subprocess.run(cmd("b.db"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert b.returncode == 0, b.stderr[-3000:]
    killed, in_c, rerun_b = [json.loads(x) for x in (tmp_path / "calls.jsonl").read_text().splitlines()]
    assert not in_c["found"] and in_c["dir"] != killed["dir"]  # c.db: a folder of its own, nothing to resume
    assert rerun_b == {**killed, "found": True}  # b.db: its own checkpoint, still there after the c.db run
    for run in (c, b):  # the old folder: one line each run, never resumed, never deleted
        notes = [x for x in run.stdout.splitlines() if "layout before store tags" in x]
        assert len(notes) == 1 and "1 checkpoint folder(s)" in notes[0], run.stdout
    # the ended trials removed their own checkpoints, and only those: the old folder is all that is left
    assert list(old.parent.rglob("progress")) == [old / "progress"]
