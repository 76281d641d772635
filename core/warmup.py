"""The classification warm-up and the initial CAMs, cached under runs/cache/<key>/ by exactly what they depend
on (WARMUP_KEYS, the data set's and the initial weights' fingerprints, the numerics), so the rows of an
ablation train one warm-up per seed, or one in all with train.warmup_seed."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from core.build import build_classifier, runs_dir
from core.cache import atomic_dir
from core.config import Config, warmup_inputs
from core.cues import compute_cams
from core.data import VOCDataset
from core.environment import numerics_fingerprint
from core.init_weights import resolve_init_weights, weights_fingerprint
from core.loader import BatchLoader
from core.model import load_backbone
from core.train import to_device, train_warmup

# Bump when the warm-up or CAM code changes, so old cache entries are not reused.
CACHE_VERSION = 3
# The fields the warm-up checkpoint and the initial CAMs depend on, as core.config marks them
# (warmup_input): not saliency, loss, affinity. train.warmup_seed is read as "seed" (warmup_seed()), so a
# shared warm-up is the per-seed one of that seed.
WARMUP_KEYS = [k for k in warmup_inputs() if k != "train.warmup_seed"]


def warmup_seed(cfg: Config) -> int:
    """The seed the warm-up trains with: train.warmup_seed when set (shared by every trial seed), else the
    trial's."""
    return int(cfg.train.warmup_seed) if cfg.train.warmup_seed else cfg.seed


def warmup_keys(cfg: Config, device: torch.device) -> list[str]:
    """The config fields the warm-up and initial CAMs depend on for this config (train.amp only on a GPU)."""
    return WARMUP_KEYS + (["train.amp"] if device.type == "cuda" else [])


def config_key(cfg: Config, device: torch.device) -> str:
    """The config's part of the warm-up cache key: its warm-up inputs, with the warm-up's own seed."""
    return dataclasses.replace(cfg, seed=warmup_seed(cfg)).fingerprint(warmup_keys(cfg, device))


def warmup_and_cams(
    cfg: Config, ds: VOCDataset, device: torch.device, loader: BatchLoader | None = None
) -> tuple[dict, list, bool, float]:
    """Classification warm-up and initial CAMs, from runs/cache/<key>/ when another trial made them. The
    loader (its worker count) does not change them, so it is no part of the key."""
    # The data set's own fingerprint joins the config fields: the same data.root can hold new data.
    # So do the initial weights' file stats: a rebuilt checkpoint at the same path is a new warm-up.
    weights = resolve_init_weights(cfg.model.init_weights, cfg.model.width)
    seed = warmup_seed(cfg)
    key = (
        f"v{CACHE_VERSION}-{config_key(cfg, device)}-{ds.fingerprint()}-{weights_fingerprint(weights)}"
        f"-{numerics_fingerprint(device, cfg)}"
    )
    folder = runs_dir() / "cache" / key
    t0 = time.time()

    def fill(tmp: Path) -> None:
        torch.manual_seed(seed)
        clf = build_classifier(cfg, ds.num_classes)
        if weights is not None:
            load_backbone(weights, into=clf)
        clf = to_device(clf, cfg, device)
        train_warmup(clf, ds, cfg, device, np.random.default_rng([seed, 0]), loader)
        torch.save({k: v.cpu() for k, v in clf.state_dict().items()}, tmp / "classifier.pt")
        torch.save(compute_cams(clf, ds, device), tmp / "cams.pt")
        (tmp / "meta.json").write_text(
            json.dumps(
                {
                    "key_fields": {k: cfg.get(k) for k in warmup_keys(cfg, device)} | {"seed": seed},
                    "seconds": time.time() - t0,
                },
                default=list,
            )
        )

    hit = atomic_dir(folder, fill)
    state = torch.load(folder / "classifier.pt", weights_only=True)
    cams = torch.load(folder / "cams.pt", weights_only=True)
    seconds = json.loads((folder / "meta.json").read_text())["seconds"] if hit else time.time() - t0
    return state, cams, hit, seconds
