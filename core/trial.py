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
    result = TrialResult(status=Status.COMPLETE, error=None, config=cfg.to_dict())
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
    # started at the first training epoch (none when the warm-up is cached and the trial has no stage left)
    loader = BatchLoader(resolve_loader_workers(cfg, device), device)
    try:
        t = time.time()
        clf_state, warm_cams, hit, warm_secs = warmup_and_cams(cfg, ds, device, loader)
        result.warmup = {"cached": hit, "seconds": warm_secs}
        timings["warmup"] = time.time() - t

        if resumed is None:
            t = time.time()
            segs, sal_targets, pgt = make_labels(
                ds,
                cfg,
                lambda i: cam_at(warm_cams[i], ds.image(i).shape[:2]),
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
                loader=loader,
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
        result.status, result.error = Status.FAILED, str(e)
    finally:
        loader.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    if ckpt_dir is not None and not cfg.train.keep_checkpoint:  # ended: nothing left to resume
        checkpoint.remove(ckpt_dir)
    result.timings = timings
    result.seconds = time.time() - t_start
    return result


if __name__ == "__main__":  # python -m core.trial: the command line lives in core.cli
    from core.cli import main

    sys.exit(main())
