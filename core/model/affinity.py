"""Cross-task affinity learning (Sec. 3.2, Eq. 2-7).

    [F_sal_out, A_sal] = NonLocal(F_sal_in)                     (Eq. 2)
    [F_seg_out, A_seg] = NonLocal(F_seg_in)                     (Eq. 3)
    [W1, W2] = SA(CONCAT(A_sal, A_seg))                         (Eq. 4)
    A_CT = W1 * A_sal + W2 * A_seg                              (Eq. 5)
    P_ref(i) = sum_j A(i, j) P(j)                               (Eq. 6-7, on logits)

NonLocal: Q = theta(F), K = phi(F), V = g(F) (1x1 convs D->D), A = softmax_row(Q K^T) (HW x HW),
F_out = F_in + W_z(A V), W_z = conv1x1 + BatchNorm (BN gamma initialised to 0: the block starts as the
identity, as in Wang et al.'s non-local networks). SA = conv3x3(2->2, no bias) -> ReLU -> conv1x1(2->2) ->
softmax over the 2 channels, applied to the HW x HW maps as a 2-channel image.

Row sums. A_seg and A_sal are row-stochastic (softmax). Eq. 5 mixes them *entry-wise* (W1, W2 are
HW x HW maps), so A_CT is non-negative and each entry lies between the two affinities' entries, but a row
of A_CT sums to exactly 1 only where W1 is constant along that row; in general the row sum is
1 + sum_j W1(i,j) (A_sal(i,j) - A_seg(i,j)), within [sum_j min, sum_j max] of the two rows (so in (0, 2)).
We follow the paper and the official code and do not renormalise.

Cross-task feature propagation (our reading of the official tensors ``seg_g``, ``seg_W``, ``sal_g``,
``sal_W``, which the paper does not describe): in cross-task mode each task's features also receive the
cross-task context, F_seg_out = NonLocal_seg(F_seg_in) + seg_W(A_CT . seg_g(F_seg_in)), same for sal.
That way every tensor of the official checkpoint is used and trained.

Memory. An HW x HW float32 map at a 321x321 crop (41x41 = 1681 positions) is 1681^2 * 4 B = 10.8 MiB per
image; at 512x512 (64x64 = 4096 positions) 64 MiB. What the math keeps for backward, in HW x HW maps
per image:
    seg affinity:        A_seg                                              1 map
    cross-task:          [A_sal, A_seg] (one (2,HW,HW) softmax output)      2
                         ReLU(conv3x3) = input of the 1x1 conv              2
                         W1 (W2 = 1 - W1 is never materialised)             1
                         A_CT before and after its row renormalisation      2   -> 7 maps
so cross-task keeps 75.5 MiB per image at 321 (302 MiB for batch 4) and 448 MiB at 512 (1.75 GiB for
batch 4); transients add at most ~2 maps in forward (the Q K^T logits before the softmax) and a few
map-sized gradients in backward. A straightforward implementation keeps 9 (stack copy of [A_sal, A_seg],
pre-ReLU output, both softmax channels). The savings come from:
  * both affinities come out of one batched softmax as a (B, 2, HW, HW) tensor, which *is* the SA input;
  * softmax over 2 channels == sigmoid of the channel difference, so the 1x1 conv is evaluated as one
    output channel with weights (w0 - w1), bias (b0 - b1) (the parameters stay the official (2,2,1,1)
    ``cross_att.2``), and A_CT = lerp(A_seg, A_sal, W1) = W1 A_sal + (1 - W1) A_seg in one fused kernel;
  * in-place ReLU; transposes are views (``A.mT``) handed to matmul, never copies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NonLocal(nn.Module):
    """Embedded-Gaussian non-local block (Eq. 2-3). ``forward(x) -> (x + W_z(A g(x)), A)``, A (B, HW, HW)."""

    def __init__(self, channels: int):
        super().__init__()
        self.g = nn.Conv2d(channels, channels, 1)
        self.theta = nn.Conv2d(channels, channels, 1)
        self.phi = nn.Conv2d(channels, channels, 1)
        self.W_z = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))

    def reset_parameters(self):
        for conv in (self.g, self.theta, self.phi, self.W_z[0]):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        nn.init.zeros_(self.W_z[1].weight)  # identity at init (Wang et al. 2018)
        nn.init.zeros_(self.W_z[1].bias)

    def query_key(self, x):
        """Q (B, HW, D) and K (B, D, HW) (both from 1x1 convs; the reshapes are views)."""
        return self.theta(x).flatten(2).mT, self.phi(x).flatten(2)

    def attend(self, x, A):
        """x + W_z(A g(x)) for a given row-stochastic A."""
        return x + self.W_z(propagate(A, self.g(x)))

    def forward(self, x):
        q, k = self.query_key(x)
        A = torch.softmax(torch.bmm(q, k), dim=-1)
        return self.attend(x, A), A


def propagate(A: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """y(:, i) = sum_j A(i, j) x(:, j) for x (B, C, h, w) and A (B, hw, hw); no copy of A is made."""
    b, c, h, w = x.shape
    return torch.matmul(x.reshape(b, c, h * w), A.mT).view(b, c, h, w)


def refine_with_affinity(P: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Eq. 6-7: P_ref[:, :, i] = sum_j A[i, j] P[:, :, j]; P (B, C, h, w) logits, A (B, hw, hw) affinity
    (A_seg, or A_CT; rows sum to 1). Applied to logits, as the authors do."""
    if A.shape[-1] != P.shape[-2] * P.shape[-1] or A.shape[-2] != A.shape[-1]:
        raise ValueError(f"affinity {tuple(A.shape)} does not match prediction {tuple(P.shape)}")
    return propagate(A, P)


def make_sa_fusion() -> nn.Sequential:
    """SA of Eq. 4: conv3x3(2->2, no bias) -> ReLU -> conv1x1(2->2) (softmax applied in :func:`cross_task_affinity`)."""
    return nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.ReLU(inplace=True), nn.Conv2d(2, 2, 1))


def sa_weights(A2: torch.Tensor, sa: nn.Sequential) -> torch.Tensor:
    """W1 of Eq. 4 for A2 = stacked [A_sal, A_seg] (B, 2, HW, HW); W2 = 1 - W1 (softmax over 2 channels).

    softmax([z0, z1])[0] = sigmoid(z0 - z1) and z0 - z1 is a 1x1 conv with weight w0 - w1, bias b0 - b1:
    one HW x HW map instead of two logits and two weights.
    """
    h = torch.relu_(sa[0](A2))
    w, b = sa[2].weight, sa[2].bias
    return torch.sigmoid(F.conv2d(h, w[0:1] - w[1:2], b[0:1] - b[1:2]))[:, 0]


def cross_task_affinity(A2: torch.Tensor, sa: nn.Sequential):
    """Eq. 4-5 on A2 = [A_sal, A_seg] (B, 2, HW, HW): returns (A_CT, W1), A_CT = W1 A_sal + (1 - W1) A_seg,
    each row renormalised to sum to 1.

    Eq. 5 mixes entry by entry, so a raw row sums to 1 + sum_j W1(i,j)(A_sal - A_seg)(i,j), not 1; the
    renormalisation keeps A_CT an affinity (refinement = a weighted average, CAM scale kept for the
    0.2 threshold) at the cost of one more HW x HW map.
    """
    W1 = sa_weights(A2, sa)
    A_ct = torch.lerp(A2[:, 1], A2[:, 0], W1)
    return A_ct / A_ct.sum(-1, keepdim=True), W1


def cross_task(f_seg, f_sal, seg_att: NonLocal, sal_att: NonLocal, cross_att: nn.Sequential,
               seg_g: nn.Conv2d, seg_W: nn.Conv2d, sal_g: nn.Conv2d, sal_W: nn.Conv2d):
    """The cross-task affinity module (Fig. 3, Eq. 2-5). Returns (F_seg_out, F_sal_out, A_CT).

    Both task affinities come from one batched product and softmax, giving the SA input [A_sal, A_seg]
    without a concatenation copy.
    """
    q_sal, k_sal = sal_att.query_key(f_sal)
    q_seg, k_seg = seg_att.query_key(f_seg)
    A2 = torch.softmax(torch.matmul(torch.stack([q_sal, q_seg], 1), torch.stack([k_sal, k_seg], 1)), dim=-1)
    A_sal, A_seg = A2[:, 0], A2[:, 1]
    A_ct, _ = cross_task_affinity(A2, cross_att)
    seg_out = seg_att.attend(f_seg, A_seg) + seg_W(propagate(A_ct, seg_g(f_seg)))
    sal_out = sal_att.attend(f_sal, A_sal) + sal_W(propagate(A_ct, sal_g(f_sal)))
    return seg_out, sal_out, A_ct
