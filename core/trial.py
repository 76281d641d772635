"""The complete AuxSegNet pipeline as one callable trial.

    result = run_trial(make_config("smoke"), report=lambda stage, metrics: ...)
    python -m core.trial --preset smoke --set model.affinity=seg --out runs/one

warm-up (cached) -> CAMs -> initial pseudo labels -> for each stage: train, evaluate, report, update labels.
`report(stage, metrics)` may raise (a scheduler pruning the trial): the exception propagates unchanged
after the worker pool is shut down. A NaN/inf loss returns a failed TrialResult with the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, cast

import numpy as np
import torch

from core import checkpoint
from core.build import build_classifier, build_net, curve_indices, load_data
from core.config import Config
from core.cues import cam_at, make_labels, network_cues
from core.environment import environment
from core.evaluate import evaluate
from core.gallery import gallery_rows, render_gallery
from core.init_weights import check_init_weights
from core.loader import BatchLoader, resolve_loader_workers
from core.parallel import make_pool
from core.records import (
    CurvePoint,
    DatasetRecord,
    EnvironmentRecord,
    FinalMetrics,
    PgtMetrics,
    StageRecord,
    Status,
    TrialRecord,
    WarmupRecord,
)
from core.train import (
    NonFiniteLoss,
    autocast,
    check_amp,
    resolve_device,
    to_device,
    train_stage,
)
from core.warmup import warmup_and_cams

Report = Callable[[int, StageRecord], None]
EpochReport = Callable[[int, float], None]  # (global epoch, val mIoU on the curve subset)


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


class Timings(dict[str, float]):
    """Seconds per part of a trial (result.timings): data, warmup, initial_labels, train, curve,
    checkpoint, eval, label_update, gallery."""

    def add(self, key: str, seconds: float) -> None:
        self[key] = self.get(key, 0.0) + seconds

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        t = time.time()
        yield
        self.add(key, time.time() - t)

    def aside(self) -> float:
        """Time spent inside a stage's training loop on other things than training (curve, checkpoints)."""
        return self.get("curve", 0.0) + self.get("checkpoint", 0.0)


@dataclasses.dataclass
class _Labels:
    """The pseudo labels a stage trains on, and where the stage loop starts (0, or a checkpoint's stage)."""

    segs: list
    sal_targets: list
    pgt: PgtMetrics
    first_stage: int = 0
    resumed: bool = False  # from a checkpoint: the first stage goes on from its train state and curve
    train_state: dict | None = None  # the checkpoint's optimiser, epoch and loader state (None: stage start)
    curve_done: list[CurvePoint] = dataclasses.field(default_factory=list)
    stage_seconds: float = 0.0


@dataclasses.dataclass
class _Stage:
    """One stage while it runs: its number, learning curve and clocks (time.time())."""

    s: int
    curve: list[CurvePoint]
    t_stage: float  # when the stage started (less a resumed stage's seconds before its checkpoint)
    t_train: float  # when this run's training of it started
    aside_before: float  # Timings.aside() then: curve and checkpoint time inside training is not training
    losses: dict = dataclasses.field(default_factory=dict)


class _Trial:
    """One trial's state between its steps (run_trial calls them in order)."""

    def __init__(
        self, cfg: Config, report: Report | None, on_epoch: EpochReport | None, ckpt_dir: Path | None
    ):
        self.t_start = time.time()
        self.cfg, self.report, self.on_epoch, self.ckpt_dir = cfg, report, on_epoch, ckpt_dir
        self.timings = Timings()
        self.result = TrialResult(status=Status.COMPLETE, error=None, config=cfg.to_dict())
        self.fingerprint = checkpoint.config_fingerprint(cfg)

    def prepare(self) -> dict | None:
        """Threads, device, the inputs' checks, the checkpoint to resume (if any) and the data."""
        cfg, result = self.cfg, self.result
        torch.set_num_threads(cfg.train.threads or os.cpu_count() or 1)
        self.device = resolve_device(cfg)
        check_amp(cfg, self.device)
        result.environment = environment(self.device, cfg)
        check_init_weights(cfg.model.init_weights, cfg.model.width)
        if cfg.model.init_checkpoint and not Path(cfg.model.init_checkpoint).expanduser().is_file():
            raise FileNotFoundError(f"model.init_checkpoint: no such file {cfg.model.init_checkpoint!r}")
        resumed = checkpoint.load(self.ckpt_dir, self.fingerprint) if self.ckpt_dir is not None else None
        with self.timings.timed("data"):
            self.ds, self.val = load_data(cfg)
            result.dataset = {
                "root": str(self.ds.root),
                "n_train": len(self.ds),
                "n_val": len(self.val),
                "num_classes": self.ds.num_classes,
                "saliency": str(self.ds.saliency_name),
                "class_names": list(self.ds.class_names),
            }
        if cfg.model.init_weights == "none":
            print(
                f"warning: model.init_weights=none: the width-{cfg.model.width:g} backbone starts from "
                f"random weights (the paper fine-tunes ImageNet ones)",
                file=sys.stderr,
            )
        self.pool = make_pool(cfg.train.workers)
        # started at the first training epoch (none when the warm-up is cached and no stage is left)
        self.loader = BatchLoader(resolve_loader_workers(cfg, self.device), self.device)
        return resumed

    def warm_up(self) -> None:
        with self.timings.timed("warmup"):
            self.clf_state, self.warm_cams, hit, secs = warmup_and_cams(
                self.cfg, self.ds, self.device, self.loader
            )
            self.result.warmup = {"cached": hit, "seconds": secs}

    def initial_labels(self) -> _Labels:
        """Stage 0's pseudo labels from the warm-up's CAMs (Eq. 1's fusion with the saliency maps)."""
        ds = self.ds
        with self.timings.timed("initial_labels"):
            segs, sal, pgt = make_labels(
                ds,
                self.cfg,
                lambda i: cam_at(self.warm_cams[i], ds.image(i).shape[:2]),
                lambda i: None,
                self.pool,
                "initial labels",
            )
        self.result.initial_pgt = pgt
        return _Labels(segs, sal, pgt)

    def resume(self, resumed: dict) -> _Labels:
        """The record, labels and timings of what a killed run did before its checkpoint."""
        r, done = self.result, json.loads(resumed["trial"])
        r.initial_pgt, r.stages, r.warmup = done["initial_pgt"], done["stages"], done["warmup"]
        for k, v in done["timings"].items():  # this run's data / warm-up time on top of the first's
            self.timings.add(k, v)
        self.t_start -= done["seconds"]
        epochs_done = 0 if resumed["train"] is None else resumed["train"]["epoch"] + 1
        r.resumed_from = done["resumed_from"] + [{"stage": resumed["stage"], "epoch": epochs_done}]
        print(
            f"resuming from {self.ckpt_dir}: stage {resumed['stage']} after {epochs_done} epoch(s)",
            file=sys.stderr,
        )
        return _Labels(
            resumed["segs"],
            resumed["sal_targets"],
            done["pgt"],
            resumed["stage"],
            True,
            resumed["train"],
            done["curve"],
            done["stage_seconds"],
        )

    def build_stage_net(self, resumed: dict | None) -> None:
        """The stage network from the warm-up's backbone (or a whole checkpoint), and the stages' randomness:
        the same stream whether the warm-up was computed or loaded."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed + 1)
        self.rng = np.random.default_rng([cfg.seed, 1])
        net = build_net(cfg, self.ds.num_classes)
        self.clf = build_classifier(cfg, self.ds.num_classes)
        self.clf.load_state_dict(self.clf_state)
        net.load_from_classifier(self.clf)
        if cfg.model.init_checkpoint:  # a whole trained network (released or ours) replaces all of it
            net.load_official(Path(cfg.model.init_checkpoint).expanduser())
        if resumed is not None:
            net.load_state_dict(resumed["net"])
            checkpoint.set_rng_state(resumed["rng"], self.rng)
        self.net = to_device(net, cfg, self.device)

    def amp(self) -> contextlib.AbstractContextManager:
        return autocast(self.cfg, self.device)

    def replay(self, labels: _Labels) -> None:
        """What was done before the checkpoint, told again: the caller's record of the trial is whole."""
        for rec in self.result.stages:
            for point in rec.get("curve", []):
                self._epoch(point["epoch"], point["miou"])
            if self.report is not None:
                self.report(rec["stage"], rec)
        for point in labels.curve_done:
            self._epoch(point["epoch"], point["miou"])

    def _epoch(self, epoch: int, miou: float) -> None:
        if self.on_epoch is not None:
            self.on_epoch(epoch, miou)

    def save(self, stage: _Stage, train_state: dict | None, labels: _Labels) -> None:
        """last.pt now (core.checkpoint.trial_state), the stage's training so far counting as training."""
        now = time.time()
        snapshot = dict(self.timings)
        snapshot["train"] = snapshot.get("train", 0.0) + self._trained(stage, now)
        r = self.result
        record = {
            "initial_pgt": r.initial_pgt,
            "stages": r.stages,
            "warmup": r.warmup,
            "timings": snapshot,
            "seconds": now - self.t_start,
            "resumed_from": r.resumed_from,
            "pgt": labels.pgt,
            "curve": stage.curve,
            "stage_seconds": now - stage.t_stage,
            "environment": r.environment,
        }
        assert self.ckpt_dir is not None
        took = checkpoint.save(
            self.ckpt_dir,
            checkpoint.trial_state(self.fingerprint, stage.s, train_state, self.net, self.rng, record),
        )
        if took is not None:
            self.timings.add("checkpoint", took)
            r.checkpoint = {
                "bytes": (self.ckpt_dir / checkpoint.LAST).stat().st_size,
                "writes": r.checkpoint.get("writes", 0) + 1,
            }

    def _trained(self, stage: _Stage, now: float) -> float:
        return now - stage.t_train - (self.timings.aside() - stage.aside_before)

    def train(self, s: int, labels: _Labels) -> _Stage:
        """Train stage s on its pseudo labels, checkpointing as it goes."""
        cfg, timings = self.cfg, self.timings
        resuming = labels.resumed and s == labels.first_stage
        now = time.time()
        curve: list[CurvePoint] = list(labels.curve_done) if resuming else []
        stage = _Stage(s, curve, now - (labels.stage_seconds if resuming else 0.0), now, timings.aside())
        has_sal = "sal" in cfg.model.branches
        every = cfg.train.checkpoint_every if self.ckpt_dir is not None else 0
        epochs = cfg.train.stage_epochs
        subset = curve_indices(len(self.val), cfg.eval.curve_images)

        def save(train_state: dict | None) -> None:
            self.save(stage, train_state, labels)

        if every and not resuming:  # the stage's start: its labels, once
            with timings.timed("checkpoint"):
                sal = labels.sal_targets if has_sal else None
                checkpoint.save_labels(self.ckpt_dir, s, labels.segs, sal)  # type: ignore[arg-type]
            save(None)

        def epoch_end(epoch: int) -> None:
            if not subset:  # every epoch, a stage's last included: one measurement, one curve
                return
            with timings.timed("curve"):
                m = evaluate(
                    self.net, self.val, cfg, self.device, False, None, self.amp, desc="curve", indices=subset
                )["miou"]
            curve.append({"epoch": s * epochs + epoch, "miou": m})
            self._epoch(s * epochs + epoch, m)

        def epoch_checkpoint(epoch: int, train_state: dict) -> None:
            if every and ((epoch + 1) % every == 0 or epoch == epochs - 1):
                save(train_state)

        stage.losses = train_stage(
            self.net,
            self.ds,
            labels.segs,
            labels.sal_targets if has_sal else None,
            cfg,
            self.device,
            self.rng,
            s,
            epoch_end,
            on_checkpoint=epoch_checkpoint,
            resume=labels.train_state if resuming else None,
            loader=self.loader,
        )
        timings.add("train", self._trained(stage, time.time()))
        return stage

    def evaluate_stage(self, stage: _Stage, labels: _Labels) -> None:
        """The stage's network on val (post-processed after the last stage), recorded and reported."""
        cfg, timings, epochs, s = self.cfg, self.timings, self.cfg.train.stage_epochs, stage.s
        last = s == cfg.train.stages - 1
        post = cfg.eval.post and (last or cfg.eval.post_every_stage)
        with timings.timed("eval"):
            metrics = evaluate(
                self.net, self.val, cfg, self.device, post, self.pool, amp_ctx=self.amp, desc=f"eval {s}"
            )
        record: StageRecord = {
            "stage": s,
            "val": metrics,
            "pgt": labels.pgt,
            "seconds": time.time() - stage.t_stage,
            "epoch": (s + 1) * epochs - 1,
            "curve": stage.curve,
            "losses": stage.losses,
        }
        self.result.stages.append(record)
        if self.report is not None:
            self.report(s, record)

    def update_labels(self, stage: _Stage) -> _Labels:
        """The next stage's pseudo labels from this stage's network (its refined CAMs and saliency)."""
        nxt = stage.s + 1
        with self.timings.timed("label_update"):
            cams, pred_sal = network_cues(self.net, self.ds, self.warm_cams, self.cfg, self.device)
            segs, sal, pgt = make_labels(self.ds, self.cfg, cams, pred_sal, self.pool, f"labels {nxt}")
        self.result.stages[-1]["seconds"] = time.time() - stage.t_stage
        return _Labels(segs, sal, pgt, nxt)

    def gallery(self, artifacts_dir: str | Path) -> None:
        """The image gallery (core.gallery): for looking at, so it never fails the trial."""
        cfg = self.cfg
        with self.timings.timed("gallery"):
            try:
                path = Path(artifacts_dir) / "gallery.png"
                title = f"seed {cfg.seed}: {'+'.join(cfg.model.branches)}, affinity {cfg.model.affinity}"
                rows = gallery_rows(cfg, self.net, self.clf, self.val, self.device)
                render_gallery(rows, list(self.val.class_names), path, title=title)
                self.result.artifacts = {"gallery": str(path)}
            except Exception as e:
                print(f"warning: gallery not written: {type(e).__name__}: {e}", file=sys.stderr)


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
    trial = _Trial(cfg, report, on_epoch, None if checkpoint_dir is None else Path(checkpoint_dir))
    resumed = trial.prepare()
    result = trial.result
    try:
        trial.warm_up()
        labels = trial.initial_labels() if resumed is None else trial.resume(resumed)
        trial.build_stage_net(resumed)
        trial.replay(labels)
        for s in range(labels.first_stage, cfg.train.stages):
            stage = trial.train(s, labels)
            trial.evaluate_stage(stage, labels)
            if s < cfg.train.stages - 1:
                labels = trial.update_labels(stage)
        result.final = {
            "miou": result.stages[-1]["val"]["miou"],
            "miou_post": result.stages[-1]["val"]["miou_post"],
        }
        if artifacts_dir is not None and cfg.eval.gallery_images > 0:
            trial.gallery(artifacts_dir)
    except NonFiniteLoss as e:
        result.status, result.error = Status.FAILED, str(e)
    finally:
        trial.loader.close()
        if trial.pool is not None:
            trial.pool.shutdown(cancel_futures=True)
    if trial.ckpt_dir is not None and not cfg.train.keep_checkpoint:  # ended: nothing left to resume
        checkpoint.remove(trial.ckpt_dir)
    result.timings = dict(trial.timings)
    result.seconds = time.time() - trial.t_start
    return result


if __name__ == "__main__":  # python -m core.trial: the command line lives in core.cli
    from core.cli import main

    sys.exit(main())
