"""A prepared GPU check (issue #35): what a lent GPU runs in one go, within 8 minutes, printing JSON lines.

    python -m bench.bench_gpu [--device cuda|cpu] [--tiny] [--official DIR] [--images 64]

1. step: the paper network's training step (forward, Eq. 8 loss, backward, SGD step) at the paper preset's
   batch and crop, in fp32 (TF32 where torch's flags allow it; they are printed) and in bf16 autocast, ours
   and, with --official DIR (an extracted copy of the authors' repository, as bench_parity), their SegNet
   with their released loss; peak GPU memory of each.
2. data_wait: the share of wall time the training loop (core.train.batches feeding that step, loss.item()
   each step as train_stage does) waits for its next batch, on a generated VOC-layout folder of 500x375
   JPEGs with two pseudo-label maps per image, synchronous (0) against the loader workers auto picks.
3. lookup: a worker's uint8 batch normalised on the device against the synchronous path: bit for bit.
4. trial: one small trial end to end on the device (smoke preset: warm-up, two stages, label update and
   evaluation with the CRF pool, loader workers), stopped after its first stage and resumed from its
   checkpoint, so every device-only line has run once; without --tiny an uninterrupted twin says whether
   the resumed numbers are identical (a GPU's nondeterministic kernels may differ in the last bits).

--tiny: a narrow network (width 0.0625), crop 64, batch 2, a few steps and images: what the test suite runs
with --device cpu so that the script cannot rot. Exit 1 if a check fails (lookup, trial), else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.bench_input import stage_maps, write_voc_folder
from core.build import build_net
from core.config import make_config
from core.data import VOCDataset
from core.data.transforms import apply_transform_uint8, draw_transform, paired_random_transform
from core.environment import cpu_model
from core.loader import BatchLoader, resolve_loader_workers
from core.losses import auxsegnet_loss
from core.records import Status
from core.train import autocast, batches, stage_optimizer
from core.trial import run_trial

NUM_CLASSES = 21


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def paper_config(tiny: bool, root: Path | str = "/voc", bf16: bool = False):
    sets = [f"data.root={root}", "model.init_weights=none", f"train.amp={str(bf16).lower()}"]
    if tiny:
        sets += ["model.width=0.0625", "train.crop=64", "train.batch_size=2", "model.dilations=1,2,3"]
    return make_config("paper", sets)


def step_time(device: torch.device, tiny: bool, bf16: bool, steps: int, official: Path | None) -> list[dict]:
    """ms per training step of ours (and theirs), with peak GPU memory."""
    from bench.bench_parity import import_official, targets

    cfg = paper_config(tiny, bf16=bf16)
    t = cfg.train
    x = torch.randn(t.batch_size, 3, t.crop, t.crop, device=device)
    tg = {k: v.to(device) for k, v in targets(t.batch_size, t.crop, t.crop, 0).items()}
    nets = [("ours", build_net(cfg, NUM_CLASSES))]
    if official is not None:
        nets.append(("theirs", import_official(official.resolve()).SegNet(num_classes=NUM_CLASSES)))
    return [time_net(name, net, cfg, x, tg, device, bf16, steps) for name, net in nets]


def time_net(name, net, cfg, x, tg, device: torch.device, bf16: bool, steps: int) -> dict:
    from bench.bench_parity import released_loss

    net = net.to(device).train()
    opt = stage_optimizer(net, cfg) if name == "ours" else torch.optim.SGD(net.parameters(), lr=1e-4)
    weights = {"cls": 1.0, "sal": 1.0, "seg": 1.0}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with autocast(cfg, device):
            if name == "ours":
                o = {k: v.float() for k, v in net(x).items()}
                loss = auxsegnet_loss(o, tg, weights)[0]
            else:
                cls, _, sal, sal_ref, seg, seg_ref, _ = net(x, require_cam=True)
                o = {"cls": cls, "sal": sal, "sal_ref": sal_ref, "seg": seg, "seg_ref": seg_ref}
                loss = released_loss({k: v.float() for k, v in o.items()}, tg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # cuDNN autotuning, allocator warm-up
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    ms = (time.perf_counter() - t0) / steps * 1000
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    t = cfg.train
    return {
        "check": "step",
        "net": name,
        "precision": "bf16" if bf16 and device.type == "cuda" else "fp32",
        "batch": t.batch_size,
        "crop": t.crop,
        "width": cfg.model.width,
        "ms_per_step": round(ms, 1),
        "peak_gib": None if peak is None else round(peak, 2),
        "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
    }


def data_wait(device: torch.device, tiny: bool, root: Path, epochs: int) -> list[dict]:
    """The training loop's wait for batches with 0 and with auto loader workers, the real step between."""
    cfg = paper_config(tiny, root)
    auto = resolve_loader_workers(cfg, device) or 2  # auto is 0 on the CPU; measure 2 there
    out = []
    for workers in (0, auto):
        ds = VOCDataset(root, "train")
        segs, sals = stage_maps(ds)
        torch.manual_seed(0)
        net = build_net(cfg, NUM_CLASSES).to(device).train()
        opt = stage_optimizer(net, cfg)
        weights = {"cls": 1.0, "sal": 1.0, "seg": 1.0}
        rng = np.random.default_rng(0)
        walls, waits, steps = 0.0, 0.0, 0
        with BatchLoader(workers, device) as loader:
            for e in range(epochs):
                wait, t0 = 0.0, time.perf_counter()
                it = batches(ds, cfg, rng, lambda i: {"seg": segs[i], "sal": sals[i]}, loader)
                while True:
                    tw = time.perf_counter()
                    b = next(it, None)
                    wait += time.perf_counter() - tw
                    if b is None:
                        break
                    x = b["image"].to(device, non_blocking=True)
                    tg = {k: b[k].to(device, non_blocking=True) for k in ("labels", "seg", "sal")}
                    with autocast(cfg, device):
                        o = {k: v.float() for k, v in net(x).items()}
                    loss = auxsegnet_loss(o, tg, weights)[0]
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    loss.item()  # train_stage reads the loss every step: the host waits for the GPU there
                    steps += e > 0
                if e > 0:  # the first epoch decodes (synchronous path) or starts the workers
                    walls, waits = walls + time.perf_counter() - t0, waits + wait
        out.append(
            {
                "check": "data_wait",
                "workers": workers,
                "wait_share": round(waits / walls, 3),
                "ms_per_step": round(walls / max(steps, 1) * 1000, 1),
                "images": len(ds),
                "batch": cfg.train.batch_size,
                "crop": cfg.train.crop,
            }
        )
        del net, opt
    return out


def lookup(device: torch.device) -> dict:
    """A uint8 batch normalised on the device (the CUDA path) against paired_random_transform."""
    rng = np.random.default_rng(0)
    loader = BatchLoader(0, device, normalise_on_device=True)
    same = True
    for seed in range(8):
        h, w = int(rng.integers(200, 500)), int(rng.integers(200, 500))
        s = {
            "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
            "seg": rng.integers(0, 21, (h, w)).astype(np.uint8),
        }
        want = paired_random_transform(s, 321, (0.7, 1.3), True, np.random.default_rng(seed))
        d = draw_transform(h, w, 321, (0.7, 1.3), True, np.random.default_rng(seed))
        u8 = apply_transform_uint8(s, 321, d)
        got = loader.to_device({k: v[None] for k, v in u8.items()})
        same &= got["image"][0].cpu().numpy().tobytes() == want["image"].tobytes()
        same &= got["seg"][0].cpu().numpy().tobytes() == want["seg"].tobytes()
    return {"check": "lookup", "device": str(device), "bit_identical": bool(same)}


def trial(device: torch.device, tiny: bool, runs: Path) -> dict:
    """A small trial on the device, stopped after stage 0 (a pruner's exception) and resumed."""
    os.environ["AUXSEG_RUNS"] = str(runs)  # a cold cache: the warm-up runs on this device
    sets = [f"train.device={device.type}", "train.warmup_epochs=1", "train.stage_epochs=1", "train.stages=2",
            "train.workers=2", "train.loader_workers=2", "eval.curve_images=4", "eval.gallery_images=0",
            "eval.scales=1.0"]  # fmt: skip
    if tiny:  # the test suite's CPU run: one thread (a loaded machine's cores), no post-processing
        sets += ["train.threads=1", "eval.post=false"]
    cfg = make_config("smoke", sets)

    class Stop(Exception):
        pass

    def stop_after_first(stage: int, record: dict) -> None:
        if stage == 0:
            raise Stop

    ckpt = runs / "checkpoint"
    t0 = time.perf_counter()
    try:
        run_trial(cfg, report=stop_after_first, checkpoint_dir=ckpt)
        return {"check": "trial", "ok": False, "error": "the trial was not stopped after stage 0"}
    except Stop:
        pass
    resumed = run_trial(cfg, checkpoint_dir=ckpt)
    rec = {
        "check": "trial",
        "device": str(device),
        "status": str(resumed.status),
        "resumed_from": resumed.resumed_from,
        "final_miou": resumed.final["miou"] if resumed.final else None,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    ok = resumed.status == Status.COMPLETE and resumed.resumed_from == [{"stage": 0, "epoch": 1}]
    if not tiny:
        twin = run_trial(cfg)
        rec["resume_identical"] = [s["val"] for s in twin.stages] == [s["val"] for s in resumed.stages]
    rec["ok"] = bool(ok and not ckpt.exists())
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a narrow net, small crops, few steps (CPU tests)")
    ap.add_argument("--official", type=Path, default=None, help="the authors' repository (as bench_parity)")
    ap.add_argument("--images", type=int, default=None, help="generated images (default 64; tiny 12)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available (--device cpu --tiny runs on the CPU)",
              file=sys.stderr)  # fmt: skip
        return 2
    device = torch.device(a.device)
    if a.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # as the tests' trials: two threads on a loaded 2-core machine crawl
    name = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"{cpu_model()} ({os.cpu_count()} cores)"
    )
    emit({"check": "device", "device": name, "torch": torch.__version__, "tiny": a.tiny})
    steps, epochs, images = (2, 2, 12) if a.tiny else (20, 3, 64)
    t0, ok = time.perf_counter(), True
    for bf16 in (False, True):
        if bf16 and device.type != "cuda":
            continue  # bf16 autocast is train.amp, a GPU setting
        for rec in step_time(device, a.tiny, bf16, steps, a.official):
            emit(rec)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_voc_folder(Path(tmp) / "voc", a.images or images)
        for rec in data_wait(device, a.tiny, root, epochs):
            emit(rec)
        rec = lookup(device)
        ok &= rec["bit_identical"]
        emit(rec)
        rec = trial(device, a.tiny, Path(tmp) / "runs")
        ok &= rec["ok"]
        emit(rec)
    emit({"check": "done", "ok": bool(ok), "seconds": round(time.perf_counter() - t0, 1)})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
