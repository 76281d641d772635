"""Table 4 on the embedded benchmark: what does each affinity setting learn, and where does it gain or lose?

    python -m bench.bench_affinity [--preset default] [--seeds 0 1 2] [--jobs 2] [--threads 1]
        [--dir DIR] [--set KEY=VALUE ...] [--row LABEL KEY=VALUE ...] ...

Trains the rows of study.yaml's ``ablation_affinity`` (none; seg affinity + seg constraint; cross-task + seg
constraint; cross-task + seg, sal constraints: one stage, no post-processing, as the study runs them), and
any --row (the study's common settings plus the row's keys, e.g. a control), over the seeds, `--jobs`
trials at once with `--threads` torch threads each (default: two single-threaded trials, as studies.run
does on 2 cores). Each trial is kept under DIR/<row>-<seed>/: result.json and the trained network, its last
checkpoint (``train.keep_checkpoint``: checkpoint/last.pt, whose "net" is the state dict). A trial whose
result.json and network are already there, for the same config, is loaded instead of trained, so a second
run only measures.

Then, per row and seed, on the whole val split, one scale, the trial's precision and thread count:
  * final val mIoU as the trial recorded it, and recomputed from the kept network (a check: they must agree);
  * val mIoU of the seg branch's own prediction (``seg``, eval.refined=false) and of the affinity-refined
    one (``seg_ref``, Eq. 7, what inference uses), and refined - own;
  * attention purity (:func:`attention_purity`) of the affinity that refines seg (A_seg in the seg row,
    A_CT in the cross-task rows) and, where the net has them, of A_seg and A_sal (Eq. 2-3) alone, on the
    foreground cells (beside it the chance level of uniform attention) and on the background cells, and
    the mean self-weight A(i, i);
  * what the refinement changes in the prediction (:func:`refinement_moves`): background to object,
    object to background, object to another object, each as pixels changed / net pixels made right;
  * the stage's mean training loss per Eq. 8 term (the trial record's ``losses``: cls, sal1, sal2, seg1,
    seg2; a term the row does not have is "-").
And per row, paired by seed against ``none`` (reports.paired: mean difference, Student-t 95 % interval,
seeds better): the final mIoU and the seg branch's own mIoU; and refined - own within the row.

DIR defaults to runs/bench_affinity/<preset> (under AUXSEG_RUNS when set); the data set and the warm-up
cache are the trials' own (runs/data, runs/cache).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from core import checkpoint
from core.build import build_net, load_data, runs_dir
from core.config import Config, ConfigError, apply_overrides, config_from_dict, make_config, parse_overrides
from core.environment import cpu_model
from core.evaluate import evaluate, predict_batched
from core.model import AuxSegNet
from core.records import Status
from core.train import autocast, resolve_device
from reports.paired import better_cell, delta_cell, paired_delta
from studies.plan import make_plan
from studies.spec import load_spec

STUDY = "ablation_affinity"
BASELINE = "none"
TERMS = ("cls", "sal1", "sal2", "seg1", "seg2")
STRIDE = 8  # the backbone's output stride: one feature cell covers STRIDE x STRIDE pixels
IGNORE = 255
# Keys that change neither the trained network nor its metrics: a stored trial that differs only in these
# is the same trial (the checkpoint's own list, and the gallery, which is drawn after the metrics).
NOT_TRIAL = (*checkpoint.NOT_IN_FINGERPRINT, "eval.gallery_images")


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")


# ------------------------------------------------------------------------------ the diagnostics
def cell_classes(mask: np.ndarray, h: int, w: int) -> np.ndarray:
    """The ground-truth class of each feature cell (h*w,): the majority label among the cell's STRIDE x
    STRIDE pixels that are not ignore (255), or 255 when every pixel of the cell is ignore. The mask is
    padded with ignore up to h*STRIDE x w*STRIDE (the feature map is ceil(H / 8) cells high)."""
    padded = np.full((h * STRIDE, w * STRIDE), IGNORE, np.int64)
    padded[: mask.shape[0], : mask.shape[1]] = mask
    blocks = padded.reshape(h, STRIDE, w, STRIDE).transpose(0, 2, 1, 3).reshape(h * w, STRIDE * STRIDE)
    counts = np.stack([np.bincount(b[b != IGNORE], minlength=IGNORE) for b in blocks])
    return np.where(counts.sum(1) > 0, counts.argmax(1), IGNORE)


@dataclasses.dataclass
class Purity:
    """Sums over the foreground cells seen so far; the shares are their means."""

    own: float = 0.0  # sum over foreground cells i of the share of A(i, :) on cells of i's class
    chance: float = 0.0  # the same under uniform attention: share of the image's cells of i's class
    self_weight: float = 0.0  # sum of A(i, i) / sum_j A(i, j)
    n: int = 0
    bg: float = 0.0  # sum over background cells of the share of their attention on background cells
    n_bg: int = 0

    def add(self, other: Purity) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def share(self, field: str) -> float:
        n = self.n_bg if field == "bg" else self.n
        return getattr(self, field) / n if n else float("nan")


def attention_purity(A: torch.Tensor, cells: np.ndarray) -> Purity:
    """Attention purity of one image's affinity A (hw, hw) (Eq. 2-3's A_task or Eq. 5's A_CT) against its
    cell classes (h*w,): for each foreground cell i (class c_i not 0, not ignore),
        purity(i) = sum_{j: c_j = c_i} A(i, j) / sum_j A(i, j),
    the share of i's attention that lands on cells of its own ground-truth class, i.e. the weight that Eq.
    6-7's refinement P_ref(i) = sum_j A(i, j) P(j) gives to predictions of the right class. Divided by the
    row sum because A_CT's rows do not sum to exactly 1 (Eq. 5 mixes entry by entry). Uniform attention
    would score the share of cells of class c_i; an identity A (no refinement) would score 1. The same share
    for the background cells (c_i = 0) is kept apart (``bg``): what the refinement leaves of a background
    prediction."""
    a = A.detach().float().cpu().numpy().astype(np.float64)
    rows = a.sum(1)
    same = cells[:, None] == cells[None, :]
    fg = np.flatnonzero((cells != 0) & (cells != IGNORE))
    bg = np.flatnonzero(cells == 0)
    bg_own = float(((a[bg] * same[bg]).sum(1) / rows[bg]).sum())
    if not len(fg):
        return Purity(bg=bg_own, n_bg=len(bg))
    own = (a[fg] * same[fg]).sum(1) / rows[fg]
    chance = same[fg].sum(1) / len(cells)
    self_w = a[fg, fg] / rows[fg]
    return Purity(float(own.sum()), float(chance.sum()), float(self_w.sum()), len(fg), bg_own, len(bg))


@torch.no_grad()
def affinities(net: AuxSegNet, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The affinities the net computes for a batch x: "A" the one that refines seg (Eq. 6-7: A_seg in the
    seg row, A_CT in the cross-task rows) as forward returns it, and each task's own softmax affinity
    (Eq. 2-3: "A_seg", "A_sal") from its non-local module on its task features."""
    out = {"A": net(x)["affinity"]}
    feat = net.backbone(x)
    for task in ("seg", "sal"):
        att = getattr(net, f"{task}_att", None)
        if att is not None:
            out[f"A_{task}"] = att(net._task_features(task, feat))
    return out


@torch.no_grad()
def purity_on(net: AuxSegNet, val, cfg: Config, device: torch.device, batch: int = 16) -> dict[str, Purity]:
    """attention_purity of every affinity of :func:`affinities`, pooled over the foreground cells of the
    whole val split (images of one size batched; eval mode, the trial's autocast)."""
    from core.data import normalize

    net.eval()
    totals: dict[str, Purity] = {}
    order = list(range(len(val)))
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        imgs = [val.image(i) for i in idx]
        if len({im.shape for im in imgs}) > 1:  # real VOC: one image per pass
            groups = [[k] for k in range(len(idx))]
        else:
            groups = [list(range(len(idx)))]
        for g in groups:
            x = torch.from_numpy(np.stack([normalize(imgs[k]) for k in g])).to(device)
            with autocast(cfg, device):
                affs = affinities(net, x)
            h, w = -(-x.shape[-2] // STRIDE), -(-x.shape[-1] // STRIDE)
            for k, i in enumerate(g):
                cells = cell_classes(val.mask(idx[i]), h, w)
                for name, A in affs.items():
                    totals.setdefault(name, Purity()).add(attention_purity(A[k], cells))
    return totals


def own_vs_refined(net: AuxSegNet, val, cfg: Config, device: torch.device) -> tuple[float, float]:
    """Val mIoU (one scale, no post-processing) of the seg branch's own prediction and of the refined one
    (core.evaluate with eval.refined false / true)."""

    def amp():
        return autocast(cfg, device)

    own, ref = (apply_overrides(cfg, {"eval.refined": refined}) for refined in (False, True))
    m_own = evaluate(net, val, own, device, False, None, amp, desc="eval seg")["miou"]
    m_ref = evaluate(net, val, ref, device, False, None, amp, desc="eval seg_ref")["miou"]
    return m_own, m_ref


MOVES = ("bg_to_fg", "fg_to_bg", "fg_to_fg")


def refinement_moves(net: AuxSegNet, val, cfg: Config, device: torch.device) -> dict[str, tuple[int, int]]:
    """What Eq. 7's refinement changes in the val prediction (one scale, labelled pixels): per kind of
    change, (pixels changed, net pixels made right = right after - right before), and "labelled": (labelled
    pixels, 0). bg_to_fg: the seg
    branch said background and the refined prediction says an object (an object spreading into the
    background when it is wrong); fg_to_bg: the reverse; fg_to_fg: one object class for another."""

    def amp():
        return autocast(cfg, device)

    order = list(range(len(val)))
    own = dict(predict_batched(net, val, order, device, amp, "seg", refined=False))
    ref = predict_batched(net, val, order, device, amp, "seg_ref", refined=True)
    moves = {k: [0, 0] for k in (*MOVES, "labelled")}
    for i, r in ref:
        gt = val.mask(i)
        keep = gt != IGNORE
        moves["labelled"][0] += int(keep.sum())
        o, r, g = own[i][keep], r[keep], gt[keep]
        changed = o != r
        for kind, m in (
            ("bg_to_fg", (o == 0) & (r > 0)),
            ("fg_to_bg", (o > 0) & (r == 0)),
            ("fg_to_fg", (o > 0) & (r > 0) & changed),
        ):
            moves[kind][0] += int(m.sum())
            moves[kind][1] += int(((r == g) & m).sum()) - int(((o == g) & m).sum())
    return {k: (v[0], v[1]) for k, v in moves.items()}


# ------------------------------------------------------------------------------ training / loading
def trial_dir(root: Path, label: str, seed: int) -> Path:
    return root / f"{slug(label)}-{seed}"


def net_file(d: Path) -> Path:
    """The trained network a trial in d kept: its last checkpoint (core.checkpoint, train.keep_checkpoint),
    in a folder of its own because a trial's checkpoint folder is the trial's to clear."""
    return d / "checkpoint" / checkpoint.LAST


def comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))
    for key in NOT_TRIAL:
        section, name = key.split(".")
        d.get(section, {}).pop(name, None)
    return d


def stored(d: Path, cfg: Config) -> dict | None:
    """The stored trial in d if it is complete, has its network and was run with this config."""
    try:
        r = json.loads((d / "result.json").read_text())
    except (OSError, ValueError):
        return None
    if r.get("status") != Status.COMPLETE or not net_file(d).is_file():
        return None
    return r if comparable(r["config"]) == comparable(cfg.to_dict()) else None


def train_one(job: tuple[dict, str]) -> str:
    """Run one trial in this (spawned) process and keep its network in the trial folder (result.json last:
    its presence marks a finished trial)."""
    cfg_dict, folder = job
    from core.trial import run_trial

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    res = run_trial(config_from_dict(cfg_dict), checkpoint_dir=net_file(d).parent)
    tmp = d / "result.json.tmp"
    tmp.write_text(json.dumps(res.to_dict(), indent=1))
    os.replace(tmp, d / "result.json")
    return folder


def load_net(d: Path, cfg: Config, num_classes: int, device: torch.device) -> AuxSegNet:
    net = build_net(cfg, num_classes)
    net.load_state_dict(torch.load(net_file(d), map_location="cpu", weights_only=True)["net"])
    return net.to(device).eval()


# ------------------------------------------------------------------------------ the table
def pct(v: float | None) -> str:
    return "-" if v is None or v != v else f"{100 * v:.1f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bench_affinity", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=2, help="trials trained at once (default 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trial and for the measurement")
    ap.add_argument(
        "--dir", type=Path, default=None, help="where trials are kept (default runs/bench_affinity)"
    )
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument(
        "--row",
        nargs="+",
        action="append",
        default=[],
        metavar=("LABEL", "KEY=VALUE"),
        help="an extra labelled row: the study's common settings plus these (repeatable), e.g. a control",
    )
    a = ap.parse_args(argv)
    root = a.dir or runs_dir() / "bench_affinity" / a.preset
    cli = {**parse_overrides(a.overrides), "train.threads": a.threads}
    try:
        plan = make_plan(load_spec(Path(__file__).resolve().parents[1] / "study.yaml"), STUDY, a.preset, cli)
        points = [p for p in plan.points if p.seed in a.seeds]
        n_study = len(points)
        for label, *kv in a.row:  # the study's set (base_overrides), the row's keys, then --set
            row_overrides = {**plan.base_overrides, **parse_overrides(kv)}
            points += [
                dataclasses.replace(
                    p, row=label, overrides={**row_overrides, "seed": p.seed, **plan.run_overrides}
                )
                for p in points
                if p.row == BASELINE
            ]
        cfgs = {(p.row, p.seed): make_config(a.preset, p.overrides) for p in points}
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = list(dict.fromkeys(p.row for p in points))
    if BASELINE not in rows:
        print(f"error: study {STUDY} has no row {BASELINE!r}", file=sys.stderr)
        return 2

    # Train what DIR does not hold yet, longest first (studies.plan's claim order).
    todo = [p for p in plan.claim_order if p.seed in a.seeds] + points[n_study:]
    todo = [p for p in todo if stored(trial_dir(root, p.row, p.seed), cfgs[(p.row, p.seed)]) is None]
    torch.set_num_threads(a.threads)
    cpu, cores = cpu_model(), os.cpu_count()
    print(
        f"{STUDY}, {a.preset} preset, seeds {a.seeds}: {len(points)} trials, {len(todo)} to train, "
        f"{a.jobs} at once x {a.threads} thread(s); {cpu}, {cores} cores, torch {torch.__version__}; "
        f"trials in {root}",
        flush=True,
    )
    if todo:
        t0 = time.time()
        try:  # the trial leaves its network in its folder (last.pt)
            keep = [apply_overrides(cfgs[(p.row, p.seed)], {"train.keep_checkpoint": True}) for p in todo]
        except ConfigError as e:
            print(
                f"error: {len(todo)} trials to train, but core.trial cannot keep a network: {e}",
                file=sys.stderr,
            )
            return 2
        jobs = [(c.to_dict(), str(trial_dir(root, p.row, p.seed))) for c, p in zip(keep, todo)]
        with ProcessPoolExecutor(a.jobs, mp_context=mp.get_context("spawn")) as pool:
            for folder in pool.map(train_one, jobs):
                print(f"  trained {Path(folder).name} ({time.time() - t0:.0f} s since start)", flush=True)

    results: dict[tuple[str, int], dict] = {}
    for p in points:
        r = stored(trial_dir(root, p.row, p.seed), cfgs[(p.row, p.seed)])
        if r is None:
            print(
                f"error: {trial_dir(root, p.row, p.seed)}: no complete trial with its network",
                file=sys.stderr,
            )
            return 1
        results[(p.row, p.seed)] = r

    first = cfgs[(points[0].row, points[0].seed)]
    device = resolve_device(first)
    _, val = load_data(first)
    stats: dict[tuple[str, int], dict] = {}
    for p in points:
        cfg, r = cfgs[(p.row, p.seed)], results[(p.row, p.seed)]
        net = load_net(trial_dir(root, p.row, p.seed), cfg, r["dataset"]["num_classes"], device)
        t0 = time.time()
        s: dict = {"final": r["final"]["miou"], "losses": r["stages"][-1].get("losses") or {}}
        s["env"] = r.get("environment") or {}
        if cfg.model.affinity == "none":
            s["own"] = s["ref"] = evaluate(net, val, cfg, device, False, None, lambda: autocast(cfg, device))[
                "miou"
            ]
            s["purity"], s["moves"] = {}, {}
        else:
            s["own"], s["ref"] = own_vs_refined(net, val, cfg, device)
            s["purity"] = purity_on(net, val, cfg, device)
            s["moves"] = refinement_moves(net, val, cfg, device)
        stats[(p.row, p.seed)] = s
        print(
            f"  measured {p.row} seed {p.seed}: recorded {pct(s['final'])}, recomputed {pct(s['ref'])}"
            f"{'' if abs(s['final'] - s['ref']) < 1e-9 else ' (DIFFERENT: not the same network or kernels)'} "
            f"({s['env'].get('precision')}, {s['env'].get('threads')} thread(s) in training; "
            f"{time.time() - t0:.0f} s)",
            flush=True,
        )

    env = stats[(points[0].row, points[0].seed)]["env"]
    print(
        f"\nval mIoU (%, {len(val)} val images, one scale) and training losses, {a.preset} preset; "
        f"{cpu}, {cores} cores, torch {torch.__version__}, {env.get('precision')} "
        f"({env.get('cpu_capability')}), {a.threads} thread(s) per trial"
    )
    head = (
        "| row | seed | final | seg | seg_ref | ref - seg | A fg (chance) | A bg | A(i,i) | A_seg fg | "
        + "A_sal fg | "
        + " | ".join(TERMS)
        + " |"
    )
    print(head)
    print("|" + " --- |" * (head.count("|") - 1))
    for row in rows:
        for seed in a.seeds:
            s = stats[(row, seed)]
            pu = s["purity"]

            def share(name: str, field: str = "own") -> str:
                return pct(pu[name].share(field)) if name in pu else "-"

            fg = f"{share('A')} ({share('A', 'chance')})" if "A" in pu else "-"
            gain = "-" if not s["moves"] else f"{100 * (s['ref'] - s['own']):+.1f}"
            losses = [f"{s['losses'][t]:.3f}" if t in s["losses"] else "-" for t in TERMS]
            cells = [row, seed, pct(s["final"]), pct(s["own"]), pct(s["ref"]), gain, fg, share("A", "bg")]
            cells += [share("A", "self_weight"), share("A_seg"), share("A_sal"), *losses]
            print("| " + " | ".join(map(str, cells)) + " |")

    print(
        "\nwhat the refinement changes in the val prediction (labelled pixels; seg -> seg_ref): pixels "
        "changed, and per kind of change the pixels changed / net pixels made right"
    )
    print("| row | seed | changed | bg -> fg | fg -> bg | fg -> other fg |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        for seed in a.seeds:
            mv = stats[(row, seed)]["moves"]
            if not mv:
                continue
            changed = sum(mv[k][0] for k in MOVES) / mv["labelled"][0]
            cells = [f"{mv[k][0]:,} / {mv[k][1]:+,}" for k in MOVES]
            print(f"| {row} | {seed} | {100 * changed:.1f} % | " + " | ".join(cells) + " |")

    def by_seed(row: str, key: str) -> dict[int, float]:
        return {seed: stats[(row, seed)][key] for seed in a.seeds}

    print(f"\npaired by seed (95 % CI, seeds better), rows against {BASELINE!r}, refined - own within a row")
    print("| row | final, mean +- std | final vs none | seg (own) vs none | seg_ref - seg |")
    print("| --- | --- | --- | --- | --- |")
    for row in rows:
        final = by_seed(row, "final")
        sd = statistics.stdev(final.values()) if len(final) > 1 else float("nan")
        cells = [f"{pct(statistics.fmean(final.values()))} +- {pct(sd)}"]
        for key in ("final", "own"):
            if row == BASELINE:
                cells.append("(baseline)")
                continue
            d = paired_delta(by_seed(row, key), by_seed(BASELINE, key))
            cells.append(f"{delta_cell(d)} {better_cell(d)}")
        if not stats[(row, a.seeds[0])]["moves"]:  # no affinity: nothing refines seg
            cells.append("-")
        else:
            d = paired_delta(by_seed(row, "ref"), by_seed(row, "own"))
            cells.append(f"{delta_cell(d)} {better_cell(d)}")
        print(f"| {row} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
