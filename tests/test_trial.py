"""End-to-end trials on the smoke preset through the public interface (run_trial and the CLI)."""

import json
import os
import shutil

import pytest
import torch

from core.cache import atomic_dir
from core.config import ConfigError, make_config
from core.data import VOCDataset, ensure_generated
from core.init_weights import FORMAT
from core.metrics import all_background_miou
from core.model import Classifier, ResNet38, load_backbone
from core.records import Status
from core.trial import run_trial
from tests.conftest import TINY, VOC, run_module


def _metrics(res):
    d = res.to_dict()
    return d["initial_pgt"], [(s["val"], s["pgt"]) for s in d["stages"]], d["final"]


@pytest.mark.slow
def test_full_smoke_trial(runs, tmp_path):
    """Warm-up, >= 2 stages with label updates (CRF in a 2-process pool), post-processed evaluation."""
    reports, curve = [], []
    cfg = make_config("smoke", ["train.workers=2"])
    res = run_trial(
        cfg,
        report=lambda s, m: reports.append((s, m)),
        on_epoch=lambda e, v: curve.append((e, v)),
        artifacts_dir=tmp_path,
    )
    d = res.to_dict()
    assert d["status"] == Status.COMPLETE, d["error"]
    assert d["warmup"]["cached"] is False
    assert len(d["stages"]) == 2 and [s for s, _ in reports] == [0, 1]
    for st in d["stages"]:
        for v in (st["val"]["miou"], st["pgt"]["precision"], st["pgt"]["recall"], st["pgt"]["miou"]):
            assert 0.0 <= v <= 1.0
        assert len(st["val"]["per_class_iou"]) == 21
    assert d["stages"][0]["val"]["miou_post"] is None  # post-processing runs after the last stage only
    assert 0.0 <= d["final"]["miou_post"] <= 1.0
    assert d["final"]["miou"] == d["stages"][-1]["val"]["miou"]
    assert d["config"]["model"]["affinity"] == "cross_task"
    assert d["dataset"]["n_train"] > 0 and d["dataset"]["num_classes"] == 21
    assert {"warmup", "initial_labels", "train", "eval", "label_update"} <= set(d["timings"])
    # Learning curve: every epoch on the curve subset, stage ends included (which also go on all of val).
    e = cfg.train.stage_epochs
    assert [x for x, _ in curve] == [s * e + k for s in range(2) for k in range(e)]
    assert [st["epoch"] for st in d["stages"]] == [e - 1, 2 * e - 1]
    assert [(p["epoch"], p["miou"]) for st in d["stages"] for p in st["curve"]] == curve
    assert all(0.0 <= v <= 1.0 for _, v in curve)
    # The gallery: 8 fixed val images x 6 panels, in the folder the runner named.
    from PIL import Image

    assert d["artifacts"] == {"gallery": str(tmp_path / "gallery.png")}
    w, h = Image.open(tmp_path / "gallery.png").size
    assert w >= 6 * 100 and h >= 8 * 100, (w, h)
    # The smoke preset must learn something, so that a regression in learning fails the tests. The margin
    # sits 2.3 points below the worst of 60 measured draws (bench.bench_smoke: seeds 0-9 x fp32 / AVX2 fp32 /
    # oneDNN-AVX2 fp32 x 1 / 2 threads, all >= all-background + 6.3 points; README "Test suite"), so another
    # CPU's rounding does not fail it, while a collapse to all-background (+0) or a barely learning trial
    # (+2.4: seed 1 on the oneDNN-AVX2 path with 4 warm-up epochs, issue #38) does.
    val = VOCDataset(d["dataset"]["root"], "val")
    floor = all_background_miou([val.mask(i) for i in range(len(val))], 21)
    assert d["final"]["miou"] >= floor + 0.04, (d["final"]["miou"], floor)
    assert d["environment"]["threads"] >= 1 and d["environment"]["torch"] == torch.__version__


@pytest.mark.slow
def test_same_seed_same_metrics_and_cache_reuse(runs):
    a = run_trial(make_config("smoke", TINY + ["seed=3", "train.stage_epochs=2"]))
    b = run_trial(make_config("smoke", TINY + ["seed=3", "train.stage_epochs=2", "eval.curve_images=0"]))
    assert a.warmup["cached"] is False and b.warmup["cached"] is True
    assert _metrics(a) == _metrics(b)  # the learning curve's evaluations never change training
    assert a.stages[0]["curve"] and not b.stages[0]["curve"]
    c = run_trial(make_config("smoke", TINY + ["seed=3", "loss.sal=0.3", "loss.cls=2"]))
    assert c.warmup["cached"] is True  # loss weights do not touch the warm-up
    d = run_trial(make_config("smoke", TINY + ["seed=4"]))
    assert d.warmup["cached"] is False
    if (os.cpu_count() or 1) > 1:  # another thread count gives other floats: never served a warm-up
        e = run_trial(make_config("smoke", TINY + ["seed=3", "train.threads=1"]))
        assert e.warmup["cached"] is False and e.environment["threads"] == 1


@pytest.mark.slow
def test_warmup_seed_shares_one_cam_network_across_seeds(runs):
    """train.warmup_seed: every trial seed starts from the one warm-up of that seed (one cache entry, the same
    initial pseudo labels); empty keeps a warm-up per seed."""

    def entries() -> set[str]:
        return {p.name for p in (runs / "cache").iterdir() if not p.name.startswith(".")}

    def run(seed: int, *shared: str):
        return run_trial(make_config("smoke", TINY + [f"seed={seed}", *shared]))

    before = entries() if (runs / "cache").is_dir() else set()
    a, b = run(6, "train.warmup_seed=6"), run(7, "train.warmup_seed=6")
    assert (a.warmup["cached"], b.warmup["cached"]) == (False, True)
    assert len(entries() - before) == 1
    assert a.initial_pgt == b.initial_pgt
    assert a.stages[0]["losses"] != b.stages[0]["losses"]  # the trial seed still draws the stage training
    own, same = run(7), run(6)  # per seed, as before: seed 7 its own CAM network, seed 6 the one shared above
    assert (own.warmup["cached"], same.warmup["cached"]) == (False, True)
    assert len(entries() - before) == 2
    assert own.initial_pgt != b.initial_pgt and _metrics(same) == _metrics(a)
    with pytest.raises(ConfigError, match="train.warmup_seed must be empty .* got first"):
        make_config("smoke", ["train.warmup_seed=first"])


@pytest.mark.slow
def test_changed_data_at_the_same_path_is_not_served_from_the_cache(runs, tmp_path):
    src = runs / "data" / "synthetic-smoke-seed0"
    ensure_generated(src, preset="smoke", seed=0)
    root = tmp_path / "mydata"
    shutil.copytree(src, root)
    cfg = make_config("smoke", TINY + ["seed=5", f"data.root={root}"])
    assert run_trial(cfg).warmup["cached"] is False
    assert run_trial(cfg).warmup["cached"] is True
    imgs = sorted((root / "JPEGImages").glob("train_*.jpg"))
    shutil.copyfile(imgs[1], imgs[0])  # same names, same config, different pixels
    assert run_trial(cfg).warmup["cached"] is False


@pytest.mark.slow
def test_nan_loss_fails_the_trial_with_a_reason(runs):
    res = run_trial(make_config("smoke", TINY + ["train.lr=1e30"]))
    assert res.status == Status.FAILED
    assert "non-finite loss" in res.error and res.final is None


@pytest.mark.slow
def test_report_exception_propagates(runs):
    class Prune(Exception):
        pass

    def report(stage, metrics):
        raise Prune

    with pytest.raises(Prune):
        run_trial(make_config("smoke", TINY), report=report)


@pytest.mark.slow
def test_cli_writes_result_json_and_rejects_bad_keys(runs, tmp_path):
    env = dict(os.environ, AUXSEG_RUNS=str(runs))
    out = tmp_path / "one"
    args = ["--preset", "smoke", "--set", *TINY, "model.affinity=seg", "model.constraints=seg"]
    p = run_module("core.trial", [*args, "--out", str(out)], env=env)
    assert p.returncode == 0, p.stderr
    d = json.loads((out / "result.json").read_text())
    assert d["config"]["model"]["affinity"] == "seg" and d["status"] == Status.COMPLETE
    args = ["--preset", "smoke", "--set", "model.bogus=1", "--out", str(tmp_path / "bad")]
    bad = run_module("core.trial", args, env=env)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "model.bogus" in bad.stderr
    assert not (tmp_path / "bad" / "result.json").exists()


def test_atomic_cache_never_trusts_a_half_written_entry(tmp_path):
    final = tmp_path / "entry"

    def crash(tmp):
        (tmp / "half.pt").write_text("partial")
        raise KeyboardInterrupt  # a killed run

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(final, crash)
    assert not final.exists() and not any(
        p.name.startswith(".entry.") and p.is_dir() for p in tmp_path.iterdir()
    )
    assert atomic_dir(final, lambda tmp: (tmp / "ok").write_text("1")) is False
    assert atomic_dir(final, lambda tmp: 1 / 0) is True  # a hit never recomputes
    assert (final / "ok").read_text() == "1"


def test_missing_voc_folder_is_one_line_error(tmp_path):
    voc = ["data.name=voc", f"data.root={tmp_path / 'nope'}", "data.saliency=sr"]
    p = run_module("core.trial", ["--preset", "smoke", "--set", *voc, "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "nope" in p.stderr and p.stderr.strip().count("\n") == 0


def test_paper_preset_is_a_valid_config_and_reaches_the_data_check(tmp_path):
    # the README's VOC route: the paper's 321 crop (41x41 maps) must pass validation
    voc = [*VOC, "model.init_weights=none"]
    assert make_config("paper", voc).train.crop == 321
    with pytest.raises(ConfigError, match="train.crop"):
        make_config("paper", [*voc, "train.crop=4"])
    novoc = ["data.saliency=sr", f"data.root={tmp_path / 'novoc'}", "model.init_weights=none"]
    p = run_module("core.trial", ["--preset", "paper", "--set", *novoc, "--out", str(tmp_path / "o")])
    assert p.returncode == 2 and "novoc" in p.stderr and p.stderr.strip().count("\n") == 0


@pytest.mark.slow
def test_init_weights_errors_are_one_line(runs, tmp_path):
    env = dict(os.environ, AUXSEG_RUNS=str(runs))
    empty = tmp_path / "w.pth"
    empty.write_bytes(b"")
    wide = tmp_path / "wide.pt"  # a core.pretrain checkpoint of another width than the smoke preset's
    torch.save({"state_dict": ResNet38(0.125).state_dict(), "meta": {"format": FORMAT, "width": 0.125}}, wide)
    cases = (
        (tmp_path / "missing.pth", ["missing.pth"]),
        (empty, ["w.pth", "cannot read"]),
        (wide, ["wide.pt", "pretrained at width 0.125", "python -m core.pretrain --width 0.0625"]),
    )
    for value, needles in cases:
        args = ["--preset", "smoke", "--set", *TINY, f"model.init_weights={value}"]
        p = run_module("core.trial", [*args, "--out", str(tmp_path / "o")], env=env)
        assert p.returncode == 2, p.stderr
        assert all(n in p.stderr for n in needles), p.stderr
        assert p.stderr.strip().count("\n") == 0


def test_pretrained_checkpoint_errors_name_the_rebuild_command(tmp_path, monkeypatch):
    from core import init_weights

    monkeypatch.setattr(init_weights, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(
        init_weights.PretrainedError,
        match=r"no pretrained checkpoint .*resnet38_synthetic_w0\.0625\.pt; "
        r"rebuild it with: python -m core\.pretrain --width 0\.0625 --size 64 --out ",
    ):
        init_weights.check_init_weights("synthetic", 0.0625)
    init_weights.pretrained_path(0.0625).write_bytes(b"not a checkpoint")  # a corrupt file
    with pytest.raises(
        init_weights.PretrainedError, match=r"cannot read .*; rebuild it with: python -m core\.pretrain"
    ):
        init_weights.check_init_weights("synthetic", 0.0625)
    sd = ResNet38(0.0625).state_dict()
    sd.pop("b3.conv_branch1.weight")  # a truncated but readable checkpoint
    torch.save(
        {"state_dict": sd, "meta": {"format": init_weights.FORMAT, "width": 0.0625, "size": 64}},
        init_weights.pretrained_path(0.0625),
    )
    with pytest.raises(
        init_weights.PretrainedError, match=r"missing backbone tensor 'b3\.conv_branch1\.weight'.*rebuild"
    ):
        init_weights.check_init_weights("synthetic", 0.0625)
    assert init_weights.check_init_weights("", 0.0625) is None


@pytest.mark.slow
def test_pretrain_cli_writes_a_loadable_backbone(tmp_path):
    out = tmp_path / "bb.pt"
    args = ["--width", "0.0625", "--size", "32", "--images", "32", "--epochs", "1", "--out", str(out)]
    p = run_module("core.pretrain", args)
    assert p.returncode == 0, p.stderr
    assert "sha256" in p.stdout and out.is_file()
    from core.init_weights import check_init_weights, read_meta

    meta = read_meta(out)
    assert (
        meta["width"] == 0.0625 and meta["classes"] == 21 and meta["cues"] == "pairs" and meta["images"] == 32
    )
    assert check_init_weights(str(out), 0.0625) == out
    clf = Classifier(num_classes=21, width=0.0625)
    load_backbone(str(out), into=clf)
    saved = torch.load(out, weights_only=True)["state_dict"]
    torch.testing.assert_close(clf.backbone.b7.conv_branch2b2.weight, saved["b7.conv_branch2b2.weight"])
