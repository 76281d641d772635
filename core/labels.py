"""Pseudo labels: CAM + saliency fusion and the Eq. 1 saliency update (numpy only: runs in worker
processes)."""

from __future__ import annotations

import numpy as np

from core.crf import crf_saliency
from core.metrics import IGNORE, confusion


def fuse_cam_saliency(
    cam: np.ndarray, labels: np.ndarray, sal: np.ndarray, cam_threshold: float, sal_threshold: float
) -> np.ndarray:
    """Segmentation pseudo label by hard thresholds (authors' fusion).

    cam: (C-1, H, W) in [0, 1]; labels: (C-1,) image-level multi-hot; sal: (H, W) in [0, 1].
    Object where the class-masked CAM max and the saliency both fire (label = argmax + 1), background
    where neither fires, ignore where they disagree: the two cues vouch for each other.
    """
    masked = cam * (labels[:, None, None] > 0)
    score = masked.max(0)
    obj = score > cam_threshold
    salient = sal > sal_threshold
    out = np.full(sal.shape, IGNORE, np.uint8)
    out[~obj & ~salient] = 0
    both = obj & salient
    out[both] = (masked.argmax(0) + 1)[both].astype(np.uint8)
    return out


def update_saliency(
    pred_sal: np.ndarray, pt_sal: np.ndarray, img: np.ndarray, use_crf: bool = True
) -> np.ndarray:
    """Eq. 1: PGT_sal^s = CRF_d((P_ref_sal^{s-1} + Pt_sal) / 2)."""
    avg = 0.5 * (pred_sal + pt_sal)
    return crf_saliency(img, avg) if use_crf else avg


def binarize_saliency(sal: np.ndarray, threshold: float) -> np.ndarray:
    """Saliency label for the loss: the authors binarise the map at 0.5."""
    return (sal > threshold).astype(np.uint8)


def update_labels_one(job: dict) -> dict:
    """Per-image label update (the work the process pool spreads over cores).

    job: img, cam (C-1,H,W), labels, pt_sal (H,W), pred_sal (H,W) or None, gt (H,W) or None, and the
    settings. Returns the new segmentation label, the binarised saliency loss target, and the confusion
    of the new label against ground truth. Eq. 1 always averages with the off-the-shelf map Pt_sal.
    """
    if job["pred_sal"] is not None:
        sal = update_saliency(job["pred_sal"], job["pt_sal"], job["img"], job["sal_crf"])
    else:
        sal = job["pt_sal"]
    seg = fuse_cam_saliency(job["cam"], job["labels"], sal, job["cam_threshold"], job["sal_threshold"])
    conf = confusion(seg, job["gt"], job["num_classes"]) if job["gt"] is not None else None
    return {"seg": seg, "sal_target": binarize_saliency(sal, job["sal_binarize"]), "conf": conf}
