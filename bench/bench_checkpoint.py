"""What per-epoch checkpoints cost: write time as a share of training, and a checkpoint's size.

    python -m bench.bench_checkpoint [--preset default] [--seed 0] [--skip-trials]

1. One stage of the preset trained twice in this process, with a checkpoint after every epoch and
   without: the checkpoint writes' share of the training time (from the trial's own timings), the two
   runs' training times as a ratio, and whether their final numbers are identical (they must be).
2. Sizes: the preset's last.pt and stage labels as written by run 1, and the `paper` preset's last.pt
   (ResNet38 at width 1.0 with its optimiser state, built and written here, not trained: no VOC here).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from core import checkpoint
from core.build import build_net
from core.config import make_config
from core.environment import cpu_model, environment
from core.records import Status
from core.train import resolve_device, stage_optimizer
from core.trial import run_trial

MB = 1e6


def trial(preset: str, seed: int, every: int, folder: Path) -> dict:
    cfg = make_config(
        preset,
        [f"seed={seed}", "train.stages=1", "eval.post=false", "eval.gallery_images=0",
         f"train.checkpoint_every={every}", "train.keep_checkpoint=true"],
    )  # fmt: skip
    res = run_trial(cfg, checkpoint_dir=folder).to_dict()
    assert res["status"] == Status.COMPLETE, res["error"]
    return res


def paper_size(folder: Path) -> tuple[int, float]:
    """The paper preset's network and optimiser state, written as a trial's last.pt: (bytes, seconds)."""
    cfg = make_config("paper", ["data.root=/voc", "data.saliency=sr", "model.init_weights=none"])
    net = build_net(cfg, 21)
    opt = stage_optimizer(net, cfg)
    for p in net.parameters():  # one step with zero gradients creates whatever state the optimiser keeps
        p.grad = torch.zeros_like(p)
    opt.step()
    state = {
        "fingerprint": checkpoint.config_fingerprint(cfg),
        "stage": 0,
        "train": {"epoch": 0, "step": 1, "sums": {}, "optimizer": opt.state_dict()},
        "net": net.state_dict(),
    }
    took = checkpoint.save(folder, state)
    assert took is not None
    return (folder / checkpoint.LAST).stat().st_size, took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-trials", action="store_true", help="only the paper preset's size")
    args = ap.parse_args()
    env = environment(resolve_device(make_config(args.preset)), make_config(args.preset))
    print(f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, {env['precision']}")
    with tempfile.TemporaryDirectory(prefix="bench-ckpt-") as tmp:
        if not args.skip_trials:
            runs = {}
            for every in (1, 0):
                t = time.perf_counter()
                runs[every] = trial(args.preset, args.seed, every, Path(tmp) / f"every{every}")
                print(f"checkpoint_every={every}: trial {time.perf_counter() - t:.1f} s")
            on, off = runs[1], runs[0]
            epochs = on["config"]["train"]["stage_epochs"]
            ckpt_s, train_s = on["timings"]["checkpoint"], on["timings"]["train"]
            writes = on["checkpoint"]["writes"]
            print(
                f"{args.preset}: {writes} checkpoint writes (stage start + {epochs} epochs) "
                f"took {ckpt_s:.2f} s "
                f"= {100 * ckpt_s / train_s:.2f} % of the {train_s:.1f} s of training "
                f"({ckpt_s / writes:.3f} s per write, {train_s / epochs:.2f} s per epoch)"
            )
            print(
                f"training time with / without checkpoints: {train_s:.1f} / {off['timings']['train']:.1f} s "
                f"= {train_s / off['timings']['train']:.3f}x"
            )
            same = on["final"] == off["final"] and on["stages"][0]["val"] == off["stages"][0]["val"]
            print(f"final numbers identical with and without checkpoints: {same}")
            folder = Path(tmp) / "every1"
            labels = sum(p.stat().st_size for p in folder.glob("labels-s*.npz"))
            print(
                f"{args.preset} sizes: last.pt {(folder / checkpoint.LAST).stat().st_size / MB:.1f} MB, "
                f"stage labels {labels / MB:.2f} MB for {on['dataset']['n_train']} images"
            )
        size, took = paper_size(Path(tmp) / "paper")
        print(
            f"paper preset: last.pt {size / MB:.0f} MB (network + optimiser state), written in {took:.2f} s"
        )


if __name__ == "__main__":
    main()
