"""Procedural WSSS benchmark in PASCAL VOC layout.

Why it is hard the ways WSSS is hard:

- every object's body has a CLASS-AGNOSTIC appearance (a warm, saturated, finely textured colour family,
  the same for all 20 classes); only a minority patch of it (``cue_frac``, 20-35 % of the visible object)
  carries the CLASS-DISCRIMINATIVE cue: a pattern (stripes or checker, drawn at random, class-agnostic)
  in the class's colour pair (6 single cue colours + 14 two-colour pairs = 20 classes). A classifier only
  needs the cue, so its CAMs under-activate (pseudo labels: precision well above recall); the body is
  recoverable only through saliency/affinity. (Version 1 coded classes as 5 colours x 4 stripe
  orientations; a from-scratch CPU-width net could barely tell them apart in its budget: val
  classification recall 13 % after the warm-up, vs 43 % with colour pairs.)
- 1-3 objects and 1-3 distinct classes per image, possibly overlapping a little.
- the background is textured clutter (muted colours, but some clutter patches take object-body colours),
  distractor blobs with the object-body appearance but no cue are labelled background, plus blur, noise
  and JPEG compression.
- three classical saliency sources (see ``saliency.py``) of clearly different quality are computed from
  the stored JPEG, standing in for the paper's DSS / PoolNet / MINet maps.

Layout written to DIR:
  JPEGImages/<name>.jpg (quality 95)  SegmentationClass/<name>.png (VOC palette; 255 = ignore band around
  object boundaries)  ImageSets/Segmentation/{train,val}.txt  labels.json {name: [class ids]}
  classes.txt (21 names, background first)  saliency/<source>/<name>.png (uint8 L)  summary.json

CLI: ``python -m core.data.synthetic --out DIR [--preset smoke|default] [--seed N]``.
Deterministic: every image draws from its own ``np.random.default_rng(SeedSequence([seed, split, i]))``.
"""

from __future__ import annotations

import argparse
import colorsys
import io
import json
import os
import shutil
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from .saliency import DEFAULT_SALIENCY, SALIENCY_SOURCES, saliency_metrics
from .voc import VOC_CLASSES, voc_colormap

__all__ = [
    "PRESETS",
    "VOC_CLASSES",
    "ensure_generated",
    "format_summary",
    "generate",
    "render_image",
    "voc_palette",
]

GENERATOR_VERSION = 2


_COMMON = {
    "max_objects": 3,
    "n_objects_p": (0.45, 0.35, 0.20),  # P(1), P(2), P(3) objects
    "same_class_p": 0.25,  # chance that an extra object repeats a class already in the image
    "radius": (0.13, 0.26),  # object base radius as a fraction of the image side
    "max_overlap": 0.10,  # max fraction of an object hidden by another
    "cue_frac": (0.20, 0.35),  # fraction of the visible object area carrying the class cue
    "distractor_p": 0.30,  # chance of one body-like distractor blob (labelled background)
    "clutter": (4, 10),  # number of background clutter patches
    "clutter_warm_p": 0.15,  # chance that a clutter patch takes an object-body colour
    "blur_sigma": 0.6,
    "noise_sigma": 0.025,
    "ignore_band": 1,  # half-width (px) of the 255 band around object boundaries
    "jpeg_quality": 95,
}

PRESETS: dict[str, dict] = {
    "smoke": dict(_COMMON, size=64, n_train=160, n_val=40),
    # val: 600 images, 150 until code 5fb36be (its first 150 images are that split). On 150 the val sample's
    # error that differs between networks was 52 % and 83 % of the paired variance of seg+sal and the full
    # model against seg (bench.bench_variance, seeds 0-5; README "Where the paired variance comes from").
    "default": dict(_COMMON, size=96, n_train=400, n_val=600),
}

# Cue palette: 6 colours far from the warm object bodies and the muted background. Class c (1..20) is
# the c-th colour pair (6 single colours, then 14 of the 15 two-colour pairs); the pair is drawn as one
# of 4 random patterns, so the class lives in WHICH colours co-occur, not in the stripe geometry.
_CUE_COLOURS = np.array(
    [
        [0.05, 0.80, 0.90],  # cyan
        [0.85, 0.15, 0.85],  # magenta
        [0.45, 0.95, 0.10],  # lime
        [0.15, 0.25, 0.95],  # blue
        [0.97, 0.97, 0.97],  # white
        [0.04, 0.04, 0.06],
    ]
)  # black
COLOUR_PAIRS = [(a, a) for a in range(6)] + [(a, b) for a in range(6) for b in range(a + 1, 6)]  # 21
_CLASS_COLOURS = COLOUR_PAIRS[:20]
N_PATTERNS = 4
# A cue table maps class c (1..len) to (colour a, colour b, pattern or None = drawn at random). The
# benchmark's table is the 20 colour pairs with random patterns; `core.pretrain` uses its own, larger one.
BENCHMARK_CUES: tuple[tuple[int, int, int | None], ...] = tuple((a, b, None) for a, b in _CLASS_COLOURS)


def voc_palette() -> list[int]:
    """The PASCAL VOC colour map as a flat [r, g, b, ...] list (for PIL putpalette)."""
    return voc_colormap().ravel().tolist()


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v))


def _noise_field(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-8)


def _blob(
    rng: np.random.Generator,
    size: int,
    radius: float,
    yy: np.ndarray,
    xx: np.ndarray,
    centre: tuple[float, float] | None = None,
) -> np.ndarray:
    """A random smooth star-shaped blob: r(theta) = R (1 + sum_k a_k cos(k theta + phi_k)), stretched."""
    if centre is None:
        m = 0.6 * radius
        centre = (rng.uniform(m, size - m), rng.uniform(m, size - m))
    cy, cx = centre
    rot = rng.uniform(0, np.pi)
    stretch = rng.uniform(0.7, 1.35)
    amps = rng.uniform(0.0, 0.16, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    dy, dx = yy - cy, xx - cx
    u = (dx * np.cos(rot) + dy * np.sin(rot)) / stretch
    v = (-dx * np.sin(rot) + dy * np.cos(rot)) * stretch
    theta = np.arctan2(v, u)
    r = radius * (1 + sum(a * np.cos(k * theta + p) for a, p, k in zip(amps, phases, (2, 3, 4))))
    return np.hypot(u, v) <= r


def _body_colour(rng: np.random.Generator) -> np.ndarray:
    # the class-agnostic object colour family: warm hues (red..yellow), saturated, fairly bright
    return _hsv(rng.uniform(-0.04, 0.13), rng.uniform(0.50, 0.85), rng.uniform(0.55, 0.92))


def _paint_body(rng, canvas: np.ndarray, mask: np.ndarray, size: int, yy, xx) -> None:
    """Object/distractor body: class-agnostic warm colour, fine texture, soft shading."""
    col = _body_colour(rng)
    tex = _noise_field(rng, (size, size), 0.8) * 0.10
    g = rng.uniform(-1, 1, 2)
    shade = 1.0 + 0.15 * (g[0] * (yy / size - 0.5) + g[1] * (xx / size - 0.5))
    body = col[None, None, :] * (shade * (1 + tex))[..., None]
    canvas[mask] = body[mask]


def _cue_pattern(kind: int, yy: np.ndarray, xx: np.ndarray, phase: tuple[int, int]) -> np.ndarray:
    """Binary pattern of one of 4 kinds (class-agnostic: the cue colours carry the class)."""
    y, x = yy.astype(int) + phase[0], xx.astype(int) + phase[1]
    if kind == 0:
        return (y // 3) % 2 == 0  # horizontal stripes, period 6
    if kind == 1:
        return (x // 3) % 2 == 0  # vertical stripes, period 6
    if kind == 2:
        return ((x + y) // 4) % 2 == 0  # diagonal stripes
    return ((x // 3) + (y // 3)) % 2 == 0  # checker, 3 px cells


def _background(rng, p: dict, yy, xx) -> np.ndarray:
    size = p["size"]
    base = _hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.35), rng.uniform(0.35, 0.70))
    img = np.empty((size, size, 3))
    coarse = _noise_field(rng, (size, size), size / 10)
    fine = _noise_field(rng, (size, size), 1.0)
    tint = _noise_field(rng, (size, size), size / 6)
    for c in range(3):
        img[..., c] = base[c] * (1 + 0.22 * coarse + 0.06 * fine) + 0.06 * tint * (c - 1)
    for _ in range(int(rng.integers(p["clutter"][0], p["clutter"][1] + 1))):
        if rng.random() < p["clutter_warm_p"]:
            col = _hsv(rng.uniform(-0.04, 0.13), rng.uniform(0.35, 0.65), rng.uniform(0.45, 0.80))
        else:
            col = _hsv(rng.uniform(0, 1), rng.uniform(0.05, 0.35), rng.uniform(0.25, 0.80))
        cy, cx = rng.uniform(0, size, 2)
        if rng.random() < 0.5:  # ellipse
            a, b = rng.uniform(0.03, 0.10, 2) * size
            th = rng.uniform(0, np.pi)
            u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
            v = -(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)
            m = (u / a) ** 2 + (v / b) ** 2 <= 1
        else:  # rectangle / bar
            hh, ww = rng.uniform(0.015, 0.12, 2) * size
            m = (np.abs(yy - cy) <= hh) & (np.abs(xx - cx) <= ww)
        img[m] = col * (1 + 0.12 * fine[m])[:, None]
    return img


def _choose_cue(rng, vis: np.ndarray, frac: float, yy, xx) -> np.ndarray:
    """The frac * |vis| visible pixels nearest (in a random anisotropic metric) to a random interior point."""
    edt = ndimage.distance_transform_edt(vis)
    cand = np.flatnonzero(edt >= 0.35 * edt.max())
    c = cand[rng.integers(len(cand))]
    cy, cx = divmod(int(c), vis.shape[1])
    th, ar = rng.uniform(0, np.pi), rng.uniform(1.0, 1.8)
    u = (xx - cx) * np.cos(th) + (yy - cy) * np.sin(th)
    v = (-(xx - cx) * np.sin(th) + (yy - cy) * np.cos(th)) * ar
    d = np.where(vis, u * u + v * v, np.inf).ravel()
    k = max(1, round(frac * vis.sum()))
    idx = np.argsort(d, kind="stable")[:k]
    cue = np.zeros(vis.size, bool)
    cue[idx] = True
    return cue.reshape(vis.shape)


def render_image(rng: np.random.Generator, p: dict, cues=BENCHMARK_CUES):
    """One sample: (image float HxWx3 in [0,1], seg uint8, fg bool, info dict); class c is drawn with
    ``cues[c - 1]`` (the benchmark's 20 classes unless another cue table is given)."""
    size = p["size"]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = _background(rng, p, yy, xx)

    # -- objects: shapes with bounded mutual occlusion
    n_obj = int(rng.choice(np.arange(1, p["max_objects"] + 1), p=p["n_objects_p"]))
    shapes, classes = [], []
    for _ in range(n_obj):
        for _attempt in range(30):
            m = _blob(rng, size, rng.uniform(*p["radius"]) * size, yy, xx)
            area = m.sum()
            if area < 0.5 * np.pi * (p["radius"][0] * size) ** 2:
                continue  # mostly outside the image
            ok = all((m & s).sum() <= p["max_overlap"] * min(area, s.sum()) for s in shapes)
            if ok:
                break
        else:
            continue
        if classes and rng.random() < p["same_class_p"]:
            cls = int(classes[rng.integers(len(classes))])
        else:
            cls = int(rng.integers(1, len(cues) + 1))
        shapes.append(m)
        classes.append(cls)
    inst = np.zeros((size, size), np.int32)  # later objects occlude earlier ones
    for k, m in enumerate(shapes, 1):
        inst[m] = k

    # -- distractor: body-like blob without cue, under the objects, labelled background
    if rng.random() < p["distractor_p"]:
        d = _blob(rng, size, rng.uniform(0.5, 0.9) * p["radius"][0] * size, yy, xx) & (inst == 0)
        _paint_body(rng, img, d, size, yy, xx)

    cue_fracs = []
    for k, cls in enumerate(classes, 1):
        vis = inst == k
        _paint_body(rng, img, vis, size, yy, xx)
        cue = _choose_cue(rng, vis, rng.uniform(*p["cue_frac"]), yy, xx)
        cue_fracs.append(float(cue.sum() / vis.sum()))
        colour_a, colour_b, pattern = cues[cls - 1]
        ca, cb = (_CUE_COLOURS[k] * rng.uniform(0.85, 1.0) for k in (colour_a, colour_b))
        drawn = int(rng.integers(N_PATTERNS))  # drawn even when fixed, so every table uses one rng stream
        on = _cue_pattern(
            drawn if pattern is None else pattern, yy, xx, tuple(int(v) for v in rng.integers(0, 8, 2))
        )
        pat = np.where(on[..., None], ca[None, None, :], cb[None, None, :])
        img[cue] = pat[cue]

    img = ndimage.gaussian_filter(img, sigma=(p["blur_sigma"], p["blur_sigma"], 0))
    img = img + rng.normal(0.0, p["noise_sigma"], img.shape)
    img = np.clip(img, 0, 1)

    cls_of = np.array([0] + classes, np.uint8)
    seg = cls_of[inst]
    b = 2 * p["ignore_band"] + 1
    band = ndimage.maximum_filter(inst, size=b) != ndimage.minimum_filter(inst, size=b)
    seg[band] = 255
    info = {"classes": sorted(set(classes)), "n_objects": len(classes), "cue_fracs": cue_fracs}
    return img, seg, inst > 0, info


def _write_png(path: Path, arr: np.ndarray, palette: list[int] | None = None) -> None:
    im = Image.fromarray(np.ascontiguousarray(arr, np.uint8))
    if palette is not None:
        im = im.convert("P")
        im.putpalette(palette)
    im.save(path, format="PNG")


def generate(
    out: str | Path, preset: str = "default", seed: int = 0, verbose: bool = False, n_val: int | None = None
) -> dict:
    """Write the synthetic benchmark to ``out`` (VOC layout) and return its summary (also summary.json).
    n_val: another val size than the preset's; its first images are the preset's own (each image draws from
    its own stream), the rest independent draws of the same distribution (bench.bench_variance)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset] if n_val is None else {**PRESETS[preset], "n_val": int(n_val)}
    out = Path(out)
    for sub in (
        "JPEGImages",
        "SegmentationClass",
        "ImageSets/Segmentation",
        *(f"saliency/{s}" for s in SALIENCY_SOURCES),
    ):
        (out / sub).mkdir(parents=True, exist_ok=True)
    palette = voc_palette()
    labels: dict[str, list[int]] = {}
    stats = {}
    sal_scores = {s: [[], []] for s in SALIENCY_SOURCES}
    for split_id, split in enumerate(("train", "val")):
        n = p[f"n_{split}"]
        names, n_objs, cue_fracs = [], [], []
        freq = np.zeros(21, np.int64)
        for i in range(n):
            name = f"{split}_{i:05d}"
            rng = np.random.default_rng(np.random.SeedSequence([int(seed), split_id, i]))
            img, seg, fg, info = render_image(rng, p)
            buf = io.BytesIO()
            Image.fromarray((img * 255 + 0.5).astype(np.uint8)).save(
                buf, format="JPEG", quality=p["jpeg_quality"]
            )
            (out / "JPEGImages" / f"{name}.jpg").write_bytes(buf.getvalue())
            stored = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            _write_png(out / "SegmentationClass" / f"{name}.png", seg, palette)
            for s, fn in SALIENCY_SOURCES.items():
                sal = (np.clip(fn(stored), 0, 1) * 255 + 0.5).astype(np.uint8)
                _write_png(out / "saliency" / s / f"{name}.png", sal)
                if split == "train":
                    mae, f = saliency_metrics(sal / 255.0, fg)
                    sal_scores[s][0].append(mae)
                    sal_scores[s][1].append(f)
            labels[name] = info["classes"]
            freq[info["classes"]] += 1
            n_objs.append(info["n_objects"])
            cue_fracs += info["cue_fracs"]
            names.append(name)
        (out / "ImageSets/Segmentation" / f"{split}.txt").write_text("".join(f"{x}\n" for x in names))
        stats[split] = {
            "images": n,
            "mean_objects": round(float(np.mean(n_objs)), 3),
            "mean_classes": round(float(np.mean([len(labels[x]) for x in names])), 3),
            "mean_cue_fraction": round(float(np.mean(cue_fracs)), 3),
            "class_images": {VOC_CLASSES[c]: int(freq[c]) for c in range(1, 21)},
        }
        if verbose:
            print(f"  {split}: {n} images", file=sys.stderr)
    (out / "labels.json").write_text(json.dumps(labels, indent=0, sort_keys=True) + "\n")
    (out / "classes.txt").write_text("".join(f"{c}\n" for c in VOC_CLASSES))
    summary = {
        "generator_version": GENERATOR_VERSION,
        "preset": preset,
        "seed": int(seed),
        "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in p.items()},
        "num_classes": 21,
        "splits": stats,
        "saliency": {
            s: {"mae": round(float(np.mean(v[0])), 4), "fmeasure": round(float(np.mean(v[1])), 4)}
            for s, v in sal_scores.items()
        },
        "default_saliency": DEFAULT_SALIENCY,
    }
    # summary.json is written last: its presence marks a complete dataset (see ensure_generated)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _matches(summary_path: Path, preset: str, seed: int) -> bool:
    try:
        s = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return False
    want = {k: (list(v) if isinstance(v, tuple) else v) for k, v in PRESETS.get(preset, {}).items()}
    return (
        s.get("generator_version") == GENERATOR_VERSION
        and s.get("preset") == preset
        and s.get("seed") == int(seed)
        and s.get("params") == want
    )


def ensure_generated(out: str | Path, preset: str = "default", seed: int = 0) -> dict:
    """Return the summary of the dataset at ``out``, generating it first unless an identical one is there.

    Safe when several processes call it at once: each generates into a private sibling folder and the
    first to finish renames it into place.
    """
    out = Path(out)
    if _matches(out / "summary.json", preset, seed):
        return json.loads((out / "summary.json").read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        summary = generate(tmp, preset, seed)
        if out.exists() and not _matches(out / "summary.json", preset, seed):
            stale = out.parent / f".{out.name}.stale-{uuid.uuid4().hex[:8]}"
            try:
                os.replace(out, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass
        try:
            os.replace(tmp, out)
        except OSError:  # someone else put a dataset there first
            if not _matches(out / "summary.json", preset, seed):
                raise
        return summary
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def format_summary(s: dict) -> str:
    lines = [
        (
            f"synthetic WSSS benchmark: preset={s['preset']} seed={s['seed']} "
            f"size={s['params']['size']} classes={s['num_classes']} (incl. background)"
        )
    ]
    for split, st in s["splits"].items():
        lines.append(
            f"  {split:5s}: {st['images']} images, {st['mean_objects']:.2f} objects/image, "
            f"{st['mean_classes']:.2f} classes/image, cue covers {100 * st['mean_cue_fraction']:.1f}% "
            f"of object area"
        )
    ci = s["splits"]["train"]["class_images"]
    lines.append("  train images per class: " + ", ".join(f"{k}={v}" for k, v in ci.items()))
    lines.append("  saliency vs true foreground (train):   source    MAE   F(beta2=.3)")
    for name, m in sorted(s["saliency"].items(), key=lambda kv: -kv[1]["fmeasure"]):
        tag = "  (default)" if name == s["default_saliency"] else ""
        lines.append(f"{'':41s}{name:6s} {m['mae']:.3f}  {m['fmeasure']:.3f}{tag}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.data.synthetic", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="output folder (VOC layout)")
    ap.add_argument("--preset", default="default", choices=sorted(PRESETS))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    t0 = time.perf_counter()
    s = generate(a.out, a.preset, a.seed)
    print(format_summary(s))
    print(f"wrote {a.out} in {time.perf_counter() - t0:.1f}s (summary: {Path(a.out) / 'summary.json'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
