"""Dense CRF (pydensecrf) for the two places the method uses it.

Only numpy and pydensecrf are imported here so that label-update worker processes start fast.
Pairwise spatial widths are the authors' (tuned on VOC images, about 500 px on the long side); they
are scaled by the image's long side / 500 so a 96 px synthetic image gets the same relative smoothing.
"""

from __future__ import annotations

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

VOC_LONG_SIDE = 500.0


def _buf(a: np.ndarray, dtype) -> np.ndarray:
    """pydensecrf takes writable C-contiguous buffers only (cached dataset arrays are read-only)."""
    return np.require(a, dtype, ["C", "W"])


def _spatial(sxy: float, shape: tuple[int, int]) -> float:
    return max(1.0, sxy * max(shape) / VOC_LONG_SIDE)


def crf_inference(img: np.ndarray, probs: np.ndarray, iters: int = 10) -> np.ndarray:
    """Post-processing CRF at inference (DeepLab parameters): softmax unary, Gaussian + bilateral pairwise."""
    c, h, w = probs.shape
    d = dcrf.DenseCRF2D(w, h, c)
    d.setUnaryEnergy(_buf(unary_from_softmax(probs.astype(np.float32), clip=1e-8), np.float32))
    img = _buf(img, np.uint8)
    d.addPairwiseGaussian(sxy=_spatial(4, (h, w)), compat=3)
    d.addPairwiseBilateral(sxy=_spatial(83, (h, w)), srgb=5, rgbim=img, compat=3)
    return np.asarray(d.inference(iters), dtype=np.float32).reshape(c, h, w)


def crf_saliency(img: np.ndarray, p: np.ndarray, tau: float = 1.05, iters: int = 1) -> np.ndarray:
    """CRF_d of Eq. 1 as the authors run it: 2 labels, confidence-scaled unary, one mean-field step."""
    h, w = p.shape
    p = np.clip(p.astype(np.float32), 0.0, 1.0)
    sig = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    u_fg = -np.log(p + 1e-8) / (tau * sig(p))
    u_bg = -np.log(1.0 - p + 1e-8) / (tau * sig(1.0 - p))
    unary = _buf(np.stack([u_bg, u_fg]).reshape(2, -1), np.float32)
    d = dcrf.DenseCRF2D(w, h, 2)
    d.setUnaryEnergy(unary)
    img = _buf(img, np.uint8)
    d.addPairwiseGaussian(sxy=_spatial(3, (h, w)), compat=3)
    d.addPairwiseBilateral(sxy=_spatial(60, (h, w)), srgb=5, rgbim=img, compat=5)
    q = np.asarray(d.inference(iters), dtype=np.float32).reshape(2, h, w)
    return q[1]


def crf_label_job(job: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Pool job: (image, class probabilities) -> CRF-refined label map."""
    img, probs = job
    return crf_inference(img, probs).argmax(0).astype(np.uint8)
