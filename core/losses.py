"""AuxSegNet losses (Eq. 8): L = l1 * L_cls + l2 * (L_sal1 + L_sal2) + l3 * (L_seg1 + L_seg2).

Dense predictions (feature resolution) and their affinity-refined versions are upsampled bilinearly
(align_corners=False) to the label size before the loss, as the official code does. Pixel losses average
over non-ignored pixels (label 255) and return 0, not NaN, when every pixel is ignored. Only terms whose
outputs are present are computed: an absent branch or constraint contributes no term at all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255


def _upsample(pred: torch.Tensor, size) -> torch.Tensor:
    if tuple(pred.shape[-2:]) == tuple(size):
        return pred
    return F.interpolate(pred, size=size, mode="bilinear", align_corners=False)


def cls_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    # Eq. 8, L_cls: multi-label soft margin between class logits (B, C-1) and multi-hot image labels.
    return F.multilabel_soft_margin_loss(logits, labels.to(logits.dtype))


def sal_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Eq. 8, L_sal1 / L_sal2: BCE-with-logits of (refined) saliency (B, 1, h, w) vs 0/1 labels (B, H, W),
    # 255 ignored.
    logits = _upsample(logits, target.shape[-2:])[:, 0]
    valid = target != IGNORE
    t = torch.where(valid, target, torch.zeros_like(target)).to(logits.dtype)
    per_pixel = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp(min=1)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # Eq. 8, L_seg1 / L_seg2: pixel-wise CE of (refined) seg logits (B, C, h, w) vs labels (B, H, W),
    # 255 ignored.
    logits = _upsample(logits, target.shape[-2:])
    total = F.cross_entropy(logits, target.long(), ignore_index=IGNORE, reduction="sum")
    return total / (target != IGNORE).sum().clamp(min=1)


def auxsegnet_loss(out: dict, targets: dict, weights: dict | None = None):
    """Eq. 8 over the outputs present in ``out``. Returns (total, terms) with terms a dict name -> scalar for
    exactly the present terms among "cls", "sal1", "sal2", "seg1", "seg2". ``weights`` maps "cls", "sal",
    "seg" to l1, l2, l3 (a missing key means 1.0, the official default)."""
    weights = weights or {}
    terms = {}
    if "cls" in out:
        terms["cls"] = cls_loss(out["cls"], targets["labels"])
    if "sal" in out:
        terms["sal1"] = sal_loss(out["sal"], targets["sal"])
    if "sal_ref" in out:
        terms["sal2"] = sal_loss(out["sal_ref"], targets["sal"])
    if "seg" in out:
        terms["seg1"] = seg_loss(out["seg"], targets["seg"])
    if "seg_ref" in out:
        terms["seg2"] = seg_loss(out["seg_ref"], targets["seg"])
    if not terms:
        raise ValueError(f"auxsegnet_loss: no prediction among the outputs {sorted(out)}")
    group = {"cls": "cls", "sal1": "sal", "sal2": "sal", "seg1": "seg", "seg2": "seg"}
    total = sum(float(weights.get(group[name], 1.0)) * value for name, value in terms.items())
    return total, terms
