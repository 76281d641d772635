"""What a trial's config builds, in one place each: the runs/ folder, the data set's splits, the learning
curve's val subset, the warm-up classifier and the stage network."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from core.config import Config, ConfigError
from core.data import DEFAULT_SALIENCY, VOCDataset, ensure_generated
from core.model import AuxSegNet, Classifier


def runs_dir() -> Path:
    return Path(os.environ.get("AUXSEG_RUNS", "runs"))


def resolve_data_root(cfg: Config) -> Path:
    """The user's folder, or the embedded benchmark generated once under runs/data/."""
    if cfg.data.name == "voc":
        return Path(cfg.data.root)
    if cfg.data.root:
        return Path(cfg.data.root)
    root = runs_dir() / "data" / f"synthetic-{cfg.data.preset}-seed{cfg.data.seed}"
    ensure_generated(root, preset=cfg.data.preset, seed=cfg.data.seed)
    return root


def load_data(cfg: Config, validate: bool = True) -> tuple[VOCDataset, VOCDataset]:
    """Train and val splits; ``validate=False`` checks only the layout, split lists and saliency source
    (no image is read), which is what a scheduler checks before it starts any trial."""
    root = resolve_data_root(cfg)
    sal = cfg.data.saliency or (DEFAULT_SALIENCY if cfg.data.name == "synthetic" else "")
    if not sal:
        raise ConfigError("data.saliency must name a saliency folder (or built-in source) for data.name=voc")
    nc = cfg.data.num_classes or None
    train = VOCDataset(root, cfg.data.train_split, saliency=sal, num_classes=nc)
    val = VOCDataset(root, cfg.data.val_split, saliency=None, num_classes=train.num_classes)
    if validate:
        train.validate()
        val.validate()
    return train, val


def build_classifier(cfg: Config, num_classes: int) -> Classifier:
    """The warm-up classifier the config describes (the one place that maps model.* to it)."""
    m = cfg.model
    return Classifier(
        num_classes=num_classes,
        width=m.width,
        dropout=m.dropout,
        block_dropout=m.block_dropout,
        freeze_bn=m.freeze_bn,
    )


def build_net(cfg: Config, num_classes: int) -> AuxSegNet:
    """The AuxSegNet the config describes (the one place that maps model.* to its constructor)."""
    m = cfg.model
    return AuxSegNet(
        num_classes=num_classes,
        width=m.width,
        branches=m.branches,
        affinity=m.affinity,
        constraints=m.constraints,
        dropout=m.dropout,
        block_dropout=m.block_dropout,
        dilations=m.dilations,
        head_channels=m.head_channels,
        freeze_bn=m.freeze_bn,
        nonlocal_zero_init=m.nonlocal_zero_init,
        nonlocal_tied_init=m.nonlocal_tied_init,
        affinity_row_norm=m.affinity_row_norm,
        head_streams=m.head_streams,
    )


def curve_indices(n_val: int, k: int) -> list[int]:
    """The fixed learning-curve subset: k val images evenly spaced over the split (all if k >= n_val)."""
    if k <= 0 or n_val == 0:
        return []
    return sorted(set(np.linspace(0, n_val - 1, min(k, n_val)).round().astype(int).tolist()))
