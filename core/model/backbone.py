"""ResNet38 backbone (Wu et al., "Wider or Deeper", as used by AffinityNet / AuxSegNet), output stride 8.

Layout (channels at width 1.0; every count is scaled by ``width``):

    conv1a  3x3, 3 -> 64                                           stride 1
    b2, b2_1, b2_2          pre-act basic blocks  -> 128           stride 2 at b2
    b3, b3_1, b3_2          pre-act basic blocks  -> 256           stride 2 at b3
    b4, b4_1 .. b4_5        pre-act basic blocks  -> 512           stride 2 at b4   (output stride 8)
    b5, b5_1, b5_2          basic blocks, mid 512 -> 1024          dilation 2 (b5: first conv dilation 1)
    b6                      bottleneck 1024 -> 512/1024 -> 2048    dilation 4, Dropout2d 0.3
    b7                      bottleneck 2048 -> 1024/2048 -> 4096   dilation 4, Dropout2d 0.5
    F = relu(bn7(x))                                                4096 channels, H/8 x W/8 (rounded up)

Tensor names are exactly those of the converted ImageNet checkpoint (``bn_branch2a``, ``conv_branch2a``,
``bn_branch2b1``, ``conv_branch2b1``, ``bn_branch2b2``, ``conv_branch2b2``, ``conv_branch1``, ``bn7``), so a
user's ``.pth`` loads strictly at width 1.0 with :func:`load_backbone`. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def scaled(channels: int, width: float, minimum: int = 8) -> int:
    """Channel count at a width multiplier: round(channels * width), never below ``minimum``."""
    return max(minimum, round(channels * width))


class ResBlock(nn.Module):
    """Pre-activation basic block: bn-relu -> conv3x3 (stride, first_dilation) -> bn-relu -> conv3x3
    (dilation).

    The shortcut is a 1x1 conv (``conv_branch1``) applied to the bn-relu'd input where the full-width
    block changes shape (``projection``), identity otherwise.
    """

    def __init__(self, cin, cmid, cout, stride=1, first_dilation=None, dilation=1, projection=None):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.projection = (cin != cout or stride != 1) if projection is None else projection
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(
            cin, cmid, 3, stride, padding=first_dilation, dilation=first_dilation, bias=False
        )
        self.bn_branch2b1 = nn.BatchNorm2d(cmid)
        self.conv_branch2b1 = nn.Conv2d(cmid, cout, 3, padding=dilation, dilation=dilation, bias=False)
        if self.projection:
            self.conv_branch1 = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        y = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(y) if self.projection else x
        y = self.conv_branch2a(y)
        y = self.conv_branch2b1(F.relu(self.bn_branch2b1(y)))
        return shortcut + y


class ResBlockBottleneck(nn.Module):
    """Pre-activation bottleneck (b6, b7): 1x1 -> 3x3 (dilation) -> 1x1, Dropout2d after the inner
    bn-relus."""

    def __init__(self, cin, c1, c2, cout, dilation=1, dropout=0.0):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(cin)
        self.conv_branch2a = nn.Conv2d(cin, c1, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(c1)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(c1, c2, 3, padding=dilation, dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(c2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(c2, cout, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x):
        y = F.relu(self.bn_branch2a(x))
        shortcut = self.conv_branch1(y)
        y = self.conv_branch2a(y)
        y = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(y))))
        y = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(y))))
        return shortcut + y


class ResNet38(nn.Module):
    """ResNet38 at a width multiplier. ``forward(x)`` returns F = relu(bn7(.)) with ``out_channels`` channels.

    Args:
        width: channel multiplier (1.0 = the paper's network, 105.07M parameters).
        block_dropout: keep the original Dropout2d(0.3) in b6 and Dropout2d(0.5) in b7 (train mode only).
        freeze_bn: keep every BatchNorm in eval mode with frozen affine parameters and freeze conv1a, as
            the authors' code does when fine-tuning from ImageNet with batch 4. Off by default (training
            from scratch at small widths needs BN statistics).
    """

    def __init__(self, width: float = 1.0, block_dropout: bool = True, freeze_bn: bool = False):
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        self.width = float(width)
        self.freeze_bn = freeze_bn

        def c(n: int) -> int:
            return scaled(n, width)

        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        self.b2 = ResBlock(c(64), c(128), c(128), stride=2, projection=True)
        self.b2_1 = ResBlock(c(128), c(128), c(128), projection=False)
        self.b2_2 = ResBlock(c(128), c(128), c(128), projection=False)
        self.b3 = ResBlock(c(128), c(256), c(256), stride=2, projection=True)
        self.b3_1 = ResBlock(c(256), c(256), c(256), projection=False)
        self.b3_2 = ResBlock(c(256), c(256), c(256), projection=False)
        self.b4 = ResBlock(c(256), c(512), c(512), stride=2, projection=True)
        for i in range(1, 6):
            setattr(self, f"b4_{i}", ResBlock(c(512), c(512), c(512), projection=False))
        self.b5 = ResBlock(c(512), c(512), c(1024), first_dilation=1, dilation=2, projection=True)
        self.b5_1 = ResBlock(c(1024), c(512), c(1024), dilation=2, projection=False)
        self.b5_2 = ResBlock(c(1024), c(512), c(1024), dilation=2, projection=False)
        self.b6 = ResBlockBottleneck(
            c(1024), c(512), c(1024), c(2048), dilation=4, dropout=0.3 if block_dropout else 0.0
        )
        self.b7 = ResBlockBottleneck(
            c(2048), c(1024), c(2048), c(4096), dilation=4, dropout=0.5 if block_dropout else 0.0
        )
        self.bn7 = nn.BatchNorm2d(c(4096))
        self.out_channels = c(4096)
        self.blocks = (
            ["b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4"]
            + [f"b4_{i}" for i in range(1, 6)]
            + ["b5", "b5_1", "b5_2", "b6", "b7"]
        )
        if freeze_bn:
            self.conv1a.weight.requires_grad_(False)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.requires_grad_(False)
                    m.bias.requires_grad_(False)

    def forward(self, x):
        x = self.conv1a(x)
        for name in self.blocks:
            x = getattr(self, name)(x)
        return F.relu(self.bn7(x))

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.eval()
        return self


# ----------------------------------------------------------------------------------------------- loading

BLOCK_NAMES = {
    "conv1a",
    "bn7",
    "b2",
    "b2_1",
    "b2_2",
    "b3",
    "b3_1",
    "b3_2",
    "b4",
    "b5",
    "b5_1",
    "b5_2",
    "b6",
    "b7",
} | {f"b4_{i}" for i in range(1, 6)}


def read_state_dict(
    source, what: str = "backbone checkpoint", place: str = "the converted ImageNet ResNet38 .pth"
) -> dict:
    """A state dict from a mapping or a ``torch.load``-able path (one-line errors naming ``what``)."""
    if isinstance(source, Mapping):
        sd = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{what} not found: {path!r} (nothing is downloaded; place {place} there)"
            )
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - one line for the user
            raise ValueError(
                f"cannot read {what} {path!r}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            ) from None
        if not isinstance(sd, Mapping):
            raise ValueError(f"{what} {path!r} holds a {type(sd).__name__}, not a state dict")  # noqa: TRY004
        sd = dict(sd)
    for wrapper in ("state_dict", "model", "net"):  # common training-checkpoint wrappers
        if wrapper in sd and isinstance(sd[wrapper], Mapping) and not torch.is_tensor(sd[wrapper]):
            sd = dict(sd[wrapper])
            break
    return sd


def _strip_prefix(sd: dict) -> dict:
    """Find the common prefix in front of ``conv1a.weight`` (e.g. "module.", "backbone.") and strip it;
    keys outside that prefix (heads, classifier fc8, linear1000, ...) are dropped."""
    anchors = [k for k in sd if k == "conv1a.weight" or k.endswith(".conv1a.weight")]
    if not anchors:
        raise ValueError(
            "backbone checkpoint has no 'conv1a.weight' (with or without a prefix): "
            "not a ResNet38 checkpoint in the converted AffinityNet format"
        )
    if len(anchors) > 1:
        raise ValueError(f"backbone checkpoint is ambiguous: several ResNet38 copies {sorted(anchors)}")
    prefix = anchors[0][: -len("conv1a.weight")]
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def backbone_state_dict_from(source, expected: Mapping[str, torch.Tensor]) -> dict:
    """Read ``source`` (path or state dict), strip a prefix, keep backbone keys, and check them against
    ``expected`` (name -> tensor). Raises a one-line ValueError naming the first bad tensor."""
    sd = _strip_prefix(read_state_dict(source))
    out = {}
    for k, v in sd.items():
        if k.split(".")[0] not in BLOCK_NAMES:
            continue  # classifier / head tensors: ignored
        if k not in expected:
            raise ValueError(f"unexpected backbone tensor {k!r} with shape {tuple(v.shape)} in checkpoint")
        out[k] = v
    for k, ref in expected.items():
        if k not in out:
            if k.endswith("num_batches_tracked"):  # absent from checkpoints converted before torch 0.4
                out[k] = torch.zeros_like(ref)
                continue
            raise ValueError(f"missing backbone tensor {k!r}: expected shape {tuple(ref.shape)}, got nothing")
        if tuple(out[k].shape) != tuple(ref.shape):
            raise ValueError(
                f"backbone tensor {k!r}: expected shape {tuple(ref.shape)}, got {tuple(out[k].shape)}"
            )
    return out


def load_backbone(source, into: nn.Module | None = None) -> ResNet38:
    """Strictly load a ResNet38 checkpoint (path or state dict) in the converted-ImageNet format: ImageNet
    weights into a width-1.0 backbone, or a `core.pretrain` checkpoint into a backbone of its width.

    ``into`` may be a ResNet38, or any module with a ``.backbone`` ResNet38 (AuxSegNet, Classifier); when
    omitted, a new width-1.0 ResNet38 is built. Prefixes like "module." / "backbone." are stripped and
    non-backbone tensors (fc8, linear1000, heads) ignored. A missing, unexpected or mis-shaped backbone
    tensor raises a one-line ValueError; a missing file raises FileNotFoundError. Returns the backbone.
    """
    backbone = ResNet38(1.0) if into is None else (into if isinstance(into, ResNet38) else into.backbone)
    if not isinstance(backbone, ResNet38):
        raise ValueError(f"load_backbone: {type(into).__name__} has no ResNet38 backbone")  # noqa: TRY004
    sd = backbone_state_dict_from(source, backbone.state_dict())
    backbone.load_state_dict(sd, strict=True)
    return backbone
