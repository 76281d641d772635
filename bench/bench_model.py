"""Model benchmark: forward+backward throughput and the HW x HW affinity memory.

    python -m bench.bench_model [--quick]

Prints images/s (forward + backward of the full Eq. 8 loss, train mode) for the paper network (width 1.0,
321x321) and the CPU width (0.125, 96x96, batch 8), their ratio, and the affinity memory: analytic (HW x HW
float32 maps the maths keeps for backward) next to a measurement of the bytes the affinity module alone
saves for backward (torch.autograd.graph.saved_tensors_hooks, deduplicated by storage), for our fused
implementation and for a straightforward one.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
import torch.nn.functional as F

from core.losses import auxsegnet_loss
from core.model import AuxSegNet
from core.model.affinity import NonLocal, cross_task, make_sa_fusion, propagate

MiB = 2**20


def _targets(b, h, w, classes=21):
    return {
        "labels": torch.randint(0, 2, (b, classes - 1)).float(),
        "seg": torch.randint(0, classes, (b, h, w)),
        "sal": torch.randint(0, 2, (b, h, w)),
    }


def throughput(width, size, batch, iters, warmup):
    torch.manual_seed(0)
    net = AuxSegNet(21, width).train()
    x, tg = torch.randn(batch, 3, size, size), _targets(batch, size, size)
    w = {"cls": 1.0, "sal": 1.0, "seg": 1.0}
    for _ in range(warmup):
        auxsegnet_loss(net(x), tg, w)[0].backward()
    t = time.perf_counter()
    for _ in range(iters):
        net.zero_grad(set_to_none=True)
        auxsegnet_loss(net(x), tg, w)[0].backward()
    dt = time.perf_counter() - t
    return batch * iters / dt, dt / iters


def saved_bytes(fn, *args):
    """Bytes of the distinct storages autograd saves for backward while running fn(*args)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(storages.values()), out


def naive_cross_task(f_seg, f_sal, seg_att, sal_att, sa, seg_g, seg_W, sal_g, sal_W):
    """The same maths written plainly: two softmaxes, a concatenation, out-of-place ReLU, a 2-channel
    softmax."""
    A_seg = torch.softmax(torch.bmm(*seg_att.query_key(f_seg)), -1)
    A_sal = torch.softmax(torch.bmm(*sal_att.query_key(f_sal)), -1)
    Wt = torch.softmax(sa[2](F.relu(sa[0](torch.stack([A_seg, A_sal], 1)))), dim=1)
    A_ct = Wt[:, 0] * A_seg + Wt[:, 1] * A_sal
    seg = f_seg + seg_W(propagate(A_seg, seg_g(f_seg)))
    sal = f_sal + sal_W(propagate(A_sal, sal_g(f_sal)))
    return seg, sal, A_ct


def affinity_memory(crop, batch, D=128):
    side = (crop + 7) // 8
    hw = side * side
    amap = batch * hw * hw * 4
    torch.manual_seed(0)
    seg_att, sal_att = NonLocal(D), NonLocal(D)
    sa = make_sa_fusion()
    convs = [torch.nn.Conv2d(D, D, 1) for _ in range(4)]
    f_seg = torch.randn(batch, D, side, side, requires_grad=True)
    f_sal = torch.randn(batch, D, side, side, requires_grad=True)
    got_seg, _ = saved_bytes(seg_att, f_seg)
    got_ct, _ = saved_bytes(cross_task, f_seg, f_sal, seg_att, sal_att, sa, *convs)
    got_naive, _ = saved_bytes(naive_cross_task, f_seg, f_sal, seg_att, sal_att, sa, *convs)
    return side, hw, amap, got_seg, got_ct, got_naive


def upsampling(iters: int) -> tuple[float, float]:
    """Seconds per forward + backward of the seg loss's upsampling: F.interpolate vs core.losses'."""
    from core.losses import upsample_logits

    x = torch.randn(8, 21, 12, 12, requires_grad=True)
    w = torch.randn(8, 21, 96, 96)
    ways = (
        lambda t: F.interpolate(t, size=(96, 96), mode="bilinear", align_corners=False),
        lambda t: upsample_logits(t, (96, 96)),
    )
    out = []
    for up in ways:
        for _ in range(3):  # untimed
            torch.autograd.grad(up(x).mul(w).sum(), x)
        t0 = time.perf_counter()
        for _ in range(iters):
            torch.autograd.grad(up(x).mul(w).sum(), x)
        out.append((time.perf_counter() - t0) / iters)
    return out[0], out[1]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one timed iteration at width 1.0, no warm-up")
    args = ap.parse_args(argv)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device cpu"
    )

    print("\n== forward + backward throughput (AuxSegNet, all branches, cross_task, both constraints) ==")
    small_ips, small_s = throughput(0.125, 96, 8, iters=2 if args.quick else 5, warmup=1)
    print(f"width 0.125, 96x96,   batch 8: {small_ips:8.2f} images/s ({small_s:.2f} s/iter)")
    full_ips, full_s = throughput(1.0, 321, 1, iters=1 if args.quick else 2, warmup=0 if args.quick else 1)
    print(f"width 1.0,   321x321, batch 1: {full_ips:8.3f} images/s ({full_s:.2f} s/iter)")
    print(f"ratio (width 0.125 @96 / width 1.0 @321): {small_ips / full_ips:.0f}x")

    print("\n== the loss's bilinear upsampling, forward + backward (8 x 21 maps, 12 -> 96 px, fp32) ==")
    t_interp, t_matrix = upsampling(iters=10 if args.quick else 50)
    print(
        f"F.interpolate {1e3 * t_interp:.2f} ms, two matrix products (core.losses) {1e3 * t_matrix:.2f} ms: "
        f"{t_interp / t_matrix:.1f}x"
    )

    print("\n== HW x HW affinity memory (float32, kept for backward) ==")
    print(
        "analytic: seg affinity keeps 1 map (A_seg); cross_task keeps 7 maps "
        "([A_seg, A_sal] 2, ReLU(conv3x3) 2, W1 1, A_CT raw + row-normalised 2); "
        "a plain implementation keeps 9"
    )
    print("measured: bytes of distinct storages saved by autograd for the affinity module alone (D=128)")
    print(
        f"{'crop':>5} {'grid':>6} {'HW':>5} {'batch':>5} {'1 map':>9} | {'seg: calc':>9} {'meas':>9} | "
        f"{'cross: calc':>11} {'meas':>9} | {'plain: calc':>11} {'meas':>9}"
    )
    for crop in (321, 512):
        for batch in (1, 4):
            if args.quick and batch == 4 and crop == 512:
                side = 64
                hw, amap = side * side, 4 * (side * side) ** 2 * 4
                print(
                    f"{crop:>5} {side:>3}x{side:<2} {hw:>5} {batch:>5} {amap / MiB:7.1f}Mi | "
                    f"{amap / MiB:9.1f} "
                    f"{'-':>9} | {7 * amap / MiB:11.1f} {'-':>9} | {9 * amap / MiB:11.1f} {'-':>9}  (MiB)"
                )
                continue
            side, hw, amap, s, c, n = affinity_memory(crop, batch)
            print(
                f"{crop:>5} {side:>3}x{side:<2} {hw:>5} {batch:>5} {amap / MiB:7.1f}Mi | {amap / MiB:9.1f} "
                f"{s / MiB:9.1f} | {7 * amap / MiB:11.1f} {c / MiB:9.1f} | {9 * amap / MiB:11.1f} "
                f"{n / MiB:9.1f}  (MiB)"
            )
    print(
        "(measured includes the small HW x D feature tensors; transients on top: the Q K^T logits before "
        "the softmax (2 maps) and map-sized gradients in backward)"
    )


if __name__ == "__main__":
    main()
