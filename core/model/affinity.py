"""Cross-task affinity learning (Sec. 3.2, Eq. 2-7).

    [F_sal_out, A_sal] = NonLocal(F_sal_in)                     (Eq. 2)
    [F_seg_out, A_seg] = NonLocal(F_seg_in)                     (Eq. 3)
    [W1, W2] = SA(CONCAT(A_sal, A_seg))                         (Eq. 4)
    A_CT = W1 * A_sal + W2 * A_seg                              (Eq. 5)
    P_ref(i) = sum_j A(i, j) P(j)                               (Eq. 6-7, on logits)

NonLocal, as the official implementation wires it: A = softmax_row(theta(F) phi(F)^T) (HW x HW) from the
task's ``*_att`` module, and F_out = F_in + W(A g(F_in)) with g, W the task's ``seg_g``/``seg_W`` (or
``sal_g``/``sal_W``) 1x1 convs. Each task's features are propagated with its *own* affinity; A_CT only
refines the predictions (Eq. 6-7). The official ``NLBlockND`` also builds a ``g`` conv and a ``W_z``
conv + BatchNorm, but its forward returns only the affinity: those tensors are in the official
checkpoint and carry no signal. We build them so the checkpoint loads strictly, and freeze them so no
optimiser touches them. The attention convs keep PyTorch's default initialisation, as in the official
code (only fc8 and the seg/sal convs are Xavier-initialised there).

SA = conv3x3(2->2, no bias) -> ReLU -> conv1x1(2->2) -> softmax over the 2 channels, applied to the
HW x HW maps as a 2-channel image. The official code stacks the two maps as [A_seg, A_sal] (the paper
writes CONCAT(A_sal, A_seg)); we use the official order, so the official ``cross_att`` weights mean what
they were trained to mean.

Row sums. A_seg and A_sal are row-stochastic (softmax). Eq. 5 mixes them *entry-wise* (W1, W2 are
HW x HW maps), so A_CT is non-negative and each entry lies between the two affinities' entries, but a row
of A_CT sums to exactly 1 only where W1 is constant along that row; in general the row sum is
1 + sum_j W1(i,j) (A_sal(i,j) - A_seg(i,j)), within [sum_j min, sum_j max] of the two rows (so in (0, 2)).
The official code uses A_CT as mixed (rows sum to about 0.96-1.13 on the released network), in both
refinements and in its label update; ``row_norm`` (config ``model.affinity_row_norm``) divides each row by
its sum instead (see :func:`cross_task_affinity`).

Memory. An HW x HW float32 map at a 321x321 crop (41x41 = 1681 positions) is 1681^2 * 4 B = 10.8 MiB per
image; at 512x512 (64x64 = 4096 positions) 64 MiB. What the math keeps for backward, in HW x HW maps
per image:
    seg affinity:        A_seg                                              1 map
    cross-task:          [A_seg, A_sal] (one (2,HW,HW) softmax output)      2
                         ReLU(conv3x3) = input of the 1x1 conv              2
                         W1 (W2 = 1 - W1 is never materialised)             1
                         A_CT (and, with row_norm, A_CT before it)          1-2 -> 6-7 maps
so cross-task keeps at most 75.5 MiB per image at 321 (302 MiB for batch 4) and 448 MiB at 512 (1.75 GiB
for batch 4); transients add at most ~2 maps in forward (the Q K^T logits before the softmax) and a few
map-sized gradients in backward. A straightforward implementation keeps 9 (stack copy of [A_seg, A_sal],
pre-ReLU output, both softmax channels). The savings come from:
  * both affinities come out of one batched softmax as a (B, 2, HW, HW) tensor, which *is* the SA input;
  * softmax over 2 channels == sigmoid of the channel difference, so the 1x1 conv is evaluated as one
    output channel with weights (w0 - w1), bias (b0 - b1) (the parameters stay the official (2,2,1,1)
    ``cross_att.2``), and A_CT = lerp(A_sal, A_seg, W) = W A_seg + (1 - W) A_sal in one fused kernel;
  * in-place ReLU; transposes are views (``A.mT``) handed to matmul, never copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NonLocal(nn.Module):
    """The affinity half of an embedded-Gaussian non-local block (Eq. 2-3): ``forward(x) -> A``,
    A (B, HW, HW).

    ``g`` and ``W_z`` exist only so the official checkpoint loads (see the module docstring); they are
    frozen and never used. The feature update F_out = F_in + W(A g(F_in)) is :func:`propagate_features`.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.g = nn.Conv2d(channels, channels, 1)
        self.theta = nn.Conv2d(channels, channels, 1)
        self.phi = nn.Conv2d(channels, channels, 1)
        self.W_z = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.g.requires_grad_(False)
        self.W_z.requires_grad_(False)

    def reset_parameters(self, tied: bool = False):
        """PyTorch's default, as the official NLBlockND; with ``tied`` (model.nonlocal_tied_init), phi then
        takes theta's weights, so A = softmax_row(z_i . z_j), z = theta(F), starts as a similarity of the
        features rather than a random bilinear form (the same draws either way)."""
        for conv in (self.g, self.theta, self.phi, self.W_z[0]):
            conv.reset_parameters()
        nn.init.zeros_(self.W_z[1].weight)
        nn.init.zeros_(self.W_z[1].bias)
        if tied:
            with torch.no_grad():
                self.phi.weight.copy_(self.theta.weight)
                self.phi.bias.copy_(self.theta.bias)

    def query_key(self, x):
        """Q (B, HW, D) and K (B, D, HW) (both from 1x1 convs; the reshapes are views)."""
        return self.theta(x).flatten(2).mT, self.phi(x).flatten(2)

    def forward(self, x):
        q, k = self.query_key(x)
        return torch.softmax(torch.bmm(q, k), dim=-1)


def propagate_features(f: torch.Tensor, A: torch.Tensor, g: nn.Conv2d, W: nn.Conv2d) -> torch.Tensor:
    """Eq. 2-3 feature output: F_out = F_in + W(A g(F_in)), A the task's own affinity (official wiring)."""
    return f + W(propagate(A, g(f)))


def propagate(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y(:, i) = sum_j A(i, j) x(:, j) for x (B, C, h, w) and A (B, hw, hw); no copy of A is made."""
    b, c, h, w = x.shape
    return torch.matmul(x.reshape(b, c, h * w), A.mT).view(b, c, h, w)


def refine_with_affinity(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7: P_ref[:, :, i] = sum_j A[i, j] P[:, :, j]; P (B, C, h, w) logits, A (B, hw, hw) affinity
    (A_seg, whose rows sum to 1, or A_CT, whose rows sum to about 1). Applied to logits, as the authors do."""
    if A.shape[-1] != P.shape[-2] * P.shape[-1] or A.shape[-2] != A.shape[-1]:
        raise ValueError(f"affinity {tuple(A.shape)} does not match prediction {tuple(P.shape)}")
    return propagate(A, P)


def make_sa_fusion() -> nn.Sequential:
    """SA of Eq. 4: conv3x3(2->2, no bias) -> ReLU -> conv1x1(2->2) (softmax applied in
    :func:`cross_task_affinity`)."""
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Conv2d(2, 2, 1))


def sa_weights(A2: torch.Tensor, sa: nn.Sequential) -> torch.Tensor:
    """Eq. 4: the SA weight of channel 0 of A2 (B, 2, HW, HW); channel 1 gets 1 minus it (softmax over 2).

    softmax([z0, z1])[0] = sigmoid(z0 - z1) and z0 - z1 is a 1x1 conv with weight w0 - w1, bias b0 - b1:
    one HW x HW map instead of two logits and two weights.
    """
    # oneDNN's CPU conv over a 2-channel, HW x HW "image" in NCHW is 10x slower than in channels_last
    # (default preset, batch 8, 144 positions: Eq. 4-5 forward + backward 33.4 ms vs 3.4 ms, same values
    # to 1e-8); the copy adds one 2-channel map, which matters only at GPU sizes, where it is not made.
    x = A2.contiguous(memory_format=torch.channels_last) if A2.device.type == "cpu" else A2
    h = torch.relu_(sa[0](x))
    w, b = sa[2].weight, sa[2].bias
    return torch.sigmoid(F.conv2d(h, w[0:1] - w[1:2], b[0:1] - b[1:2]))[:, 0]


def cross_task_affinity(A2: torch.Tensor, sa: nn.Sequential, row_norm: bool = False):
    """Eq. 4-5 on A2 = [A_seg, A_sal] (B, 2, HW, HW), the official order: returns (A_CT, W),
    A_CT = W A2[:, 0] + (1 - W) A2[:, 1], as the released network uses it; with ``row_norm`` each row is
    divided by its sum.

    Eq. 5 mixes entry by entry, so a row of A_CT does not sum to exactly 1. The released code leaves it so;
    row_norm makes A_CT a weighted average (the CAM scale kept for the 0.2 threshold) at the cost of one
    more HW x HW map and a departure from the authors' outputs (6-11 % relative on A_CT at 321 px).
    """
    W = sa_weights(A2, sa).to(A2.dtype)  # under bf16 autocast the conv gives bf16, the softmax fp32
    A_ct = torch.lerp(A2[:, 1], A2[:, 0], W)  # Eq. 5
    return (A_ct / A_ct.sum(-1, keepdim=True) if row_norm else A_ct), W


def cross_task(
    f_seg,
    f_sal,
    seg_att: NonLocal,
    sal_att: NonLocal,
    cross_att: nn.Sequential,
    seg_g: nn.Conv2d,
    seg_W: nn.Conv2d,
    sal_g: nn.Conv2d,
    sal_W: nn.Conv2d,
    row_norm: bool = False,
):
    """The cross-task affinity module (Fig. 3, Eq. 2-5). Returns (F_seg_out, F_sal_out, A_CT); ``row_norm``
    as in :func:`cross_task_affinity`.

    Both task affinities come from one batched product and softmax, giving the SA input [A_seg, A_sal]
    without a concatenation copy. Each task's features are propagated with its own affinity (Eq. 2-3).
    """
    q_sal, k_sal = sal_att.query_key(f_sal)
    q_seg, k_seg = seg_att.query_key(f_seg)
    A2 = torch.softmax(torch.matmul(torch.stack([q_seg, q_sal], 1), torch.stack([k_seg, k_sal], 1)), dim=-1)
    A_seg, A_sal = A2[:, 0], A2[:, 1]
    A_ct, _ = cross_task_affinity(A2, cross_att, row_norm)
    seg_out = propagate_features(f_seg, A_seg, seg_g, seg_W)
    sal_out = propagate_features(f_sal, A_sal, sal_g, sal_W)
    return seg_out, sal_out, A_ct
