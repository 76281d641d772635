"""AuxSegNet (Xu et al., ICCV 2021): shared ResNet38 + cls / sal / seg branches + cross-task affinity.

    F = ResNet38(x)                                               (B, 4096w, h, w), h = ceil(H / 8)
    cls:  fc8(GAP(Dropout2d(F)))                                  (B, C-1)        CAM = relu(fc8 * F)
          (the released network returns fc8 * F raw and its label update, gen_pgt.py, applies the ReLU
          before anything else reads it: the same CAM)
    seg:  relu(seg_conv1 d6) -> relu(seg_conv2 d12) -> [affinity] -> relu(seg_conv3 d18) -> seg_conv4 1x1
    sal:  the same with sal_conv*, 1 output channel
    affinity "none":       no attention modules
             "seg":        seg_att affinity A_seg; F_seg += seg_W(A_seg seg_g(F_seg)); A = A_seg refines
             "cross_task": the same for sal (sal_att, sal_g, sal_W) + SA fusion (cross_att); A = A_CT refines
    constraints: which predictions A refines (seg_ref, sal_ref) - Table 4's rows.

Module names follow the official checkpoint (fc8, seg_conv1..4, sal_conv1..4, seg_att, sal_att, seg_g,
seg_W, sal_g, sal_W, cross_att); the backbone sits under ``backbone.`` where the released SegNet has its
ResNet38 tensors at the top level (conv1a, b2.., bn7). :meth:`AuxSegNet.load_official` adds that prefix
and loads strictly (config ``model.init_checkpoint``): a released checkpoint, as train_AuxAff.py saves it,
loads in one call into the full width-1.0 net. A disabled branch or module is not built (no parameters, no
compute).
See :mod:`core.model.affinity` for the HW x HW memory budget (cross-task keeps at most 7 HW x HW maps per
image for backward: 76 MiB at a 321 crop, 448 MiB at 512).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from core.ablation import BRANCHES, CONSTRAINTS, check_config

from .affinity import NonLocal, cross_task, make_sa_fusion, propagate_features, refine_with_affinity
from .backbone import BLOCK_NAMES, ResNet38, read_state_dict


def head_width(width: float, channels: int = 0) -> int:
    """Channels D of the seg / sal heads: `channels` when given, else 128 at width 1.0 scaled with width
    (never below 16)."""
    return channels if channels > 0 else max(16, round(128 * width))


def head_seed(base: int, name: str) -> int:
    """The seed of one head's initial weights: a function of the trial's torch seed and the head's name."""
    digest = hashlib.sha256(f"{base}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _xavier(m: nn.Conv2d):
    nn.init.xavier_uniform_(m.weight)
    if m.bias is not None:
        nn.init.zeros_(m.bias)


def _param_groups(
    named_params, head_prefixes, lr, head_lr_mult, weight_decay, fusion_prefixes=(), fusion_lr_mult=None
):
    """Backbone at lr, heads at head_lr_mult * lr; weight decay on conv weights only (biases and BN affine
    parameters, i.e. every tensor with < 2 dims, are not decayed). Frozen parameters are left out.

    Modules under ``fusion_prefixes`` get their own groups ("fusion", "fusion_no_decay") at
    fusion_lr_mult * lr when that is given and differs from head_lr_mult; otherwise they count as heads.
    """
    split = fusion_lr_mult is not None and fusion_lr_mult != head_lr_mult
    mult = {"backbone": 1.0, "head": head_lr_mult, "fusion": fusion_lr_mult}
    groups = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        top = name.split(".")[0]
        role = (
            "fusion" if split and top in fusion_prefixes else "head" if top in head_prefixes else "backbone"
        )
        decay = p.ndim > 1
        key = role + ("" if decay else "_no_decay")
        if key not in groups:
            groups[key] = {
                "name": key,
                "params": [],
                "lr": lr * mult[role],
                "weight_decay": weight_decay if decay else 0.0,
            }
        groups[key]["params"].append(p)
    order = ["backbone", "backbone_no_decay", "head", "head_no_decay", "fusion", "fusion_no_decay"]
    return [groups[k] for k in order if k in groups]


class Classifier(nn.Module):
    """Classification warm-up net: backbone + Dropout2d + GAP + fc8 (same names as in AuxSegNet)."""

    def __init__(
        self,
        num_classes: int = 21,
        width: float = 1.0,
        dropout: float = 0.5,
        freeze_bn: bool = False,
        block_dropout: bool = True,
    ):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes, self.width = num_classes, float(width)
        self.backbone = ResNet38(width, block_dropout=block_dropout, freeze_bn=freeze_bn)
        self.dropout = nn.Dropout2d(dropout)
        self.fc8 = nn.Conv2d(self.backbone.out_channels, num_classes - 1, 1, bias=False)
        _xavier(self.fc8)

    def classify(self, feat):
        return self.fc8(F.adaptive_avg_pool2d(self.dropout(feat), 1)).flatten(1)

    def cam_from_features(self, feat, normalize=False):
        cam = F.relu(F.conv2d(feat, self.fc8.weight))
        return normalize_cam(cam) if normalize else cam

    def forward(self, x):
        return self.classify(self.backbone(x))

    def cams(self, x, normalize: bool = False):
        """ReLU CAMs (B, C-1, h, w) from fc8 applied to F (no dropout); per-class max-normalised if asked."""
        return self.cam_from_features(self.backbone(x), normalize)

    def param_groups(self, lr, head_lr_mult=10.0, weight_decay=1e-5):
        return _param_groups(self.named_parameters(), {"fc8"}, lr, head_lr_mult, weight_decay)


def normalize_cam(cam: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Each (image, class) map divided by its spatial max (maps in [0, 1]; all-zero maps stay 0)."""
    return cam / (cam.amax(dim=(-2, -1), keepdim=True) + eps)


class AuxSegNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 21,
        width: float = 1.0,
        branches=BRANCHES,
        affinity: str = "cross_task",
        constraints=CONSTRAINTS,
        dropout: float = 0.5,
        freeze_bn: bool = False,
        block_dropout: bool = True,
        dilations: tuple[int, int, int] = (6, 12, 18),
        head_channels: int = 0,
        nonlocal_zero_init: bool = False,
        head_streams: bool = False,
        nonlocal_tied_init: bool = False,
        affinity_row_norm: bool = False,
    ):
        super().__init__()
        self.branches, self.affinity, self.constraints = check_config(branches, affinity, constraints)
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        self.num_classes, self.width = num_classes, float(width)
        self.nonlocal_zero_init, self.head_streams = nonlocal_zero_init, head_streams
        self.nonlocal_tied_init, self.affinity_row_norm = nonlocal_tied_init, affinity_row_norm
        self.backbone = ResNet38(width, block_dropout=block_dropout, freeze_bn=freeze_bn)
        K, D = self.backbone.out_channels, head_width(width, head_channels)
        self.head_channels = D
        # The heads' constructors draw default weights that reset_head_parameters replaces: give the global
        # stream back afterwards, so what is drawn after the net (dropout masks) does not depend on the row.
        stream = torch.random.get_rng_state() if head_streams else None
        if "cls" in self.branches:
            self.dropout = nn.Dropout2d(dropout)
            self.fc8 = nn.Conv2d(K, num_classes - 1, 1, bias=False)
        for task, out in (("seg", num_classes), ("sal", 1)):
            if task not in self.branches:
                continue
            # Rates 6, 12, 18 suit 41x41 feature maps (321 crops); on small CPU-preset maps most taps of a
            # rate-18 conv fall into the zero padding, so the rates are a constructor argument.
            d1, d2, d3 = dilations
            setattr(self, f"{task}_conv1", nn.Conv2d(K, D, 3, padding=d1, dilation=d1))
            setattr(self, f"{task}_conv2", nn.Conv2d(D, D, 3, padding=d2, dilation=d2))
            setattr(self, f"{task}_conv3", nn.Conv2d(D, D, 3, padding=d3, dilation=d3))
            setattr(self, f"{task}_conv4", nn.Conv2d(D, out, 1, bias=False))
        if self.affinity in ("seg", "cross_task"):
            self.seg_att = NonLocal(D)
            self.seg_g, self.seg_W = nn.Conv2d(D, D, 1), nn.Conv2d(D, D, 1)
        if self.affinity == "cross_task":
            self.sal_att = NonLocal(D)
            self.sal_g, self.sal_W = nn.Conv2d(D, D, 1), nn.Conv2d(D, D, 1)
            self.cross_att = make_sa_fusion()
        if stream is not None:
            torch.random.set_rng_state(stream)
        self.reset_head_parameters()

    HEADS = (
        "fc8",
        "seg_conv1",
        "seg_conv2",
        "seg_conv3",
        "seg_conv4",
        "sal_conv1",
        "sal_conv2",
        "sal_conv3",
        "sal_conv4",
        "seg_att",
        "sal_att",
        "seg_g",
        "seg_W",
        "sal_g",
        "sal_W",
        "cross_att",
    )

    def reset_head_parameters(self):
        """As the official code: Xavier-uniform weights and zero biases for fc8 and the seg / sal convs;
        PyTorch's default initialisation for the attention modules (``*_att``, ``*_g``, ``*_W``,
        cross_att); seg_W and sal_W at zero with nonlocal_zero_init.

        With head_streams, each head draws from its own random stream, seeded by torch's current seed (the
        trial's) and the head's name, and the global stream is left as it was: a head starts from the same
        weights in every ablation row of a seed, whichever other heads the row has. Common random numbers:
        a paired Δ between rows then measures the change of configuration, not also another draw.
        """
        base = torch.initial_seed()
        for name in self.HEADS:
            m = getattr(self, name, None)
            if m is None:
                continue
            with torch.random.fork_rng(devices=[], enabled=self.head_streams):
                if self.head_streams:
                    torch.manual_seed(head_seed(base, name))
                if isinstance(m, NonLocal):
                    m.reset_parameters(tied=self.nonlocal_tied_init)
                    continue
                for conv in m.modules():
                    if not isinstance(conv, nn.Conv2d):
                        continue
                    if name == "fc8" or "_conv" in name:
                        _xavier(conv)
                    else:
                        conv.reset_parameters()
                if self.nonlocal_zero_init and name in (
                    "seg_W",
                    "sal_W",
                ):  # Eq. 2-3's update starts as identity
                    nn.init.zeros_(m.weight)
                    nn.init.zeros_(m.bias)

    def _task_features(self, task, feat):
        f = F.relu(getattr(self, f"{task}_conv1")(feat))
        return F.relu(getattr(self, f"{task}_conv2")(f))

    def _task_predict(self, task, f):
        return getattr(self, f"{task}_conv4")(F.relu(getattr(self, f"{task}_conv3")(f)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, 3, H, W) -> logits at feature resolution h = ceil(H / 8): seg (B, C, h, w); with the
        branches on, cls (B, C-1) and, in eval mode, cam (B, C-1, h, w); sal (B, 1, h, w); with an
        affinity, affinity A (B, hw, hw) and seg_ref (and sal_ref with the sal constraint) refined by A.

        cam = relu(fc8 * F): the released network returns fc8 * F before the ReLU, and gen_pgt.py applies
        the ReLU to it first thing, so both label updates read the same CAM."""
        feat = self.backbone(x)
        out: dict[str, torch.Tensor] = {}
        if "cls" in self.branches:
            out["cls"] = self.fc8(F.adaptive_avg_pool2d(self.dropout(feat), 1)).flatten(1)
            if not self.training:
                out["cam"] = F.relu(F.conv2d(feat, self.fc8.weight))
        f_seg = self._task_features("seg", feat)
        f_sal = self._task_features("sal", feat) if "sal" in self.branches else None
        A = None
        if self.affinity == "seg":
            A = self.seg_att(f_seg)
            f_seg = propagate_features(f_seg, A, self.seg_g, self.seg_W)
        elif self.affinity == "cross_task":
            f_seg, f_sal, A = cross_task(
                f_seg,
                f_sal,
                self.seg_att,
                self.sal_att,
                self.cross_att,
                self.seg_g,
                self.seg_W,
                self.sal_g,
                self.sal_W,
                row_norm=self.affinity_row_norm,
            )
        out["seg"] = self._task_predict("seg", f_seg)
        if A is not None:
            out["seg_ref"] = refine_with_affinity(out["seg"], A)
            out["affinity"] = A
        if f_sal is not None:
            out["sal"] = self._task_predict("sal", f_sal)
            if "sal" in self.constraints:
                out["sal_ref"] = refine_with_affinity(out["sal"], A)
        return out

    def cams(self, x: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """ReLU CAMs (B, C-1, h, w) = relu(fc8 applied to F) (no dropout); per-class max-normalised if
        asked."""
        if "cls" not in self.branches:
            raise ValueError("cams() needs the cls branch")
        cam = F.relu(F.conv2d(self.backbone(x), self.fc8.weight))
        return normalize_cam(cam) if normalize else cam

    def param_groups(self, lr, head_lr_mult=10.0, weight_decay=1e-5, fusion_lr_mult=None):
        """Optimiser groups: backbone at lr, every head (fc8, seg*, sal*, attention, cross_att) at
        head_lr_mult * lr; weight decay on conv weights only (no decay on biases / BN affine). With
        ``fusion_lr_mult`` (e.g. 1.0, as the authors' code: its 10x goes to names containing seg, sal or
        fc8), cross_att gets its own groups at fusion_lr_mult * lr."""
        return _param_groups(
            self.named_parameters(),
            set(self.HEADS),
            lr,
            head_lr_mult,
            weight_decay,
            fusion_prefixes={"cross_att"},
            fusion_lr_mult=fusion_lr_mult,
        )

    @torch.no_grad()
    def load_from_classifier(self, clf: Classifier):
        """Copy a warmed-up Classifier's backbone (and fc8 when the cls branch is on) into this net."""
        if clf.width != self.width or clf.num_classes != self.num_classes:
            raise ValueError(
                f"classifier (width {clf.width}, {clf.num_classes} classes) does not match the "
                f"net (width {self.width}, {self.num_classes} classes)"
            )
        self.backbone.load_state_dict(clf.backbone.state_dict(), strict=True)
        if "cls" in self.branches:
            self.fc8.weight.copy_(clf.fc8.weight)
        return self

    @torch.no_grad()
    def load_official(self, source) -> AuxSegNet:
        """Load a whole-network state dict (a path or a mapping) strictly, in one call; returns self.

        Takes the authors' format, ``SegNet.state_dict()`` as their train_AuxAff.py saves it (ResNet38
        tensors at the top level: ``conv1a.weight``, ``b2.bn_branch2a.weight``, .., ``bn7.*``; heads named
        as here), or this project's ``AuxSegNet.state_dict()`` (backbone under ``backbone.``). A DataParallel
        ``module.`` prefix and a {"state_dict" | "model" | "net": ...} wrapper are removed. A released
        checkpoint fits the full net at width 1.0 (all branches, cross-task affinity: what the ``paper``
        preset builds). A BN ``num_batches_tracked`` the file lacks (torch < 0.4.1) keeps its value; any
        other missing, unexpected or mis-shaped tensor is a one-line ValueError naming it as the checkpoint
        spells it (and the file, given a path). A missing file is a FileNotFoundError.
        """
        where = "" if isinstance(source, Mapping) else f"{os.fspath(source)}: "
        sd = read_state_dict(source, "AuxSegNet checkpoint", "the network's .pth")
        if sd and all(k.startswith("module.") for k in sd):
            sd = {k[len("module.") :]: v for k, v in sd.items()}
        official = not any(k.startswith("backbone.") for k in sd)

        def ours(k: str) -> str:
            return f"backbone.{k}" if official and k.split(".")[0] in BLOCK_NAMES else k

        def theirs(k: str) -> str:
            return k[len("backbone.") :] if official and k.startswith("backbone.") else k

        expected = self.state_dict()
        fmt = "the authors' SegNet" if official else "AuxSegNet"
        net = (
            f"this net (width {self.width:g}, {self.num_classes} classes, {'+'.join(self.branches)}, "
            f"affinity {self.affinity})"
        )
        renamed = {}
        for k, v in sd.items():
            if ours(k) not in expected:
                raise ValueError(
                    f"{where}unexpected tensor {k!r} {tuple(v.shape)} in the checkpoint ({fmt} format): "
                    f"{net} has no such tensor"
                )
            renamed[ours(k)] = v
        for k, ref in expected.items():
            if k not in renamed:
                if k.endswith("num_batches_tracked"):
                    renamed[k] = ref
                    continue
                raise ValueError(
                    f"{where}missing tensor {theirs(k)!r} {tuple(ref.shape)} in the checkpoint ({fmt} "
                    f"format), which {net} needs"
                )
            if tuple(renamed[k].shape) != tuple(ref.shape):
                raise ValueError(
                    f"{where}tensor {theirs(k)!r} has shape {tuple(renamed[k].shape)} in the checkpoint, "
                    f"{net} expects {tuple(ref.shape)}"
                )
        self.load_state_dict(renamed, strict=True)
        return self
