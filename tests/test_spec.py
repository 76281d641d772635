"""studies/spec.py through studies.run: the real study.yaml validates and defines complete studies; a bad
study.yaml, an unknown study, a bad command line or a missing data folder is one line on stderr, exit 2,
before anything runs."""

from __future__ import annotations

import os

import pytest

from tests.conftest import ROOT, run_cli, write_study

pytestmark = pytest.mark.usefixtures("study_runs")  # run_cli starts studies.run from tmp_path


def one_line_error(capsys, argv, cwd) -> str:
    from studies.run import main

    old = os.getcwd()
    os.chdir(cwd)
    try:
        rc = main(argv)
    finally:
        os.chdir(old)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_real_study_yaml_validates_and_grids_are_complete():
    from studies.plan import make_plan
    from studies.spec import load_spec

    spec = load_spec(ROOT / "study.yaml")
    for name in (
        "ablation_tasks",
        "ablation_affinity",
        "ablation_stages",
        "ablation_saliency",
        "tune_loss_weights",
        "tune_label_thresholds",
    ):
        plan = make_plan(spec, name, preset="smoke")
        s = plan.study
        if s.kind == "ablation":
            assert len(s.seeds) >= 3
            keys = [p.key for p in plan.points]
            assert len(keys) == len(set(keys)) == len(s.rows) * max(1, len(s.variants)) * len(s.seeds)
            assert s.baseline in [r.label for r in s.rows]
        else:
            assert plan.search_space()
    from core.data.saliency import SALIENCY_SOURCES

    assert {r.label for r in spec.study("ablation_saliency").rows} == set(SALIENCY_SOURCES)


@pytest.mark.parametrize(
    "case,edit,expect",
    [
        ("malformed", lambda t: t.replace("kind: ablation", "kind: [ablation"), "malformed YAML"),
        (
            "unknown_key",
            lambda t: t.replace("    description: test grid", "    descriptoin: test grid"),
            "unknown key 'descriptoin'",
        ),
        (
            "unknown_config_key",
            lambda t: t.replace("{label: full, set: {}}", "{label: full, set: {model.affinty: seg}}"),
            "unknown config key 'model.affinty'",
        ),
        (
            "bad_value",
            lambda t: t.replace("{label: full, set: {}}", "{label: full, set: {model.affinity: bogus}}"),
            "model.affinity",
        ),
        (
            "low_ge_high",
            lambda t: t.replace("low: 0.1, high: 10.0", "low: 10.0, high: 0.1"),
            "must be < high",
        ),
        (
            "log_low_le_0",
            lambda t: t.replace("low: 0.1, high: 10.0", "low: 0.0, high: 10.0"),
            "log scale needs low > 0",
        ),
    ],
)
def test_bad_study_yaml_is_one_line_exit_2(tmp_path, capsys, case, edit, expect):
    y, _ = write_study(tmp_path)
    text = y.read_text()
    y.write_text(edit(text))
    name = "t" if "low" in case else "g"
    err = one_line_error(capsys, [name, "--study-file", str(y)], tmp_path)
    assert expect in err
    assert err.startswith(f"{y}:") and err.split(":")[1].isdigit(), f"no line number: {err}"
    # the line number points at the offending line
    line = int(err.split(":")[1])
    if case == "malformed":  # YAML notices an unclosed bracket on the next line; the message names both
        assert "at line 7" in err
        line = 7
    bad = y.read_text().splitlines()[line - 1]
    assert any(w in bad for w in ("kind", "descriptoin", "affinty", "bogus", "low", "10.0")), (line, bad)
    assert not (tmp_path / "studies.db").exists(), "nothing may run on a bad study file"


def test_unknown_study_and_bad_cli(tmp_path, capsys):
    y, _ = write_study(tmp_path)
    err = one_line_error(capsys, ["nope", "--study-file", str(y)], tmp_path)
    assert "unknown study 'nope'" in err and "g, t" in err
    err = one_line_error(capsys, ["g", "--study-file", str(y), "--set", "train.stagez=2"], tmp_path)
    assert "--set" in err and "train.stagez" in err
    err = one_line_error(capsys, ["g", "--study-file", str(y), "--bogus-flag"], tmp_path)
    assert "unrecognized arguments" in err
    # as a real subprocess: one line on stderr, exit 2, no traceback
    p = run_cli(["nope", "--study-file", str(y)], tmp_path)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "Traceback" not in p.stderr


def test_paper_preset_on_a_missing_voc_folder_is_one_line_before_any_trial(tmp_path, capsys):
    from studies.run import main

    y, _ = write_study(tmp_path)
    voc = [
        "--preset",
        "paper",
        "--set",
        f"data.root={tmp_path / 'novoc'}",
        "data.saliency=sr",
        "model.init_weights=none",
    ]
    # the paper preset needs data.root from --set: the plan must judge them together
    assert main(["g", "--study-file", str(y), *voc, "--dry-run"]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, ["g", "--study-file", str(y), *voc], tmp_path)
    assert "novoc" in err and "not found" in err
    assert not (tmp_path / "studies.db").exists(), "nothing may run on a missing data folder"
    err = one_line_error(capsys, ["g", "--study-file", str(y), "--preset", "paper", "--dry-run"], tmp_path)
    assert err.startswith("--preset:") and "data.root" in err
