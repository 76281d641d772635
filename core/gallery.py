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
import torch

from core.build import curve_indices, resolve_data_root
from core.config import Config
from core.cues import cam_at, compute_cams, network_cues
from core.data import DEFAULT_SALIENCY, DataError, VOCDataset
from core.labels import update_labels_one
from core.model import AuxSegNet, Classifier

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

    from core.data.voc import voc_colormap

    cmap = voc_colormap()
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


class _View:
    """The images `idx` of a data set, indexed 0..len-1 (what label_jobs / network_cues read)."""

    def __init__(self, ds: VOCDataset, idx: list[int]):
        self.ds, self.idx, self.num_classes = ds, idx, ds.num_classes

    def __len__(self) -> int:
        return len(self.idx)

    def image(self, j: int) -> np.ndarray:
        return self.ds.image(self.idx[j])

    def mask(self, j: int) -> np.ndarray:
        return self.ds.mask(self.idx[j])

    def labels(self, j: int) -> np.ndarray:
        return self.ds.labels(self.idx[j])

    def saliency(self, j: int) -> np.ndarray:
        return self.ds.saliency(self.idx[j])


@torch.no_grad()
def gallery_rows(
    cfg: Config, net: AuxSegNet, clf: Classifier, val: VOCDataset, device: torch.device
) -> list[GalleryRow]:
    """core.gallery's rows for the fixed val subset (eval.gallery_images, evenly spaced)."""
    from core.evaluate import predict_probs

    root, sal = resolve_data_root(cfg), cfg.data.saliency or DEFAULT_SALIENCY
    try:  # the val split's saliency maps, where the data set has them (the benchmark does)
        val_sal = VOCDataset(root, cfg.data.val_split, saliency=sal, num_classes=val.num_classes)
    except DataError:
        val_sal = val
    view = _View(val_sal, curve_indices(len(val), cfg.eval.gallery_images))
    warm = compute_cams(clf.to(device), view, device)  # type: ignore[arg-type]
    cams, pred_sal = network_cues(net, view, warm, cfg, device)  # type: ignore[arg-type]
    rows: list[GalleryRow] = []
    for j in range(len(view)):
        img, labels = view.image(j), view.labels(j)
        cam = cam_at(warm[j], img.shape[:2])
        present = np.flatnonzero(labels)
        initial = last = None
        try:
            pt_sal = view.saliency(j)
            common = {
                "img": img,
                "labels": labels,
                "pt_sal": pt_sal,
                "gt": None,
                "num_classes": val.num_classes,
                "cam_threshold": cfg.labels.cam_threshold,
                "sal_threshold": cfg.labels.sal_threshold,
                "sal_crf": cfg.labels.sal_crf,
                "sal_binarize": cfg.labels.sal_binarize,
            }
            initial = update_labels_one({**common, "cam": cam, "pred_sal": None})["seg"]
            last = update_labels_one({**common, "cam": cams(j), "pred_sal": pred_sal(j)})["seg"]
        except DataError:
            pass
        rows.append(
            {
                "name": Path(str(val.image_path(view.idx[j]))).stem,
                "image": img,
                "gt": view.mask(j),
                "cam": cam[present].max(0) if len(present) else np.zeros(img.shape[:2], np.float32),
                "initial": initial,
                "last": last,
                "pred": predict_probs(net, img, device, refined=cfg.eval.refined).argmax(0).astype(np.uint8),
            }
        )
    return rows
