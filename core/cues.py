"""The cues pseudo labels are made from, and the label update over a whole split: the warm-up classifier's
CAMs, the network's CAMs refined by the learned affinity (Eq. 6-7) and its predicted saliency, and Eq. 1 per
image (core.labels.update_labels_one) over the CRF pool."""

from __future__ import annotations

from concurrent.futures import Executor
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from core.config import Config
from core.data import VOCDataset, normalize
from core.labels import update_labels_one
from core.metrics import pgt_summary
from core.model import AuxSegNet, refine_with_affinity
from core.parallel import bounded_map
from core.records import PgtMetrics
from core.train import autocast


def cam_at(cam: torch.Tensor, size: tuple[int, int], normalize: bool = True) -> np.ndarray:
    """(C-1, h, w) ReLU CAM -> normalised per class by its spatial max (if asked), upsampled to the image."""
    if normalize:
        cam = cam / cam.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
    return F.interpolate(cam[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


@torch.no_grad()
def compute_cams(clf, ds: VOCDataset, device: torch.device) -> list[torch.Tensor]:
    """Raw ReLU CAMs at feature resolution for every training image (full image, one scale)."""
    clf.eval()
    out = []
    for i in tqdm(range(len(ds)), desc="CAMs", leave=False, disable=None):
        x = torch.from_numpy(normalize(ds.image(i)))[None].to(device)
        out.append(clf.cams(x)[0].float().cpu())
    return out


def label_jobs(
    ds: VOCDataset,
    cams: Callable[[int], np.ndarray],
    cfg: Config,
    pred_sal: Callable[[int], np.ndarray | None],
):
    for i in range(len(ds)):
        yield {
            "img": ds.image(i),
            "cam": cams(i),
            "labels": ds.labels(i),
            "pt_sal": ds.saliency(i),
            "pred_sal": pred_sal(i),
            "gt": ds.mask(i),
            "num_classes": ds.num_classes,
            "cam_threshold": cfg.labels.cam_threshold,
            "sal_threshold": cfg.labels.sal_threshold,
            "sal_crf": cfg.labels.sal_crf,
            "sal_binarize": cfg.labels.sal_binarize,
        }


def make_labels(
    ds: VOCDataset,
    cfg: Config,
    cams: Callable[[int], np.ndarray],
    pred_sal: Callable[[int], np.ndarray | None],
    pool: Executor | None,
    desc: str,
) -> tuple[list[np.ndarray], list[np.ndarray], PgtMetrics]:
    """Run the per-image label update over the pool; returns seg labels, saliency targets, pgt metrics."""
    segs, targets = [], []
    conf = None
    jobs = label_jobs(ds, cams, cfg, pred_sal)
    for res in tqdm(
        bounded_map(pool, update_labels_one, jobs), total=len(ds), desc=desc, leave=False, disable=None
    ):
        segs.append(res["seg"])
        targets.append(res["sal_target"])
        conf = res["conf"] if conf is None else conf + res["conf"]
    return segs, targets, pgt_summary(conf)


@torch.no_grad()
def network_cues(
    net: AuxSegNet, ds: VOCDataset, warm_cams: list[torch.Tensor], cfg: Config, device: torch.device
):
    """Per image: the CAM refined by the learned affinity (Eq. 6-7 applied to CAMs) and the refined saliency.

    CAMs come from this stage's cls branch when it exists, else from the warm-up classifier; they are
    max-normalised before the affinity product and, with labels.refined_cam_renorm, again after it (the
    authors' code only before). Without an affinity the CAM is normalised once. Both cues
    are kept at feature resolution and returned as per-image callables that upsample on demand, so a
    VOC-sized train set never holds full-resolution maps for every image at once.
    """
    net.eval()
    has_cls = "cls" in cfg.model.branches
    cams: list[torch.Tensor] = []
    sal_logits: list[torch.Tensor | None] = []
    refined = False
    for i in tqdm(range(len(ds)), desc="cues", leave=False, disable=None):
        x = torch.from_numpy(normalize(ds.image(i)))[None].to(device)
        with autocast(cfg, device):
            out = net(x)
        cam = out["cam"][0].float() if has_cls else warm_cams[i].to(device)
        if "affinity" in out:
            cam = cam / cam.flatten(1).amax(1).clamp_min(1e-5)[:, None, None]
            cam = refine_with_affinity(cam[None], out["affinity"].float())[0]
            refined = True
        cams.append(cam.cpu())
        logit = out.get("sal_ref", out.get("sal"))
        sal_logits.append(None if logit is None else logit.float().cpu())

    renorm = cfg.labels.refined_cam_renorm or not refined

    def cam_of(i: int) -> np.ndarray:
        # Averaging over affinities lowers the peaks; renorm puts them back at 1 before cam_threshold.
        return cam_at(cams[i], ds.image(i).shape[:2], normalize=renorm)

    def sal_at(i: int) -> np.ndarray | None:
        if sal_logits[i] is None:
            return None
        up = F.interpolate(sal_logits[i], size=ds.image(i).shape[:2], mode="bilinear", align_corners=False)
        return torch.sigmoid(up)[0, 0].numpy()

    return cam_of, sal_at
