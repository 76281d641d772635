"""The complete AuxSegNet pipeline as one callable trial.

    result = run_trial(make_config("smoke"), report=lambda stage, metrics: ...)
    python -m core.trial --preset smoke --set model.affinity=seg --out runs/one

warm-up (cached) -> CAMs -> initial pseudo labels -> for each stage: train, evaluate, report, update labels.
`report(stage, metrics)` may raise (a scheduler pruning the trial): the exception propagates unchanged
after the worker pool is shut down. A NaN/inf loss returns a failed TrialResult with the reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from concurrent.futures import Executor
from pathlib import Path
from typing import Callable, cast

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core import checkpoint
from core.cache import atomic_dir, writable_dir
from core.config import Config, ConfigError, make_config, parse_overrides
from core.data import DEFAULT_SALIENCY, DataError, VOCDataset, ensure_generated, normalize
from core.evaluate import evaluate
from core.gallery import GalleryRow, render_gallery
from core.labels import update_labels_one
from core.metrics import pgt_summary
from core.model import AuxSegNet, Classifier, load_backbone, refine_with_affinity
from core.parallel import bounded_map, make_pool
from core.pretrain import check_init_weights, resolve_init_weights, weights_fingerprint
from core.records import (
    CurvePoint,
    DatasetRecord,
    EnvironmentRecord,
    FinalMetrics,
    PgtMetrics,
    StageRecord,
    TrialRecord,
    WarmupRecord,
)
from core.train import (
    NonFiniteLoss,
    autocast,
    bf16_active,
    check_amp,
    resolve_device,
    to_device,
    train_stage,
    train_warmup,
)

# Bump when the warm-up or CAM code changes, so old cache entries are not reused.
CACHE_VERSION = 3
# Exactly the fields the warm-up checkpoint and the initial CAMs depend on (not saliency, loss, affinity).
WARMUP_KEYS = [
    "seed",
    "data.name",
    "data.root",
    "data.preset",
    "data.seed",
    "data.train_split",
    "data.num_classes",
    "model.width",
    "model.init_weights",
    "model.dropout",
    "model.block_dropout",
    "train.warmup_epochs",
    "train.warmup_lr",
    "train.optimizer",
    "train.batch_size",
    "train.crop",
    "train.scale_min",
    "train.scale_max",
    "train.momentum",
    "train.weight_decay",
    "train.poly_power",
    "train.warmup_head_lr_mult",
    "model.freeze_bn",
    "train.amp",
    "train.cpu_amp",
    "train.fused_adam",
]


def warmup_keys(cfg: Config, device: torch.device) -> list[str]:
    """The config fields the warm-up and initial CAMs depend on for this config (train.amp only on a GPU)."""
    return WARMUP_KEYS + (["train.amp"] if device.type == "cuda" else [])


Report = Callable[[int, StageRecord], None]
EpochReport = Callable[[int, float], None]  # (global epoch, val mIoU on the curve subset)


def curve_indices(n_val: int, k: int) -> list[int]:
    """The fixed learning-curve subset: k val images evenly spaced over the split (all if k >= n_val)."""
    if k <= 0 or n_val == 0:
        return []
    return sorted(set(np.linspace(0, n_val - 1, min(k, n_val)).round().astype(int).tolist()))


@dataclasses.dataclass
class TrialResult:
    status: str  # complete | failed
    error: str | None
    config: dict
    initial_pgt: PgtMetrics | None = None
    stages: list[StageRecord] = dataclasses.field(default_factory=list)
    final: FinalMetrics | None = None
    warmup: WarmupRecord | None = None
    seconds: float = 0.0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    dataset: DatasetRecord | None = None
    environment: EnvironmentRecord | None = None
    artifacts: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> file (the gallery)
    # Where a killed run of this trial was resumed: [{stage, epoch}], epoch = the stage's epochs done then.
    resumed_from: list[dict] = dataclasses.field(default_factory=list)
    checkpoint: dict = dataclasses.field(default_factory=dict)  # {bytes: last.pt's size, writes}

    def to_dict(self) -> TrialRecord:
        """The result.json record (see core.records)."""
        return cast(TrialRecord, dataclasses.asdict(self))


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def environment(device: torch.device, cfg: Config | None = None) -> EnvironmentRecord:
    """What a result's numbers depend on beyond config and seed: bit-identical results need the same
    torch build, CPU (or GPU) kernels, intra-op thread count and precision (bf16 autocast or fp32)."""
    env: EnvironmentRecord = {
        "precision": "bf16" if cfg is not None and bf16_active(cfg, device) else "fp32",
        "torch": str(torch.__version__),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": device.type,
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    return env


def numerics_fingerprint(device: torch.device, cfg: Config) -> str:
    """Cache-key part for what makes float results differ at equal config and seed: a warm-up trained with
    other kernels or another thread count would make a trial differ from the same trial run cold."""
    env = environment(device, cfg)  # precision: train.cpu_amp=auto is bf16 on one CPU and fp32 on another
    parts = [env["torch"], env["device"], env["gpu"] or env["cpu_capability"], str(env["threads"])]
    parts.append(env["precision"])
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:8]


def runs_dir() -> Path:
    return Path(os.environ.get("AUXSEG_RUNS", "runs"))


def resolve_data_root(cfg: Config) -> Path:
    """The user's folder, or the embedded benchmark generated once under runs/data/."""
    if cfg.data.name == "voc":
        return Path(cfg.data.root)
    if cfg.data.root:
        return Path(cfg.data.root)
    root = runs_dir() / "data" / f"synthetic-{cfg.data.preset}-seed{cfg.data.seed}"
    ensure_generated(root, preset=cfg.data.preset, seed=cfg.data.seed)
    return root


def load_data(cfg: Config, validate: bool = True) -> tuple[VOCDataset, VOCDataset]:
    """Train and val splits; ``validate=False`` checks only the layout, split lists and saliency source
    (no image is read), which is what a scheduler checks before it starts any trial."""
    root = resolve_data_root(cfg)
    sal = cfg.data.saliency or (DEFAULT_SALIENCY if cfg.data.name == "synthetic" else "")
    if not sal:
        raise ConfigError("data.saliency must name a saliency folder (or built-in source) for data.name=voc")
    nc = cfg.data.num_classes or None
    train = VOCDataset(root, cfg.data.train_split, saliency=sal, num_classes=nc)
    val = VOCDataset(root, cfg.data.val_split, saliency=None, num_classes=train.num_classes)
    if validate:
        train.validate()
        val.validate()
    return train, val


def build_classifier(cfg: Config, num_classes: int) -> Classifier:
    """The warm-up classifier the config describes (the one place that maps model.* to it)."""
    m = cfg.model
    return Classifier(
        num_classes=num_classes,
        width=m.width,
        dropout=m.dropout,
        block_dropout=m.block_dropout,
        freeze_bn=m.freeze_bn,
    )


def build_net(cfg: Config, num_classes: int) -> AuxSegNet:
    """The AuxSegNet the config describes (the one place that maps model.* to its constructor)."""
    m = cfg.model
    return AuxSegNet(
        num_classes=num_classes,
        width=m.width,
        branches=m.branches,
        affinity=m.affinity,
        constraints=m.constraints,
        dropout=m.dropout,
        block_dropout=m.block_dropout,
        dilations=m.dilations,
        head_channels=m.head_channels,
        freeze_bn=m.freeze_bn,
        nonlocal_zero_init=m.nonlocal_zero_init,
        nonlocal_tied_init=m.nonlocal_tied_init,
        affinity_row_norm=m.affinity_row_norm,
        head_streams=m.head_streams,
    )


def _cam_at(cam: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> np.ndarray:
    """(C-1, h, w) ReLU CAM -> normalised per class by its spatial max (if asked), upsampled to the image."""
    if normalize:
        cam = cam / cam.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
    return F.interpolate(cam[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


@torch.no_grad()
def compute_cams(clf, ds: VOCDataset, device: torch.device) -> list[torch.Tensor]:
    """Raw ReLU CAMs at feature resolution for every training image (full image, one scale)."""
    clf.eval()
    out = []
    for i in tqdm(range(len(ds)), desc="CAMs", leave=False, disable=None):
        x = torch.from_numpy(normalize(ds.image(i)))[None].to(device)
        out.append(clf.cams(x)[0].float().cpu())
    return out


def warmup_and_cams(cfg: Config, ds: VOCDataset, device: torch.device) -> tuple[dict, list, bool, float]:
    """Classification warm-up and initial CAMs, from runs/cache/<key>/ when another trial made them."""
    # The data set's own fingerprint joins the config fields: the same data.root can hold new data.
    # So do the initial weights' file stats: a rebuilt checkpoint at the same path is a new warm-up.
    weights = resolve_init_weights(cfg.model.init_weights, cfg.model.width)
    keys = warmup_keys(cfg, device)
    key = (
        f"v{CACHE_VERSION}-{cfg.fingerprint(keys)}-{ds.fingerprint()}-{weights_fingerprint(weights)}"
        f"-{numerics_fingerprint(device, cfg)}"
    )
    folder = runs_dir() / "cache" / key
    t0 = time.time()

    def fill(tmp: Path) -> None:
        torch.manual_seed(cfg.seed)
        clf = build_classifier(cfg, ds.num_classes)
        if weights is not None:
            load_backbone(weights, into=clf)
        clf = to_device(clf, cfg, device)
        train_warmup(clf, ds, cfg, device, np.random.default_rng([cfg.seed, 0]))
        torch.save({k: v.cpu() for k, v in clf.state_dict().items()}, tmp / "classifier.pt")
        torch.save(compute_cams(clf, ds, device), tmp / "cams.pt")
        (tmp / "meta.json").write_text(
            json.dumps(
                {"key_fields": {k: cfg.get(k) for k in keys}, "seconds": time.time() - t0}, default=list
            )
        )

    hit = atomic_dir(folder, fill)
    state = torch.load(folder / "classifier.pt", weights_only=True)
    cams = torch.load(folder / "cams.pt", weights_only=True)
    seconds = json.loads((folder / "meta.json").read_text())["seconds"] if hit else time.time() - t0
    return state, cams, hit, seconds


def label_jobs(
    ds: VOCDataset,
    cams: Callable[[int], np.ndarray],
    cfg: Config,
    pred_sal: Callable[[int], np.ndarray | None],
):
    for i in range(len(ds)):
        yield {
            "img": ds.image(i),
            "cam": cams(i),
            "labels": ds.labels(i),
            "pt_sal": ds.saliency(i),
            "pred_sal": pred_sal(i),
            "gt": ds.mask(i),
            "num_classes": ds.num_classes,
            "cam_threshold": cfg.labels.cam_threshold,
            "sal_threshold": cfg.labels.sal_threshold,
            "sal_crf": cfg.labels.sal_crf,
            "sal_binarize": cfg.labels.sal_binarize,
        }


def make_labels(
    ds: VOCDataset,
    cfg: Config,
    cams: Callable[[int], np.ndarray],
    pred_sal: Callable[[int], np.ndarray | None],
    pool: Executor | None,
    desc: str,
) -> tuple[list[np.ndarray], list[np.ndarray], PgtMetrics]:
    """Run the per-image label update over the pool; returns seg labels, saliency targets, pgt metrics."""
    segs, targets = [], []
    conf = None
    jobs = label_jobs(ds, cams, cfg, pred_sal)
    for res in tqdm(
        bounded_map(pool, update_labels_one, jobs), total=len(ds), desc=desc, leave=False, disable=None
    ):
        segs.append(res["seg"])
        targets.append(res["sal_target"])
        conf = res["conf"] if conf is None else conf + res["conf"]
    return segs, targets, pgt_summary(conf)


@torch.no_grad()
def network_cues(
    net: AuxSegNet, ds: VOCDataset, warm_cams: list[torch.Tensor], cfg: Config, device: torch.device
):
    """Per image: the CAM refined by the learned affinity (Eq. 6-7 applied to CAMs) and the refined saliency.

    CAMs come from this stage's cls branch when it exists, else from the warm-up classifier; they are
    max-normalised before the affinity product and, with labels.refined_cam_renorm, again after it (the
    authors' code only before). Without an affinity the CAM is normalised once. Both cues
    are kept at feature resolution and returned as per-image callables that upsample on demand, so a
    VOC-sized train set never holds full-resolution maps for every image at once.
    """
    net.eval()
    has_cls = "cls" in cfg.model.branches
    cams: list[torch.Tensor] = []
    sal_logits: list[torch.Tensor | None] = []
    refined = False
    for i in tqdm(range(len(ds)), desc="cues", leave=False, disable=None):
        x = torch.from_numpy(normalize(ds.image(i)))[None].to(device)
        with autocast(cfg, device):
            out = net(x)
        cam = out["cam"][0].float() if has_cls else warm_cams[i].to(device)
        if "affinity" in out:
            cam = cam / cam.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
            cam = refine_with_affinity(cam[None], out["affinity"].float())[0]
            refined = True
        cams.append(cam.cpu())
        logit = out.get("sal_ref", out.get("sal"))
        sal_logits.append(None if logit is None else logit.float().cpu())

    renorm = cfg.labels.refined_cam_renorm or not refined

    def cam_at(i: int) -> np.ndarray:
        # Averaging over affinities lowers the peaks; renorm puts them back at 1 before cam_threshold.
        return _cam_at(cams[i], ds.image(i).shape[:2], normalize=renorm)

    def sal_at(i: int) -> np.ndarray | None:
        if sal_logits[i] is None:
            return None
        up = F.interpolate(sal_logits[i], size=ds.image(i).shape[:2], mode="bilinear", align_corners=False)
        return torch.sigmoid(up)[0, 0].numpy()

    return cam_at, sal_at


class _View:
    """The images `idx` of a data set, indexed 0..len-1 (what label_jobs / network_cues read)."""

    def __init__(self, ds: VOCDataset, idx: list[int]):
        self.ds, self.idx, self.num_classes = ds, idx, ds.num_classes

    def __len__(self) -> int:
        return len(self.idx)

    def image(self, j: int) -> np.ndarray:
        return self.ds.image(self.idx[j])

    def mask(self, j: int) -> np.ndarray:
        return self.ds.mask(self.idx[j])

    def labels(self, j: int) -> np.ndarray:
        return self.ds.labels(self.idx[j])

    def saliency(self, j: int) -> np.ndarray:
        return self.ds.saliency(self.idx[j])


@torch.no_grad()
def gallery_rows(
    cfg: Config, net: AuxSegNet, clf: Classifier, val: VOCDataset, device: torch.device
) -> list[GalleryRow]:
    """core.gallery's rows for the fixed val subset (eval.gallery_images, evenly spaced)."""
    from core.evaluate import predict_probs

    root, sal = resolve_data_root(cfg), cfg.data.saliency or DEFAULT_SALIENCY
    try:  # the val split's saliency maps, where the data set has them (the benchmark does)
        val_sal = VOCDataset(root, cfg.data.val_split, saliency=sal, num_classes=val.num_classes)
    except DataError:
        val_sal = val
    view = _View(val_sal, curve_indices(len(val), cfg.eval.gallery_images))
    warm = compute_cams(clf.to(device), view, device)  # type: ignore[arg-type]
    cams, pred_sal = network_cues(net, view, warm, cfg, device)  # type: ignore[arg-type]
    rows: list[GalleryRow] = []
    for j in range(len(view)):
        img, labels = view.image(j), view.labels(j)
        cam = _cam_at(warm[j], img.shape[:2])
        present = np.flatnonzero(labels)
        initial = last = None
        try:
            pt_sal = view.saliency(j)
            common = {
                "img": img,
                "labels": labels,
                "pt_sal": pt_sal,
                "gt": None,
                "num_classes": val.num_classes,
                "cam_threshold": cfg.labels.cam_threshold,
                "sal_threshold": cfg.labels.sal_threshold,
                "sal_crf": cfg.labels.sal_crf,
                "sal_binarize": cfg.labels.sal_binarize,
            }
            initial = update_labels_one({**common, "cam": cam, "pred_sal": None})["seg"]
            last = update_labels_one({**common, "cam": cams(j), "pred_sal": pred_sal(j)})["seg"]
        except DataError:
            pass
        rows.append(
            {
                "name": Path(str(val.image_path(view.idx[j]))).stem,
                "image": img,
                "gt": view.mask(j),
                "cam": cam[present].max(0) if len(present) else np.zeros(img.shape[:2], np.float32),
                "initial": initial,
                "last": last,
                "pred": predict_probs(net, img, device, refined=cfg.eval.refined).argmax(0).astype(np.uint8),
            }
        )
    return rows


def _aside(timings: dict[str, float]) -> float:
    """Time spent inside a stage's training loop on other things than training (curve, checkpoints)."""
    return timings.get("curve", 0.0) + timings.get("checkpoint", 0.0)


def run_trial(
    cfg: Config,
    report: Report | None = None,
    on_epoch: EpochReport | None = None,
    artifacts_dir: str | Path | None = None,
    checkpoint_dir: str | Path | None = None,
) -> TrialResult:
    """One trial. report(stage, record) after each stage; on_epoch(global epoch, subset val mIoU) after
    every epoch when eval.curve_images > 0. Either may raise to stop the trial (pruning).
    artifacts_dir: where the image gallery (core.gallery) is written, if given.
    checkpoint_dir: where the trial checkpoints itself (train.checkpoint_every, core.checkpoint). When it
    holds a checkpoint of this config, the trial resumes from it with the same final numbers as an
    uninterrupted run (same machine and thread count), after replaying the report() and on_epoch() calls
    of what was done before, so that a caller sees the whole trial either way. The checkpoint is removed
    when the trial ends (complete or failed) unless train.keep_checkpoint."""
    t_start = time.time()
    timings: dict[str, float] = {}
    result = TrialResult(status="complete", error=None, config=cfg.to_dict())
    torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
    device = resolve_device(cfg)
    check_amp(cfg, device)
    result.environment = environment(device, cfg)
    check_init_weights(cfg.model.init_weights, cfg.model.width)
    if cfg.model.init_checkpoint and not Path(cfg.model.init_checkpoint).expanduser().is_file():
        raise FileNotFoundError(f"model.init_checkpoint: no such file {cfg.model.init_checkpoint!r}")
    ckpt_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    fingerprint = checkpoint.config_fingerprint(cfg)
    resumed = checkpoint.load(ckpt_dir, fingerprint) if ckpt_dir is not None else None

    t = time.time()
    ds, val = load_data(cfg)
    result.dataset = {
        "root": str(ds.root),
        "n_train": len(ds),
        "n_val": len(val),
        "num_classes": ds.num_classes,
        "saliency": str(ds.saliency_name),
        "class_names": list(ds.class_names),
    }
    timings["data"] = time.time() - t
    if cfg.model.init_weights == "none":
        print(
            f"warning: model.init_weights=none: the width-{cfg.model.width:g} backbone starts from random "
            f"weights (the paper fine-tunes ImageNet ones)",
            file=sys.stderr,
        )

    pool = make_pool(cfg.train.workers)
    try:
        t = time.time()
        clf_state, warm_cams, hit, warm_secs = warmup_and_cams(cfg, ds, device)
        result.warmup = {"cached": hit, "seconds": warm_secs}
        timings["warmup"] = time.time() - t

        if resumed is None:
            t = time.time()
            segs, sal_targets, pgt = make_labels(
                ds,
                cfg,
                lambda i: _cam_at(warm_cams[i], ds.image(i).shape[:2]),
                lambda i: None,
                pool,
                "initial labels",
            )
            result.initial_pgt = pgt
            timings["initial_labels"] = time.time() - t
            first_stage, curve_done, stage_secs = 0, [], 0.0
        else:
            done = json.loads(resumed["trial"])
            result.initial_pgt, result.stages, result.warmup = (
                done["initial_pgt"],
                done["stages"],
                done["warmup"],
            )
            for k, v in done["timings"].items():  # this run's data / warm-up time on top of the first's
                timings[k] = timings.get(k, 0.0) + v
            t_start -= done["seconds"]
            segs, sal_targets, pgt = resumed["segs"], resumed["sal_targets"], done["pgt"]
            first_stage, curve_done, stage_secs = resumed["stage"], done["curve"], done["stage_seconds"]
            epochs_done = 0 if resumed["train"] is None else resumed["train"]["epoch"] + 1
            result.resumed_from = done["resumed_from"] + [{"stage": first_stage, "epoch": epochs_done}]
            print(
                f"resuming from {ckpt_dir}: stage {first_stage} after {epochs_done} epoch(s)", file=sys.stderr
            )

        # Same stream of randomness for the stages whether the warm-up was computed or loaded.
        torch.manual_seed(cfg.seed + 1)
        rng = np.random.default_rng([cfg.seed, 1])
        net = build_net(cfg, ds.num_classes)
        clf = build_classifier(cfg, ds.num_classes)
        clf.load_state_dict(clf_state)
        net.load_from_classifier(clf)
        if cfg.model.init_checkpoint:  # a whole trained network (released or ours) replaces all of it
            net.load_official(Path(cfg.model.init_checkpoint).expanduser())
        if resumed is not None:
            net.load_state_dict(resumed["net"])
            checkpoint.set_rng_state(resumed["rng"], rng)
        net = to_device(net, cfg, device)

        def amp() -> contextlib.AbstractContextManager:
            return autocast(cfg, device)

        # What was done before the checkpoint, told again: the caller's record of the trial is whole.
        for rec in result.stages:
            for point in rec.get("curve", []):
                if on_epoch is not None:
                    on_epoch(point["epoch"], point["miou"])
            if report is not None:
                report(rec["stage"], rec)
        for point in curve_done:
            if on_epoch is not None:
                on_epoch(point["epoch"], point["miou"])

        every = cfg.train.checkpoint_every if ckpt_dir is not None else 0
        has_sal = "sal" in cfg.model.branches
        subset = curve_indices(len(val), cfg.eval.curve_images)
        epochs = cfg.train.stage_epochs
        for s in range(first_stage, cfg.train.stages):
            resuming = resumed is not None and s == first_stage
            t_stage = time.time() - (stage_secs if resuming else 0.0)
            t = time.time()
            curve: list[CurvePoint] = list(curve_done) if resuming else []
            aside_before = _aside(timings)

            def save(train_state: dict | None, s: int = s, curve: list[CurvePoint] = curve) -> None:
                now = time.time()
                snapshot = dict(timings)  # the stage's training so far counts as training
                snapshot["train"] = snapshot.get("train", 0.0) + now - t - (_aside(snapshot) - aside_before)
                state = {
                    "fingerprint": fingerprint,
                    "stage": s,
                    "train": train_state,
                    "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                    "rng": checkpoint.rng_state(rng),
                    "trial": json.dumps(
                        {
                            "initial_pgt": result.initial_pgt,
                            "stages": result.stages,
                            "warmup": result.warmup,
                            "timings": snapshot,
                            "seconds": now - t_start,
                            "resumed_from": result.resumed_from,
                            "pgt": pgt,
                            "curve": curve,
                            "stage_seconds": now - t_stage,
                            "environment": result.environment,
                        }
                    ),
                }
                assert ckpt_dir is not None
                took = checkpoint.save(ckpt_dir, state)
                if took is not None:
                    timings["checkpoint"] = timings.get("checkpoint", 0.0) + took
                    snapshot_bytes = (ckpt_dir / checkpoint.LAST).stat().st_size
                    result.checkpoint = {
                        "bytes": snapshot_bytes,
                        "writes": result.checkpoint.get("writes", 0) + 1,
                    }

            if every and not resuming:  # the stage's start: its labels, once
                t_ckpt = time.time()
                checkpoint.save_labels(ckpt_dir, s, segs, sal_targets if has_sal else None)  # type: ignore[arg-type]
                timings["checkpoint"] = timings.get("checkpoint", 0.0) + time.time() - t_ckpt
                save(None)

            def epoch_end(epoch: int, s: int = s, curve: list[CurvePoint] = curve) -> None:
                if not subset:  # every epoch, a stage's last included: one measurement, one curve
                    return
                t_curve = time.time()
                m = evaluate(net, val, cfg, device, False, None, amp, desc="curve", indices=subset)["miou"]
                timings["curve"] = timings.get("curve", 0.0) + time.time() - t_curve
                curve.append({"epoch": s * epochs + epoch, "miou": m})
                if on_epoch is not None:
                    on_epoch(s * epochs + epoch, m)

            def epoch_checkpoint(epoch: int, train_state: dict) -> None:
                if every and ((epoch + 1) % every == 0 or epoch == epochs - 1):
                    save(train_state)

            losses = train_stage(
                net,
                ds,
                segs,
                sal_targets if has_sal else None,
                cfg,
                device,
                rng,
                s,
                epoch_end,
                on_checkpoint=epoch_checkpoint,
                resume=resumed["train"] if resuming else None,  # type: ignore[index]
            )
            timings["train"] = timings.get("train", 0.0) + time.time() - t - (_aside(timings) - aside_before)
            t = time.time()
            last = s == cfg.train.stages - 1
            post = cfg.eval.post and (last or cfg.eval.post_every_stage)
            metrics = evaluate(net, val, cfg, device, post, pool, amp_ctx=amp, desc=f"eval {s}")
            timings["eval"] = timings.get("eval", 0.0) + time.time() - t
            record: StageRecord = {
                "stage": s,
                "val": metrics,
                "pgt": pgt,
                "seconds": time.time() - t_stage,
                "epoch": (s + 1) * epochs - 1,
                "curve": curve,
                "losses": losses,
            }
            result.stages.append(record)
            if report is not None:
                report(s, record)
            if not last:
                t = time.time()
                cams, pred_sal = network_cues(net, ds, warm_cams, cfg, device)
                segs, sal_targets, pgt = make_labels(ds, cfg, cams, pred_sal, pool, f"labels {s + 1}")
                timings["label_update"] = timings.get("label_update", 0.0) + time.time() - t
                result.stages[-1]["seconds"] = time.time() - t_stage
        result.final = {
            "miou": result.stages[-1]["val"]["miou"],
            "miou_post": result.stages[-1]["val"]["miou_post"],
        }
        if artifacts_dir is not None and cfg.eval.gallery_images > 0:
            t = time.time()
            try:  # a gallery is for looking at; it never fails the trial
                path = Path(artifacts_dir) / "gallery.png"
                title = f"seed {cfg.seed}: {'+'.join(cfg.model.branches)}, affinity {cfg.model.affinity}"
                rows = gallery_rows(cfg, net, clf, val, device)
                render_gallery(rows, list(val.class_names), path, title=title)
                result.artifacts = {"gallery": str(path)}
            except Exception as e:
                print(f"warning: gallery not written: {type(e).__name__}: {e}", file=sys.stderr)
            timings["gallery"] = time.time() - t
    except NonFiniteLoss as e:
        result.status, result.error = "failed", str(e)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if ckpt_dir is not None and not cfg.train.keep_checkpoint:  # ended: nothing left to resume
        checkpoint.remove(ckpt_dir)
    result.timings = timings
    result.seconds = time.time() - t_start
    return result


def summary(res: TrialResult) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    m = res.config["model"]
    lines = [
        f"trial {res.status}" + (f": {res.error}" if res.error else ""),
        f"model: branches={'+'.join(m['branches'])} affinity={m['affinity']} "
        f"constraints={'+'.join(m['constraints']) or '-'} width={m['width']}",
    ]
    if res.dataset:
        d = res.dataset
        lines.append(
            f"data: {d['root']} ({d['n_train']} train / {d['n_val']} val, {d['num_classes']} classes, "
            f"saliency {d['saliency']})"
        )
    if res.warmup:
        lines.append(
            f"warm-up: {'cache hit' if res.warmup['cached'] else 'trained'} ({res.warmup['seconds']:.1f}s)"
        )
    if res.initial_pgt:
        p = res.initial_pgt
        lines.append(
            f"initial pseudo labels: precision {pct(p['precision'])} recall {pct(p['recall'])} "
            f"mIoU {pct(p['miou'])}"
        )
    lines.append("stage  val mIoU  mIoU post  pgt P / R / mIoU  seconds")
    for st in res.stages:
        v, p = st["val"], st["pgt"]
        lines.append(
            f"{st['stage']:>5}  {pct(v['miou']):>8}  {pct(v['miou_post']):>9}  "
            f"{pct(p['precision'])} / {pct(p['recall'])} / {pct(p['miou'])}  {st['seconds']:7.1f}"
        )
    for r in res.resumed_from:
        lines.append(f"resumed in stage {r['stage']} after {r['epoch']} of its epochs")
    lines.append(
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()) + f"; total {res.seconds:.1f}s"
    )
    return "\n".join(lines)


def check_out(out: str) -> None:
    """--out: a folder (created if missing) this process can write; ConfigError (one line) otherwise."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder (for result.json and gallery.png)")
    try:
        writable_dir(p)
    except OSError as e:
        raise ConfigError(f"--out {out}: not a writable folder ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.trial", description="Run one complete AuxSegNet trial.")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE")
    ap.add_argument("--out", required=True, help="folder for result.json and gallery.png")
    args = ap.parse_args(argv)
    try:
        cfg = make_config(args.preset, parse_overrides([x for group in args.overrides for x in group]))
        check_out(args.out)  # before any training: a trial's result is never lost to a bad --out
        # The checkpoint lives beside result.json: rerunning the same command resumes a killed trial.
        res = run_trial(cfg, artifacts_dir=args.out, checkpoint_dir=Path(args.out) / "checkpoint")
    except (ConfigError, DataError, ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(res.to_dict(), indent=2))
    os.replace(tmp, out / "result.json")
    print(summary(res))
    print(f"wrote {out / 'result.json'}")
    return 0 if res.status == "complete" else 1


if __name__ == "__main__":
    sys.exit(main())
