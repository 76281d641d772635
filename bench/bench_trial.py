"""Throughput of the trial's phases on the default preset, and one trial's wall time split by phase.

    python -m bench.bench_trial [--preset default] [--images 96] [--skip-trial]

Prints train images/s, label-update images/s with 1 process and with the pool (ratio), evaluation
images/s with and without post-processing (ratio), then runs one complete trial and prints its phases.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from core.build import build_net, load_data
from core.config import make_config
from core.cues import make_labels, network_cues
from core.evaluate import evaluate
from core.parallel import make_pool
from core.train import resolve_device, train_stage
from core.trial import run_trial


class Subset:
    """The first n items of a dataset, with the same reader interface."""

    def __init__(self, ds, n):
        self.ds, self.n = ds, min(n, len(ds))
        self.num_classes, self.root, self.saliency_name = ds.num_classes, ds.root, ds.saliency_name

    def __len__(self):
        return self.n

    def __getattr__(self, name):  # image, mask, labels, saliency
        return getattr(self.ds, name)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--images", type=int, default=96, help="images per throughput measurement")
    ap.add_argument("--skip-trial", action="store_true")
    args = ap.parse_args()
    # Label updates are timed with Eq. 1's CRF on (the work the pool exists for), whatever the preset says.
    cfg = make_config(args.preset, ["train.stage_epochs=1", "labels.sal_crf=true"])
    torch.set_num_threads(os.cpu_count() or 1)
    device = resolve_device(cfg)
    ds, val = load_data(cfg)
    tr, va = Subset(ds, args.images), Subset(val, args.images)
    print(
        f"torch {torch.__version__}, {os.cpu_count()} cores, device {device}, preset {args.preset}, "
        f"width {cfg.model.width}, crop {cfg.train.crop}, {args.images} images per measurement"
    )

    torch.manual_seed(0)
    net = build_net(cfg, ds.num_classes).to(device)
    # Labels to train on: a CAM-free stand-in (the image's saliency fused with its classes) is enough for
    # timing.
    seg = [
        np.where(tr.saliency(i) > 0.5, int(np.argmax(tr.labels(i))) + 1, 0).astype(np.uint8)
        for i in range(len(tr))
    ]
    sal = [(tr.saliency(i) > 0.5).astype(np.uint8) for i in range(len(tr))]
    rng = np.random.default_rng(0)
    _, t = timed(lambda: train_stage(net, tr, seg, sal, cfg, device, rng, 0))
    print(f"train (all branches, {cfg.model.affinity}):       {len(tr) / t:8.1f} images/s")

    cams, pred_sal = network_cues(net, tr, None, cfg, device)
    rates = {}
    for workers in (1, os.cpu_count() or 1):
        pool = make_pool(workers)
        _, t = timed(lambda: make_labels(tr, cfg, cams, pred_sal, pool, "labels"))
        if pool is not None:
            pool.shutdown()
        rates[workers] = len(tr) / t
        print(
            f"label update (Eq. 1 CRF + fusion), {workers} process{'es' if workers > 1 else ''}: "
            f"{rates[workers]:8.1f} images/s"
        )
    if len(rates) == 2:
        one, many = rates.values()
        print(f"  pool / 1 process: {many / one:.2f}x (pool start-up included)")
    no_crf = make_config(args.preset, ["labels.sal_crf=false"])
    _, t = timed(lambda: make_labels(tr, no_crf, cams, pred_sal, None, "labels"))
    print(f"label update without the CRF, 1 process: {len(tr) / t:8.1f} images/s")

    _, t_plain = timed(lambda: evaluate(net, va, cfg, device, post=False))
    pool = make_pool(0)
    _, t_post = timed(lambda: evaluate(net, va, cfg, device, post=True, pool=pool))
    if pool is not None:
        pool.shutdown()
    print(f"eval without post-processing:          {len(va) / t_plain:8.1f} images/s")
    print(
        f"eval with post ({len(cfg.eval.scales)} scales x flip + CRF): {len(va) / t_post:8.1f} images/s "
        f"({t_post / t_plain:.1f}x the time; includes the plain pass)"
    )

    if not args.skip_trial:
        res = run_trial(make_config(args.preset))
        print(f"\none {args.preset}-preset trial ({res.status}), {res.seconds:.1f} s wall, by phase:")
        for k, v in res.timings.items():
            print(f"  {k:<15} {v:7.1f} s  {100 * v / res.seconds:5.1f}%")
        print(f"  warm-up cached: {res.warmup['cached']}")


if __name__ == "__main__":
    main()
