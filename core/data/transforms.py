"""Image normalisation and the paired (image + label maps) random training transform."""

from __future__ import annotations

import numpy as np
from PIL import Image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "denormalize", "normalize", "paired_random_transform"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
_STD = np.array(IMAGENET_STD, np.float32)[:, None, None]


def normalize(img: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 RGB -> float32 3xHxW, ImageNet mean/std."""
    img = np.asarray(img)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"normalize expects an HxWx3 image, got shape {img.shape}")
    chw = img.transpose(2, 0, 1).astype(np.float32) / 255.0
    return (chw - _MEAN) / _STD


def denormalize(chw: np.ndarray) -> np.ndarray:
    """float 3xHxW (normalised) -> uint8 HxWx3 (inverse of normalize, rounded and clipped)."""
    chw = np.asarray(chw, np.float32)
    img = (chw * _STD + _MEAN) * 255.0
    return np.clip(np.rint(img), 0, 255).astype(np.uint8).transpose(1, 2, 0)


def _resize_nearest(x: np.ndarray, h: int, w: int) -> np.ndarray:
    # pixel-centre aligned, like PIL's bilinear, so label maps stay registered with the image
    ys = np.minimum(((np.arange(h) + 0.5) * x.shape[0] / h).astype(np.int64), x.shape[0] - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * x.shape[1] / w).astype(np.int64), x.shape[1] - 1)
    return x[ys[:, None], xs[None, :]]


def _resize_bilinear_float(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return np.asarray(Image.fromarray(np.ascontiguousarray(x, np.float32)).resize((w, h), Image.BILINEAR))


def paired_random_transform(
    sample: dict, crop: int, scale=(0.7, 1.3), flip: bool = True, rng: np.random.Generator | None = None
) -> dict:
    """Random scale, horizontal flip and crop applied identically to every spatial entry of ``sample``.

    - "image": uint8 HxWx3 -> bilinear resize, normalise, pad with 0 -> float32 3 x crop x crop.
    - integer HxW (label maps such as "seg", "sal" pseudo labels): nearest resize, pad 255 (ignore)
      -> int64 crop x crop.
    - float HxW (soft maps, e.g. a saliency map in [0, 1]): bilinear resize, pad 0 -> float32 crop x crop.
    - anything else (e.g. the image-level label vector, names) is passed through unchanged.
    Randomness, in this order: scale ~ U(scale), flip with p = 0.5 (if ``flip``), crop offsets. Pass a
    seeded ``rng`` for determinism.
    """
    if rng is None:
        rng = np.random.default_rng()
    if "image" not in sample:
        raise ValueError("paired_random_transform: sample has no 'image' key")
    img = np.asarray(sample["image"])
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"paired_random_transform: 'image' must be uint8 HxWx3, got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    s = float(rng.uniform(scale[0], scale[1])) if scale is not None else 1.0
    do_flip = bool(rng.random() < 0.5) if flip else False
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    ph, pw = max(crop, nh), max(crop, nw)
    oy = int(rng.integers(0, ph - crop + 1))
    ox = int(rng.integers(0, pw - crop + 1))

    def place(x: np.ndarray, fill) -> np.ndarray:
        if do_flip:
            x = x[..., ::-1]
        canvas = np.full(x.shape[:-2] + (ph, pw), fill, x.dtype)
        canvas[..., :nh, :nw] = x
        return np.ascontiguousarray(canvas[..., oy : oy + crop, ox : ox + crop])

    out = {}
    for key, val in sample.items():
        if key == "image":
            im = (
                np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
                if (nh, nw) != (h, w)
                else img
            )
            out[key] = place(normalize(im), np.float32(0.0))
            continue
        arr = val if isinstance(val, np.ndarray) else None
        if arr is None or arr.ndim != 2:
            out[key] = val
            continue
        if arr.shape != (h, w):
            raise ValueError(
                f"paired_random_transform: '{key}' has shape {arr.shape}, expected {(h, w)} like 'image'"
            )
        if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
            out[key] = place(_resize_nearest(arr, nh, nw).astype(np.int64), np.int64(255))
        else:
            r = _resize_bilinear_float(arr, nh, nw) if (nh, nw) != (h, w) else arr.astype(np.float32)
            out[key] = place(r, np.float32(0.0))
    return out
