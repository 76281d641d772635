"""Segmentation metrics on confusion matrices (numpy only, so worker processes can use them)."""

from __future__ import annotations

import numpy as np

from core.records import PgtMetrics

IGNORE = 255


def confusion(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """(C+1) x (C+1) counts, rows = ground truth, cols = prediction; index C collects pred==ignore.

    Ground-truth ignore pixels are dropped. A prediction of 255 (a pseudo label's "no label") lands in
    column C, so it counts as a miss of the true class (recall) but never as a wrong foreground claim.
    """
    gt = gt.astype(np.int64).ravel()
    pred = pred.astype(np.int64).ravel()
    keep = gt != IGNORE
    gt, pred = gt[keep], pred[keep]
    pred = np.where(pred == IGNORE, num_classes, pred)
    n = num_classes + 1
    return np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)


def miou(conf: np.ndarray) -> tuple[float, list[float | None]]:
    """Mean IoU over classes present in ground truth or prediction; per-class IoU (None if absent)."""
    c = conf.shape[0] - 1
    tp = np.diag(conf)[:c].astype(np.float64)
    fp = conf[:c, :c].sum(0) - tp  # claimed as c but not c (labelled pixels only)
    fn = conf[:c, :].sum(1) - tp  # true c not labelled c, including "no label"
    denom = tp + fp + fn
    iou = np.where(denom > 0, tp / np.maximum(denom, 1), np.nan)
    per = [None if np.isnan(v) else float(v) for v in iou]
    return (float(np.nanmean(iou)) if np.any(denom > 0) else 0.0), per


def fg_precision_recall(conf: np.ndarray) -> tuple[float, float]:
    """Pseudo-label quality as in the paper's Fig. 6, over foreground pixels.

    precision = correctly labelled foreground pixels / pixels labelled foreground (any class >= 1);
    recall    = correctly labelled foreground pixels / true foreground pixels (ignore = missed).
    """
    c = conf.shape[0] - 1
    correct = float(np.trace(conf[1:c, 1:c]))
    labelled_fg = float(conf[:, 1:c].sum())
    true_fg = float(conf[1:c, :].sum())
    return correct / max(labelled_fg, 1.0), correct / max(true_fg, 1.0)


def pgt_summary(conf: np.ndarray) -> PgtMetrics:
    p, r = fg_precision_recall(conf)
    return {"precision": p, "recall": r, "miou": miou(conf)[0]}


def all_background_miou(masks, num_classes: int) -> float:
    """The mIoU of predicting background everywhere on these masks: the floor a collapsed trial sits at."""
    conf = sum(confusion(np.zeros_like(m), m, num_classes) for m in masks)
    return miou(conf)[0]
