"""The embedded benchmark's stand-in for ImageNet weights: ResNet38 pretrained on a separate procedural set.

    python -m core.pretrain --width 0.125 --out core/weights/resnet38_synthetic_w0.125.pt

In the paper every trial starts from the same ImageNet ResNet38, so the seed moves only the heads'
initialisation, the data order and the augmentation. Trained from scratch, the CPU-width nets of the
embedded presets instead inherit the warm-up's luck: val mIoU spread 8-9 points over seeds. This module
trains the backbone once, on images the benchmark never uses, and `model.init_weights=synthetic` starts
every trial (warm-up included) from it.

The pretraining set is drawn by the benchmark's own renderer (same object, background and distractor
model) from another random stream (SeedSequence([seed, 1000, i]); the benchmark's are [seed, 0 | 1, i]),
20x the benchmark's training images, with its own label space (CUE_SETS): at width 0.125, 84 classes,
each a (cue colour pair, cue pattern) combination, so the backbone learns colour pairs *and* pattern
geometry (the benchmark draws its pattern at random); at the smoke width, the 21 colour pairs. No
benchmark image, mask or saliency map is read. Multi-label classification, as for ImageNet labels.

The checkpoint holds {"state_dict": backbone tensors (the converted-ImageNet names), "meta": {...}}
and loads through the same `load_backbone` path as a user's ImageNet checkpoint.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from core.data.synthetic import COLOUR_PAIRS, N_PATTERNS, PRESETS, render_image
from core.data.transforms import normalize, paired_random_transform
from core.environment import cpu_model
from core.init_weights import FORMAT, pretrained_path, rebuild_command
from core.losses import cls_loss
from core.model import Classifier

# Label spaces (colour a, colour b, pattern or None = random). "pairs-patterns": the 21 colour pairs x 4
# patterns (84 classes), used at width 0.125. "pairs": the 21 colour pairs (a superset of the benchmark's
# 20), used at the smoke width 0.0625, which learned nothing of the 84-class task at 64 px in 8 epochs
# (held-out F1 1.3 %, vs 25.9 % at width 0.125 / 96 px).
CUE_SETS = {
    "pairs-patterns": tuple((a, b, k) for a, b in COLOUR_PAIRS for k in range(N_PATTERNS)),
    "pairs": tuple((a, b, None) for a, b in COLOUR_PAIRS),
}


# SeedSequence([seed, PRETRAIN_STREAM, i]): the benchmark uses [seed, 0 | 1 (train | val), i].
PRETRAIN_STREAM = 1000


def default_cues(width: float) -> str:
    return "pairs" if width < 0.1 else "pairs-patterns"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- training
def render_set(
    n: int, size: int, seed: int, cues: tuple, desc: str = "render"
) -> tuple[np.ndarray, np.ndarray]:
    """n images (uint8 N x size x size x 3, JPEG q95 like the benchmark) and multi-hot labels
    (N x classes)."""
    p = dict(PRESETS["default"], size=size)
    imgs = np.empty((n, size, size, 3), np.uint8)
    labels = np.zeros((n, len(cues)), np.float32)
    for i in tqdm(range(n), desc=desc, leave=False, disable=None):
        rng = np.random.default_rng(np.random.SeedSequence([seed, PRETRAIN_STREAM, i]))
        img, _, _, info = render_image(rng, p, cues=cues)
        buf = io.BytesIO()
        Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(
            buf, format="JPEG", quality=p["jpeg_quality"]
        )
        imgs[i] = np.asarray(Image.open(buf).convert("RGB"))
        labels[i, [c - 1 for c in info["classes"]]] = 1
    return imgs, labels


@torch.no_grad()
def evaluate_labels(clf: Classifier, imgs: np.ndarray, labels: np.ndarray, bf16: bool) -> dict[str, float]:
    """Multi-label precision / recall / F1 at logit 0 (probability 0.5), micro-averaged over labels."""
    clf.eval()
    preds = []
    for s in range(0, len(imgs), 64):
        x = torch.from_numpy(np.stack([normalize(im) for im in imgs[s : s + 64]]))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            preds.append((clf(x).float() > 0).numpy())
    pred = np.concatenate(preds)
    tp = float((pred & (labels > 0)).sum())
    prec, rec = tp / max(pred.sum(), 1), tp / max(labels.sum(), 1)
    return {
        "precision": float(prec),
        "recall": float(rec),
        "f1": float(2 * prec * rec / max(prec + rec, 1e-12)),
    }


def pretrain(
    width: float,
    out: Path,
    size: int = 96,
    images: int = 8000,
    epochs: int = 8,
    seed: int = 1,
    batch_size: int = 16,
    lr: float = 1e-3,
    bf16: bool = True,
    val_images: int = 800,
    cues: str | None = None,
) -> dict:
    """Train ResNet38 at `width` on the procedural pretraining set and write the backbone to `out`."""

    t0 = time.time()
    torch.manual_seed(seed)
    cues = cues or default_cues(width)
    table = CUE_SETS[cues]
    train_x, train_y = render_set(images, size, seed, table, "render train")
    val_x, val_y = render_set(
        val_images, size, seed + 1, table, "render val"
    )  # another seed: held-out images
    t_render = time.time() - t0
    clf = Classifier(num_classes=len(table) + 1, width=width, dropout=0.0, block_dropout=False)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    rng = np.random.default_rng([seed, PRETRAIN_STREAM])
    per_epoch = images // batch_size
    total = epochs * per_epoch
    bar = tqdm(total=total, desc=f"pretrain w{width:g}", disable=None)
    step, losses = 0, []
    for epoch in range(epochs):
        clf.train()
        order = rng.permutation(images)
        for b in range(per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = torch.from_numpy(
                np.stack(
                    [
                        paired_random_transform({"image": train_x[i]}, size, (0.7, 1.3), True, rng)["image"]
                        for i in idx
                    ]
                )
            )
            for g in opt.param_groups:
                g["lr"] = lr * (1 - step / total) ** 0.9
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = clf(x)
            loss = cls_loss(logits.float(), torch.from_numpy(train_y[idx]))
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite pretraining loss at epoch {epoch} step {step}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    val = evaluate_labels(clf, val_x, val_y, bf16)
    seconds = time.time() - t0
    meta = {
        "format": FORMAT,
        "width": float(width),
        "size": size,
        "images": images,
        "val_images": val_images,
        "epochs": epochs,
        "seed": seed,
        "batch_size": batch_size,
        "lr": lr,
        "precision": "bf16" if bf16 else "fp32",
        "cues": cues,
        "classes": len(table),
        "val": val,
        "final_loss": float(np.mean(losses[-50:])),
        "seconds": round(seconds, 1),
        "render_seconds": round(t_render, 1),
        "torch": str(torch.__version__),
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "command": rebuild_command(width, out, size)
        + f" --images {images} --epochs {epochs} --seed {seed} --cues {cues}",
    }
    state = {
        k: v.detach().float().clone() if v.is_floating_point() else v.clone()
        for k, v in clf.backbone.state_dict().items()
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    torch.save({"state_dict": state, "meta": meta}, tmp)
    os.replace(tmp, out)
    return meta


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.pretrain", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--width", type=float, required=True, help="model.width of the preset (0.125 default, 0.0625 smoke)"
    )
    ap.add_argument("--out", type=Path, default=None, help="checkpoint path (default core/weights/...)")
    ap.add_argument("--size", type=int, default=96, help="image side in px (the preset's image size)")
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--cues",
        choices=sorted(CUE_SETS),
        default=None,
        help="label space (default: pairs below width 0.1, else pairs-patterns)",
    )
    ap.add_argument("--fp32", action="store_true", help="train in fp32 (default: bf16 autocast)")
    a = ap.parse_args(argv)
    out = a.out or pretrained_path(a.width)
    torch.set_num_threads(os.cpu_count() or 1)
    meta = pretrain(a.width, out, a.size, a.images, a.epochs, a.seed, bf16=not a.fp32, cues=a.cues)
    v = meta["val"]
    print(json.dumps(meta, indent=1))
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, sha256 {sha256_file(out)}) "
        f"in {meta['seconds']:.0f}s; "
        f"held-out labels P {100 * v['precision']:.1f} R {100 * v['recall']:.1f} F1 {100 * v['f1']:.1f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
