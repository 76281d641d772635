"""Evaluation on val: mIoU without and with post-processing (multi-scale + flip + dense CRF)."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.config import Config
from core.crf import crf_label_job
from core.data import VOCDataset, normalize
from core.metrics import confusion, miou
from core.model import AuxSegNet
from core.parallel import bounded_map
from core.records import ValMetrics

# A fresh autocast context per network pass (core.train.autocast), or None for full precision.
AmpContext = Callable[[], contextlib.AbstractContextManager]
# Val images per network pass in the single-scale evaluation (same-size images only).
EVAL_BATCH = 16


def segment_logits(out: dict[str, torch.Tensor], refined: bool = True) -> torch.Tensor:
    """Inference uses the affinity-refined segmentation when the model has one (paper, Inference), unless
    refined=False (eval.refined: the seg branch's own prediction, an ablation)."""
    return out["seg_ref"] if refined and "seg_ref" in out else out["seg"]


@torch.no_grad()
def predict_probs(
    net: AuxSegNet,
    img: np.ndarray,
    device: torch.device,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    amp_ctx: AmpContext | None = None,
    refined: bool = True,
) -> np.ndarray:
    """Class probabilities (C, H, W) averaged over scales (and horizontal flips)."""
    h, w = img.shape[:2]
    x0 = torch.from_numpy(normalize(img))[None].to(device)
    acc = None
    for s in scales:
        size = (max(8, int(round(h * s))), max(8, int(round(w * s))))
        x = x0 if size == (h, w) else F.interpolate(x0, size=size, mode="bilinear", align_corners=False)
        xs = torch.cat([x, x.flip(-1)]) if flip else x
        with (amp_ctx or contextlib.nullcontext)():
            logits = segment_logits(net(xs), refined).float()
        logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
        p = logits.softmax(1)
        p = (p[0] + p[1].flip(-1)) / 2 if flip else p[0]
        acc = p if acc is None else acc + p
    return (acc / len(scales)).cpu().numpy()


def evaluate(
    net: AuxSegNet,
    ds: VOCDataset,
    cfg: Config,
    device: torch.device,
    post: bool,
    pool: Executor | None = None,
    amp_ctx: AmpContext | None = None,
    desc: str = "eval",
    indices: Sequence[int] | None = None,
) -> ValMetrics:
    """{miou, miou_post (None unless post), per_class_iou} on ds (its ground-truth masks), or on the
    images `indices` of ds only.

    Network passes run here; the CRF of each image runs in the pool while the next image is predicted.
    """
    net.eval()
    c = ds.num_classes
    conf = np.zeros((c + 1, c + 1), np.int64)
    conf_post = np.zeros_like(conf)

    order = list(range(len(ds))) if indices is None else list(indices)
    for idx, pred in predict_batched(net, ds, order, device, amp_ctx, desc, refined=cfg.eval.refined):
        conf += confusion(pred, ds.mask(idx), c)
    m, per_class = miou(conf)
    if not post:
        return {"miou": m, "miou_post": None, "per_class_iou": per_class}

    def post_jobs():
        for i in tqdm(order, desc=f"{desc} post", leave=False, disable=None):
            img = ds.image(i)
            probs = predict_probs(net, img, device, cfg.eval.scales, cfg.eval.flip, amp_ctx, cfg.eval.refined)
            yield img, probs

    jobs = bounded_map(pool, crf_label_job, post_jobs()) if cfg.eval.crf else map(_argmax_job, post_jobs())
    for i, pred in zip(order, jobs):
        conf_post += confusion(pred, ds.mask(i), c)
    return {"miou": m, "miou_post": miou(conf_post)[0], "per_class_iou": per_class}


@torch.no_grad()
def predict_batched(
    net: AuxSegNet,
    ds: VOCDataset,
    order: Sequence[int],
    device: torch.device,
    amp_ctx: AmpContext | None = None,
    desc: str = "eval",
    batch: int = EVAL_BATCH,
    refined: bool = True,
):
    """(index, single-scale argmax prediction (H, W) uint8) for the images `order` of ds, in that order.

    Consecutive images of one size share a network pass (the benchmark's are all one size; VOC's mostly
    differ, and then this is one image per pass, as predict_probs): a batch-1 pass leaves most of a CPU's
    vector width idle on small feature maps. BatchNorm is in eval mode and the affinity is per image, so an
    image's prediction does not depend on its batch mates (up to float summation order).
    """
    pending: list[tuple[int, np.ndarray]] = []

    def flush():
        x = torch.from_numpy(np.stack([normalize(img) for _, img in pending])).to(device)
        with (amp_ctx or contextlib.nullcontext)():
            logits = segment_logits(net(x), refined).float()
        logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        labels = logits.argmax(1).to(torch.uint8).cpu().numpy()
        out = [(i, labels[k]) for k, (i, _) in enumerate(pending)]
        pending.clear()
        return out

    for i in tqdm(order, desc=desc, leave=False, disable=None):
        img = ds.image(i)
        if pending and (len(pending) == batch or pending[0][1].shape != img.shape):
            yield from flush()
        pending.append((i, img))
    if pending:
        yield from flush()


def _argmax_job(job: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return job[1].argmax(0).astype(np.uint8)
