"""Parity with the authors' released network: our AuxSegNet (``paper`` preset) against their ``SegNet``.

    python -m bench.bench_parity --official DIR [--sizes 2x3x96x96 1x3x161x161 1x3x321x321]
                                 [--set model.affinity_row_norm=true] [--threads 1]

DIR is an extracted copy of the authors' repository (github.com/xulianuwa/AuxSegNet) that you supply; this
project never contains their code, and without DIR nothing is compared (exit 2). The bench imports their
``network/AuxSegNet.py`` (``SegNet``, 21 classes, as their train_AuxAff.py builds it; it imports on a
CPU-only torch 2.x as it is, no shim), gives every BatchNorm of it running statistics and affine parameters
that are no identity (calibrated on a random batch, then perturbed, so the features stay moderate: max |F|
30-120 at these sizes), copies its state dict into our net with ``AuxSegNet.load_official`` (the call a
released checkpoint goes through) and compares, in fp32 on the CPU, at each input size:

  * eval mode (no grad): backbone features F, cls logits, CAM (ours is relu(fc8 * F); theirs is raw and
    their gen_pgt.py applies the ReLU first, so relu(theirs) is compared), initial sal / seg logits, A_CT,
    refined sal / seg logits;
  * train mode (their ``train()`` keeps BN in eval and conv1a frozen; the preset's model.freeze_bn does the
    same), the same torch seed before each forward so every Dropout2d draws the same masks: the same
    outputs (no CAM: ours returns it in eval mode only), then one Eq. 8 loss and backward: the released
    training loss (train_AuxAff.py's sum of five terms: F.interpolate to the label size, multilabel soft
    margin, BCE-with-logits, CE ignoring 255, all weights 1) on their outputs and
    ``core.losses.auxsegnet_loss`` on ours, against the same random targets; the loss values and every
    parameter gradient are compared.

Differences: "max abs" = max |ours - theirs|, "scale" = max |theirs|, "rel" = max abs / scale (relative to
the tensor's scale; an element-wise ratio means nothing where a value crosses zero). Within --tol (1e-5): an
output's max abs <= tol * max(1, scale), i.e. absolute for maps of unit scale and relative for larger ones
(the train-mode cls logits reach |50|, where 1e-5 is a few float32 ulps: their GAP is avg_pool2d over the
whole map, ours adaptive_avg_pool2d, two summation orders; an eval row compares both with float64); the
loss's and each gradient's rel <= tol. The gradient of theta/phi's ``phi.bias`` is 0 in exact arithmetic
(the row softmax ignores a per-row shift), so both nets give rounding noise: its rel is taken against the
same layer's weight gradient. When something is beyond at a size, that size is compared again with both
nets converted to float64 (same weights, seeds, inputs): a row within tol there is marked "rounding" (a
float32 difference, e.g. a gradient that is a sum with heavy cancellation, such as cross_att's 1x1 bias)
and passes; a difference of the maths stays. Exit 1 if anything is beyond, else 0. ``--set`` passes config
overrides to our net: ``--set model.affinity_row_norm=true`` shows that departure from the released network.

One thread, fp32, an Intel Xeon: the three default sizes take 65-90 s and 3.6 GB (321 px: 40-50 s) when
nothing needs the float64 rerun, about 200 s and 7.3 GB when every size does (affinity_row_norm=true).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.build import build_net
from core.config import ConfigError, make_config, parse_overrides
from core.environment import cpu_model
from core.losses import auxsegnet_loss

NUM_CLASSES = 21
SIZES = ("2x3x96x96", "1x3x161x161", "1x3x321x321")
PHI_BIAS = "grad *_att.phi.bias (0 in exact arithmetic)"
OUTPUTS = ("feat", "cls", "cam", "sal", "seg", "affinity", "sal_ref", "seg_ref")


def git_head() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def import_official(root: Path):
    """Their ``network.AuxSegNet`` module from an extracted copy of their repository (imported in place,
    nothing copied)."""
    if not (root / "network" / "AuxSegNet.py").is_file():
        raise FileNotFoundError(
            f"{root}: no network/AuxSegNet.py (expected an extracted copy of their repository)"
        )
    if "network" in sys.modules:
        raise RuntimeError("a module named 'network' is already imported; run the bench in a fresh process")
    sys.path.insert(0, str(root))
    mod = importlib.import_module("network.AuxSegNet")
    if Path(mod.__file__).resolve().parent != (root / "network").resolve():
        raise RuntimeError(f"imported network.AuxSegNet from {mod.__file__}, not from {root}")
    return mod


@torch.no_grad()
def randomise_bn(net: nn.Module, x: torch.Tensor, seed: int) -> None:
    """Every BatchNorm2d: running stats measured on x (one cumulative pass), then perturbed, and random
    affine parameters, so that no BN is an identity and the features neither vanish nor explode."""
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: one pass gives the batch statistics
        m.train()
    net(x)
    g = torch.Generator().manual_seed(seed)
    for m in bns:
        m.momentum = 0.1
        m.eval()
        c = m.num_features
        std = m.running_var.sqrt()
        m.running_mean.add_(0.1 * std * torch.randn(c, generator=g))
        m.running_var.mul_(torch.empty(c).uniform_(0.8, 1.25, generator=g))
        m.weight.copy_(torch.empty(c).uniform_(0.5, 1.5, generator=g))
        m.bias.copy_(0.1 * torch.randn(c, generator=g))


def targets(b: int, h: int, w: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (b, NUM_CLASSES - 1), generator=g).float()
    labels[:, 0] = 1  # at least one class per image
    seg = torch.randint(0, NUM_CLASSES, (b, h, w), generator=g)
    seg[:, : max(1, h // 10)] = 255  # an ignored band
    sal = torch.randint(0, 2, (b, h, w), generator=g)  # binarised saliency, as their loss sees it
    return {"labels": labels, "seg": seg, "sal": sal}


def released_loss(out: dict, t: dict) -> torch.Tensor:
    """Eq. 8 as their train_AuxAff.py computes it (all weights 1), written out with torch's functional API."""
    size = t["seg"].shape[-2:]

    def up(p):
        return F.interpolate(p, size=size, mode="bilinear", align_corners=False)

    sal = t["sal"].to(out["sal"].dtype)[:, None]
    return (
        F.multilabel_soft_margin_loss(out["cls"], t["labels"].to(out["cls"].dtype))
        + F.binary_cross_entropy_with_logits(up(out["sal"]), sal)
        + F.binary_cross_entropy_with_logits(up(out["sal_ref"]), sal)
        + F.cross_entropy(up(out["seg"]), t["seg"], ignore_index=255)
        + F.cross_entropy(up(out["seg_ref"]), t["seg"], ignore_index=255)
    )


class Feat:
    """Captures F = relu(bn7(.)) of a forward (a hook on bn7 of either net)."""

    def __init__(self, bn7: nn.Module):
        self.value = None
        bn7.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        self.value = F.relu(output).detach()


def run_theirs(net, feat: Feat, x: torch.Tensor) -> dict[str, torch.Tensor]:
    cls, cam, sal, sal_ref, seg, seg_ref, aff = net(x, require_cam=True)
    out = {"cls": cls, "sal": sal, "sal_ref": sal_ref, "seg": seg, "seg_ref": seg_ref, "affinity": aff}
    out["cam"] = F.relu(cam)  # gen_pgt.py's first step
    out["feat"] = feat.value
    return out


def run_ours(net, feat: Feat, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = dict(net(x))
    out["feat"] = feat.value
    return out


def diff(a: torch.Tensor, b: torch.Tensor, scale: float | None = None) -> tuple[float, float, float]:
    """(max |a - b|, scale, max |a - b| / scale) in float64, b the reference; scale max |b| unless given."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: ours {tuple(a.shape)}, theirs {tuple(b.shape)}")
    d = (a - b).abs().max().item()
    scale = b.abs().max().item() if scale is None else scale
    return d, scale, (d / scale if scale > 0 else (0.0 if d == 0 else float("inf")))


def measure(theirs, ours, feats, x: torch.Tensor, tg: dict, seed: int) -> dict:
    """Both nets on x: {(mode, name): (max abs, scale, rel)} for every output in eval and train mode, the
    loss and every parameter gradient (named as in their net; a gradient in one net only is (inf, 0, inf)),
    plus ("info", ...) rows: the eval cls logits of each net against GAP + fc8 in float64."""
    feat_t, feat_o = feats
    params_o = dict(ours.named_parameters())
    res = {}
    theirs.eval()
    ours.eval()
    with torch.no_grad():
        torch.manual_seed(seed)
        ot = run_theirs(theirs, feat_t, x)
        torch.manual_seed(seed)
        oo = run_ours(ours, feat_o, x)
    for k in OUTPUTS:
        res["eval", k] = diff(oo[k], ot[k])
    ref = oo["feat"].double().mean((2, 3)) @ ours.fc8.weight.double().flatten(1).T
    for who, o in (("ours", oo), ("theirs", ot)):
        res["info", f"cls, {who} vs float64 GAP + fc8"] = diff(o["cls"], ref)
    del ot, oo

    theirs.train()
    ours.train()
    theirs.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    ot = run_theirs(theirs, feat_t, x)
    lt = released_loss(ot, tg)
    lt.backward()
    torch.manual_seed(seed)
    oo = run_ours(ours, feat_o, x)
    lo, _ = auxsegnet_loss(oo, tg, {"cls": 1.0, "sal": 1.0, "seg": 1.0})
    lo.backward()
    for k in OUTPUTS:
        if k != "cam":  # ours returns the CAM in eval mode only
            res["train", k] = diff(oo[k], ot[k])
    res["train", "loss"] = diff(lo, lt)
    del ot, oo, lt, lo
    grads_t = dict(theirs.named_parameters())
    for n, p in grads_t.items():
        q = params_o[n if n in params_o else f"backbone.{n}"]
        if p.grad is None and q.grad is None:
            continue
        if (p.grad is None) != (q.grad is None):
            res["grad", n] = (float("inf"), 0.0, float("inf"))
        elif n.endswith("_att.phi.bias"):
            # The row softmax of Eq. 2-3 ignores a shift that is constant along a row, which q_i . b_phi is:
            # this gradient is 0 in exact arithmetic and both nets return rounding noise, so its error is
            # taken relative to the gradient scale of the same layer's weight.
            weight = grads_t[n[: -len("bias")] + "weight"].grad
            res["grad", n] = diff(q.grad, p.grad, weight.abs().max().item())
        else:
            res["grad", n] = diff(q.grad, p.grad)
    theirs.zero_grad(set_to_none=True)
    ours.zero_grad(set_to_none=True)
    return res


def within(key: tuple[str, str], d: float, scale: float, r: float, tol: float) -> bool:
    """An output's max abs <= tol * max(1, scale); the loss's and a gradient's rel <= tol."""
    return d <= tol * max(1.0, scale) if key[0] in ("eval", "train") and key[1] != "loss" else r <= tol


def grad_group(name: str, backbone: bool) -> str:
    top = name.split(".")[0]
    if name.endswith("_att.phi.bias"):
        return PHI_BIAS
    if backbone:
        return "grad backbone"
    return f"grad {top}" if top in ("fc8", "cross_att") else f"grad {top[:3]} head"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_parity", description=__doc__.splitlines()[0])
    ap.add_argument("--official", type=Path, help="an extracted copy of the authors' AuxSegNet repository")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), metavar="BxCxHxW")
    ap.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tol", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.official is None:
        print(
            "bench_parity needs the authors' repository: pass --official DIR, an extracted copy of "
            "github.com/xulianuwa/AuxSegNet (nothing is compared without it)",
            file=sys.stderr,
        )
        return 2
    try:
        sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes]
        if any(len(s) != 4 or s[1] != 3 or min(s) < 1 for s in sizes):
            raise ValueError
    except ValueError:
        print(f"--sizes: expected BxCxHxW with C=3, e.g. 1x3x321x321, got {args.sizes}", file=sys.stderr)
        return 2
    overrides = [x for group in args.overrides for x in group]
    try:
        cfg = make_config(
            "paper", {"data.root": "/x", "model.init_weights": "none", **parse_overrides(overrides)}
        )
        official = import_official(args.official.resolve())
    except (ConfigError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    torch.set_num_threads(args.threads)
    tol = args.tol
    print(f"machine: {cpu_model()}, {args.threads} thread(s); torch {torch.__version__}; git {git_head()}")
    print(
        f"theirs: {args.official}/network/AuxSegNet.py SegNet({NUM_CLASSES}); ours: preset paper {overrides}"
    )
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    theirs = official.SegNet(num_classes=NUM_CLASSES)
    randomise_bn(
        theirs, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(args.seed)), args.seed
    )
    ours = build_net(cfg, NUM_CLASSES)
    ours.load_official(theirs.state_dict())
    ours_sd = ours.state_dict()
    backbone = {k for k in theirs.state_dict() if k not in ours_sd}  # ours has these under "backbone."
    if len(ours_sd) != len(theirs.state_dict()) or not all(
        torch.equal(ours_sd[f"backbone.{k}" if k in backbone else k], v)
        for k, v in theirs.state_dict().items()
    ):
        print("error: load_official did not copy every tensor", file=sys.stderr)
        return 1
    feats = Feat(theirs.bn7), Feat(ours.backbone.bn7)
    print(f"built both nets and copied the weights in {time.perf_counter() - t0:.1f} s")

    rows: list[tuple] = []  # size, mode, what, max abs, scale, rel, verdict
    timings, n_fp64 = [], 0
    nets64 = None
    for b, c, h, w in sizes:
        size = f"{b}x{c}x{h}x{w}"
        x = torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(args.seed + h))
        tg = targets(b, h, w, args.seed + h)
        t_size = time.perf_counter()
        res = measure(theirs, ours, feats, x, tg, args.seed)
        beyond = [k for k, v in res.items() if k[0] != "info" and not within(k, *v, tol)]
        res64 = {}
        if beyond:
            # Is it the computation or float32 rounding? The same comparison with both nets in float64
            # (their copy converted; the same weights, seeds and inputs): a difference that is rounding
            # vanishes there, one of the maths does not.
            if nets64 is None:
                nets64 = [copy.deepcopy(theirs).double(), copy.deepcopy(ours).double()]
                nets64.append((Feat(nets64[0].bn7), Feat(nets64[1].backbone.bn7)))
            res64 = measure(nets64[0], nets64[1], nets64[2], x.double(), tg, args.seed)
            n_fp64 += 1

        def verdict(key, d, scale, r):
            if within(key, d, scale, r, tol):
                return "yes"
            if key in res64 and within(key, *res64[key], tol):
                return f"rounding: float64 {res64[key][2]:.1e}"
            return "NO" + (f" (float64 {res64[key][2]:.1e})" if key in res64 else "")

        for (mode, name), (d, scale, r) in res.items():
            if mode in ("eval", "train"):
                rows.append((size, mode, name, d, scale, r, verdict((mode, name), d, scale, r)))
        groups: dict[str, list] = {}
        for (mode, name), v in res.items():
            if mode == "grad":
                groups.setdefault(grad_group(name, name in backbone), []).append((name, v))
        n_grads = sum(len(g) for g in groups.values())
        groups["grad (all)"] = [item for g in list(groups.values()) for item in g]
        order = ("grad backbone", "grad fc8", "grad seg head", "grad sal head", "grad cross_att", PHI_BIAS)
        for group in (*order, "grad (all)"):
            items = groups.get(group)
            if not items:
                continue
            verdicts = [verdict(("grad", n), *v) for n, v in items]
            name, (d, scale, r) = max(items, key=lambda item: item[1][2])
            bad = sum(v.startswith("NO") for v in verdicts)
            rounded = sum(v.startswith("rounding") for v in verdicts)
            label = f"{group}, worst {name}"
            if group == "grad (all)":
                label += f" ({n_grads} tensors; the others have no grad in either net)"
            summary = "yes" if not bad and not rounded else f"{len(items) - bad}/{len(items)} within"
            if rounded:
                worst64 = max(res64["grad", n][2] for (n, _), v in zip(items, verdicts) if v[0] == "r")
                summary += f" ({rounded} within only in float64, rel <= {worst64:.1e}: rounding)"
            rows.append((size, "train", label, d, scale, r, "NO: " + summary if bad else summary))
        for (mode, name), (d, scale, r) in res.items():
            if mode == "info":
                rows.append((size, "eval", f"{name} (information)", d, scale, r, "-"))
        timings.append((size, time.perf_counter() - t_size))

    width = max(len(r[2]) for r in rows)
    print()
    print(f"| size | mode | {'output':<{width}} | max abs diff | scale | rel | within {tol:g} |")
    print(f"| --- | --- | {'-' * width} | --- | --- | --- | --- |")
    for size, mode, what, d, scale, r, v in rows:
        print(f"| {size} | {mode} | {what:<{width}} | {d:.3e} | {scale:.3e} | {r:.3e} | {v} |")
    print(
        "scale: max |theirs| (for phi.bias, max |phi.weight's grad|); rel = max abs diff / scale. Within: an "
        f"output's max abs diff <= {tol:g} * max(1, scale); the loss's and each gradient's rel <= {tol:g}; "
        "'rounding': beyond in float32, within in the same comparison in float64."
    )
    print()
    for size, secs in timings:
        print(f"time {size}: {secs:.1f} s (eval forward, train forward + loss + backward, both nets)")
    print(
        f"total {time.perf_counter() - t0:.1f} s"
        + (f" ({n_fp64} size(s) rerun in float64)" if n_fp64 else "")
    )
    checked = [r for r in rows if r[6] != "-"]
    bad = [r for r in checked if r[6].startswith("NO")]
    print(f"{'PASS' if not bad else 'FAIL'}: {len(checked) - len(bad)}/{len(checked)} rows within {tol:g}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
