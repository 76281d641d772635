"""A trial's image gallery: what a WSSS researcher looks at to judge a run.

One row per image of a fixed val subset (the same images in every trial of a data set):
image | ground truth | CAM (warm-up classifier, the image's classes, max over classes) |
initial pseudo label (warm-up CAM + off-the-shelf saliency) | last pseudo label (the final net's
affinity-refined CAM + refined saliency, the labels a next stage would train on) | prediction (the
final net, single scale, no CRF), label maps in the VOC palette with a legend of the classes shown.
Pseudo labels need the image's saliency map: without one (a VOC val set often has none) the two
pseudo-label panels say so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypedDict

import numpy as np

IGNORE = 255
COLUMNS = ("image", "ground truth", "CAM", "initial pseudo label", "last pseudo label", "prediction")


class GalleryRow(TypedDict):
    name: str
    image: np.ndarray  # (H, W, 3) uint8
    gt: np.ndarray  # (H, W) uint8, 255 = ignore
    cam: np.ndarray  # (H, W) float in [0, 1]
    initial: np.ndarray | None  # (H, W) uint8 label, None without a saliency map
    last: np.ndarray | None
    pred: np.ndarray  # (H, W) uint8


def colorize(label: np.ndarray, colormap: np.ndarray) -> np.ndarray:
    """Label map -> RGB in the VOC palette; the ignore value (255) is drawn white."""
    rgb = colormap[np.minimum(label, len(colormap) - 1)]
    rgb[label == IGNORE] = 255
    return rgb.astype(np.uint8)


def render_gallery(rows: list[GalleryRow], class_names: list[str], path: Path, title: str = "") -> Path:
    """Write the gallery PNG to path; returns path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    from core.data.voc import _voc_colormap

    cmap = _voc_colormap()
    fig, axes = plt.subplots(len(rows), len(COLUMNS), figsize=(2.0 * len(COLUMNS), 2.0 * len(rows) + 0.9))
    axes = np.atleast_2d(axes)
    shown: set[int] = set()
    for r, row in enumerate(rows):
        panels = [row["image"], row["gt"], row["cam"], row["initial"], row["last"], row["pred"]]
        for c, (ax, panel) in enumerate(zip(axes[r], panels)):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(COLUMNS[c], fontsize=8)
            if c == 0:
                ax.set_ylabel(row["name"], fontsize=7)
            if panel is None:
                ax.text(0.5, 0.5, "no saliency map", ha="center", va="center", fontsize=7)
                continue
            if c == 0:
                ax.imshow(panel)
            elif c == 2:
                ax.imshow(row["image"])
                ax.imshow(panel, cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            else:
                shown |= set(np.unique(panel).tolist()) - {IGNORE}
                ax.imshow(colorize(panel, cmap))
    handles = [
        Patch(color=cmap[k] / 255.0, label=class_names[k] if k < len(class_names) else str(k))
        for k in sorted(shown)
    ] + [Patch(facecolor="white", edgecolor="black", label="ignore (255)")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 8) or 1, fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
