"""Image normalisation and the paired (image + label maps) random training transform."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Draw",
    "apply_transform",
    "apply_transform_uint8",
    "denormalize",
    "draw_transform",
    "normalize",
    "normalize_lut",
    "normalize_uint8",
    "paired_random_transform",
]

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


class Draw(NamedTuple):
    """One sample's random choices: the scale, the flip, the crop offset, and the sizes they imply."""

    nh: int  # scaled height and width
    nw: int
    flip: bool
    oy: int  # crop offset in the padded, scaled image
    ox: int


def draw_transform(
    h: int, w: int, crop: int, scale=(0.7, 1.3), flip: bool = True, rng: np.random.Generator | None = None
) -> Draw:
    """The random choices of paired_random_transform for an h x w image, drawn from ``rng`` in its order:
    scale ~ U(scale), flip with p = 0.5 (if ``flip``), crop offsets. Only the image's size is needed, so
    the training process can draw them while another process decodes the image (core.loader)."""
    if rng is None:
        rng = np.random.default_rng()
    s = float(rng.uniform(scale[0], scale[1])) if scale is not None else 1.0
    do_flip = bool(rng.random() < 0.5) if flip else False
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    ph, pw = max(crop, nh), max(crop, nw)
    oy = int(rng.integers(0, ph - crop + 1))
    ox = int(rng.integers(0, pw - crop + 1))
    return Draw(nh, nw, do_flip, oy, ox)


def _check_image(img: np.ndarray) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"paired_random_transform: 'image' must be uint8 HxWx3, got {img.dtype} {img.shape}")


def _placer(d: Draw, crop: int):
    """place(x, fill): flip x (...xHxW) if drawn, put it at the top left of a crop-sized-or-larger canvas of
    `fill`, cut the crop out."""
    ph, pw = max(crop, d.nh), max(crop, d.nw)

    def place(x: np.ndarray, fill) -> np.ndarray:
        if d.flip:
            x = x[..., ::-1]
        canvas = np.full(x.shape[:-2] + (ph, pw), fill, x.dtype)
        canvas[..., : d.nh, : d.nw] = x
        return np.ascontiguousarray(canvas[..., d.oy : d.oy + crop, d.ox : d.ox + crop])

    return place


def _resize_image(img: np.ndarray, d: Draw) -> np.ndarray:
    h, w = img.shape[:2]
    if (d.nh, d.nw) == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((d.nw, d.nh), Image.BILINEAR))


def _map_entry(key: str, arr: np.ndarray, d: Draw, size: tuple[int, int], place, int_dtype) -> np.ndarray:
    """A label map (integer: nearest, pad 255 as int_dtype) or a soft map (float: bilinear, pad 0)."""
    if arr.shape != size:
        raise ValueError(
            f"paired_random_transform: '{key}' has shape {arr.shape}, expected {size} like 'image'"
        )
    if np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        return place(_resize_nearest(arr, d.nh, d.nw).astype(int_dtype), int_dtype(255))
    r = _resize_bilinear_float(arr, d.nh, d.nw) if (d.nh, d.nw) != size else arr.astype(np.float32)
    return place(r, np.float32(0.0))


def apply_transform(sample: dict, crop: int, d: Draw) -> dict:
    """paired_random_transform with its random choices given (see there for what happens to each entry)."""
    if "image" not in sample:
        raise ValueError("paired_random_transform: sample has no 'image' key")
    img = np.asarray(sample["image"])
    _check_image(img)
    place = _placer(d, crop)
    out = {}
    for key, val in sample.items():
        if key == "image":
            out[key] = place(normalize(_resize_image(img, d)), np.float32(0.0))
        elif isinstance(val, np.ndarray) and val.ndim == 2:
            out[key] = _map_entry(key, val, d, img.shape[:2], place, np.int64)
        else:
            out[key] = val
    return out


def apply_transform_uint8(sample: dict, crop: int, d: Draw) -> dict:
    """apply_transform without the normalisation, for a batch prepared in another process (core.loader):
    "image" stays uint8 (3 x crop x crop, padded with 0; `valid` = (rows, cols) of the crop that hold
    image, the rest is padding) and integer label maps stay uint8 (pad 255), a quarter and an eighth of the
    bytes to send. Normalising the image with normalize_lut and zeroing the padding, and widening the maps to
    int64, give apply_transform's arrays bit for bit (tests/test_loader.py)."""
    img = np.asarray(sample["image"])
    _check_image(img)
    place = _placer(d, crop)
    out = {}
    for key, val in sample.items():
        if key == "image":
            out[key] = place(_resize_image(img, d).transpose(2, 0, 1), np.uint8(0))
            out["valid"] = np.array([min(crop, d.nh - d.oy), min(crop, d.nw - d.ox)], np.int64)
        elif isinstance(val, np.ndarray) and val.ndim == 2:
            # uint8 holds label ids and the 255 pad exactly; anything wider would wrap silently
            wide = np.issubdtype(val.dtype, np.integer) and val.dtype != np.uint8
            if wide and val.size and (int(val.max()) > 255 or int(val.min()) < 0):
                raise ValueError(f"paired_random_transform: '{key}' must hold label ids in 0..255")
            if np.issubdtype(val.dtype, np.integer) or val.dtype == bool:
                out[key] = _nearest_crop(key, val, d, img.shape[:2], crop)
            else:
                out[key] = _map_entry(key, val, d, img.shape[:2], place, np.uint8)
        else:
            out[key] = val
    return out


def _nearest_crop(key: str, arr: np.ndarray, d: Draw, size: tuple[int, int], crop: int) -> np.ndarray:
    """What _map_entry gives for a label map (nearest resize, flip, pad 255, crop), as uint8, reading only
    the source pixels the crop shows: the same index arithmetic as _resize_nearest, restricted to the crop
    window, so the values are the same ones (a third of the time of resizing the whole map)."""
    if arr.shape != size:
        raise ValueError(
            f"paired_random_transform: '{key}' has shape {arr.shape}, expected {size} like 'image'"
        )
    h, w = size
    rows = np.arange(d.oy, min(d.nh, d.oy + crop))  # rows of the scaled map inside the crop
    cols = np.arange(d.ox, min(d.nw, d.ox + crop))  # columns of the flipped scaled map inside the crop
    if d.flip:
        cols = d.nw - 1 - cols
    ys = np.minimum(((rows + 0.5) * h / d.nh).astype(np.int64), h - 1)
    xs = np.minimum(((cols + 0.5) * w / d.nw).astype(np.int64), w - 1)
    out = np.full((crop, crop), 255, np.uint8)
    out[: len(ys), : len(xs)] = arr[ys[:, None], xs[None, :]]
    return out


def normalize_lut() -> np.ndarray:
    """float32 3 x 256: normalize's value of each uint8 level in each channel, computed by normalize itself,
    so that looking a uint8 image up in it (on any device) is normalize's arithmetic bit for bit."""
    levels = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)  # a 1 x 256 x 3 image
    return normalize(levels)[:, 0, :]


def normalize_uint8(images: np.ndarray, valid: np.ndarray, lut: np.ndarray | None = None) -> np.ndarray:
    """apply_transform_uint8's stacked images (N x 3 x H x W uint8) and valid extents (N x 2) -> what
    apply_transform gives: normalised by lookup in normalize_lut, padding +0.0."""
    lut = normalize_lut() if lut is None else lut
    out = np.stack([np.take(lut[c], images[:, c]) for c in range(3)], axis=1)
    for k, (rows, cols) in enumerate(valid):
        out[k, :, rows:, :] = 0.0
        out[k, :, :, cols:] = 0.0
    return out


def paired_random_transform(
    sample: dict, crop: int, scale=(0.7, 1.3), flip: bool = True, rng: np.random.Generator | None = None
) -> dict:
    """Random scale, horizontal flip and crop applied identically to every spatial entry of ``sample``.

    - "image": uint8 HxWx3 -> bilinear resize, normalise, pad with 0 -> float32 3 x crop x crop.
    - integer HxW (label maps such as "seg", "sal" pseudo labels): nearest resize, pad 255 (ignore)
      -> int64 crop x crop.
    - float HxW (soft maps, e.g. a saliency map in [0, 1]): bilinear resize, pad 0 -> float32 crop x crop.
    - anything else (e.g. the image-level label vector, names) is passed through unchanged.
    Randomness, in this order: scale ~ U(scale), flip with p = 0.5 (if ``flip``), crop offsets
    (draw_transform). Pass a seeded ``rng`` for determinism.
    """
    if "image" not in sample:
        raise ValueError("paired_random_transform: sample has no 'image' key")
    img = np.asarray(sample["image"])
    _check_image(img)
    h, w = img.shape[:2]
    return apply_transform(sample, crop, draw_transform(h, w, crop, scale, flip, rng))
