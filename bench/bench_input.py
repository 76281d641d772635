"""What a GPU would see of the training input pipeline, measured on the CPU (issue #35).

    python -m bench.bench_input [--workers 0 1 2] [--images 400] [--epochs 3] [--step-ms 40] [--folder DIR]

On a generated VOC-layout folder of 500x375 / 375x500 JPEGs (natural-image-like: smooth shapes, edges and
noise), with the paper preset's crop (321) and batch (4) and a stage's two pseudo-label maps per image,
for each worker count (train.loader_workers; 0 is the synchronous path, prepared in the training process):

  * images_per_s: batch preparation alone, each batch taken as soon as it is ready, over the epochs after
    the first (the synchronous path decodes in its first epoch and reads its cache after; workers decode
    every time); first_epoch_images_per_s beside it;
  * wait_share: the share of wall time a training loop (core.train.batches, as train_stage iterates it)
    waits for its next batch when the step is a stand-in that sleeps --step-ms: a GPU step leaves the
    host mostly idle. Measured over the epochs after the first, the pool already started.

One JSON line per worker count: workers, images_per_s, step_ms, wait_share, and the context (CPU, load
average, images, crop, batch). Run it with the machine as it is and compare the lines of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.config import make_config
from core.data import VOCDataset
from core.environment import cpu_model
from core.loader import BatchLoader
from core.train import batches

SIZES = ((375, 500), (500, 375), (333, 500))  # (h, w): VOC's usual shapes, landscape most often


def write_voc_folder(root: Path, n: int, seed: int = 0, sizes=SIZES) -> Path:
    """n JPEGs (quality 90) in VOC layout: JPEGImages/, ImageSets/Segmentation/train.txt, labels.json (one
    or two of 20 classes per image). Smooth blobs over a gradient, with edges and a little noise, so the
    files decode like photographs (pure noise would not compress and would decode slower)."""
    rng = np.random.default_rng(seed)
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
    names, labels = [], {}
    for k in range(n):
        h, w = sizes[0] if k % 4 else sizes[1 + (k // 4) % (len(sizes) - 1)]
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        img = np.empty((h, w, 3), np.float32)
        for c in range(3):
            img[..., c] = (
                rng.uniform(40, 200) + rng.uniform(-60, 60) * (xx / w) + rng.uniform(-60, 60) * (yy / h)
            )
        for _ in range(rng.integers(2, 6)):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(20, 120)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
        img += rng.normal(0, 6, img.shape)
        name = f"img_{k:05d}"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            root / "JPEGImages" / f"{name}.jpg", quality=90
        )
        names.append(name)
        labels[name] = sorted({int(c) for c in rng.integers(1, 21, rng.integers(1, 3))})
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(names) + "\n")
    (root / "labels.json").write_text(json.dumps(labels))
    return root


def stage_maps(ds: VOCDataset, seed: int = 0) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per image, a seg pseudo-label map (blocks of class ids, 255 at their borders) and a binary saliency
    target, uint8 HxW as a stage's label update makes them."""
    rng = np.random.default_rng(seed)
    segs, sals = [], []
    for i in range(len(ds)):
        h, w = ds.image_size(i)
        blocks = rng.integers(0, 21, (h // 32 + 1, w // 32 + 1)).astype(np.uint8)
        seg = np.kron(blocks, np.ones((32, 32), np.uint8))[:h, :w]
        seg[::32, :] = 255
        segs.append(np.ascontiguousarray(seg))
        sals.append((seg > 0).astype(np.uint8))
    return segs, sals


def measure(root: Path, workers: int, epochs: int, step_ms: float, crop: int, batch: int) -> dict:
    cfg = make_config(
        "paper",
        [f"data.root={root}", "model.init_weights=none", f"train.crop={crop}", f"train.batch_size={batch}"],
    )
    ds = VOCDataset(root, "train")  # a fresh cache per worker count: the synchronous path decodes again
    segs, sals = stage_maps(ds)

    def extra(i: int) -> dict[str, np.ndarray]:
        return {"seg": segs[i], "sal": sals[i]}

    device = torch.device("cpu")
    rng = np.random.default_rng(0)
    with BatchLoader(workers, device) as loader:

        def epoch() -> tuple[int, float, float]:
            """images, wall seconds, seconds waiting for batches (stand-in step between them)."""
            n, wait, t0 = 0, 0.0, time.perf_counter()
            it = batches(ds, cfg, rng, extra, loader)
            while True:
                t = time.perf_counter()
                b = next(it, None)
                wait += time.perf_counter() - t
                if b is None:
                    return n, time.perf_counter() - t0, wait
                n += b["image"].shape[0]
                if step_ms:
                    time.sleep(step_ms / 1000)

        step, step_ms = step_ms, 0.0
        first = epoch()  # decodes (synchronous path) / starts the workers
        rate = [epoch() for _ in range(epochs - 1)]
        step_ms = step
        loop = [epoch() for _ in range(epochs - 1)]
    images = sum(r[0] for r in rate)
    return {
        "workers": workers,
        "images_per_s": round(images / sum(r[1] for r in rate), 1),
        "step_ms": step,
        "wait_share": round(sum(r[2] for r in loop) / sum(r[1] for r in loop), 3),
        "first_epoch_images_per_s": round(first[0] / first[1], 1),
        "images": len(ds),
        "crop": crop,
        "batch": batch,
        "cpu": f"{cpu_model()} ({os.cpu_count()} cores)",
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="loader worker counts")
    ap.add_argument("--images", type=int, default=400, help="images in the generated folder (one epoch)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per measurement (the first is not timed)")
    ap.add_argument("--step-ms", type=float, default=40.0, help="stand-in step (sleep) for wait_share")
    ap.add_argument("--crop", type=int, default=None, help="default: the paper preset's (321)")
    ap.add_argument("--batch", type=int, default=None, help="default: the paper preset's (4)")
    ap.add_argument("--folder", type=Path, default=None, help="a VOC-layout folder (default: generated)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    a = ap.parse_args(argv)
    if a.epochs < 2 or any(w < 0 for w in a.workers):
        print("error: --epochs must be >= 2 and --workers counts >= 0", file=sys.stderr)
        return 2
    paper = make_config("paper", ["data.root=/voc", "model.init_weights=none"]).train
    crop, batch = a.crop or paper.crop, a.batch or paper.batch_size
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = a.folder or write_voc_folder(Path(tmp) / "voc", a.images)
        for w in a.workers:
            print(json.dumps(measure(root, w, a.epochs, a.step_ms, crop, batch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
