"""Checkpoints of a running trial: a killed trial resumes at its last epoch with the same final numbers.

    folder/last.pt         the newest checkpoint: network, optimiser, RNG states, the trial record so far
    folder/labels-sS.npz   stage S's pseudo labels and saliency targets, written once at the stage's start

core.trial.run_trial writes them (train.checkpoint_every) and resumes from them (`checkpoint_dir`). Each
file is written to a temporary name, flushed to disk and renamed, so a kill or a full disk mid-write
leaves the previous checkpoint whole; an unreadable one is a one-line warning and the trial starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from core.config import Config, ConfigError

FORMAT = 1
LAST = "last.pt"
# Keys that change how a trial is run or kept, not its numbers: a resumed trial may differ in them.
NOT_IN_FINGERPRINT = (
    "train.checkpoint_every",
    "train.keep_checkpoint",
    "train.workers",
    "train.loader_workers",
)


class CheckpointMismatch(ConfigError):
    """The folder holds another configuration's checkpoint (one line, naming the file)."""


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def config_fingerprint(cfg: Config) -> str:
    """What a checkpoint must match to be resumed: the whole config and seed, but NOT_IN_FINGERPRINT."""
    d = cfg.to_dict()
    for key in NOT_IN_FINGERPRINT:
        section, name = key.split(".")
        d[section].pop(name, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """Every random stream a stage draws from: torch's (and CUDA's when initialised), the data order's
    generator, and numpy's and Python's global ones (nothing in core draws from those, a test double may)."""
    np_global = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "data_order": rng.bit_generator.state,
        "numpy": {**np_global, "state": {k: np.asarray(v).tolist() for k, v in np_global["state"].items()}},
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any], rng: np.random.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    rng.bit_generator.state = state["data_order"]
    g = state["numpy"]
    np.random.set_state(
        {**g, "state": {"key": np.asarray(g["state"]["key"], np.uint32), "pos": int(g["state"]["pos"])}}
    )
    random.setstate(state["python"])


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename over path, flushed to disk first: path is always a whole file or absent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:  # the rename itself survives a power loss
        os.fsync(fd)
    finally:
        os.close(fd)


def labels_file(folder: Path, stage: int) -> Path:
    return folder / f"labels-s{stage}.npz"


def save_labels(folder: Path, stage: int, segs: list[np.ndarray], sal: list[np.ndarray] | None) -> None:
    """A stage's pseudo labels, compressed (piecewise-constant maps shrink about 50x): on VOC the raw
    uint8 maps of 10,582 images would be 2 GB per kind."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "shapes": np.array([a.shape for a in segs], np.int64).reshape(-1, 2),
        "seg": np.concatenate([a.ravel() for a in segs]) if segs else np.zeros(0, np.uint8),
    }
    if sal is not None:
        arrays["sal"] = np.concatenate([a.ravel() for a in sal]) if sal else np.zeros(0, np.uint8)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)

    _atomic(labels_file(folder, stage), write)


def load_labels(folder: Path, stage: int) -> tuple[list[np.ndarray], list[np.ndarray] | None]:
    with np.load(labels_file(folder, stage)) as z:
        shapes = z["shapes"]
        ends = np.cumsum([h * w for h, w in shapes])

        def split(flat: np.ndarray) -> list[np.ndarray]:
            parts = np.split(flat, ends[:-1]) if len(shapes) else []
            return [p.reshape(int(h), int(w)) for p, (h, w) in zip(parts, shapes)]

        return split(z["seg"]), (split(z["sal"]) if "sal" in z.files else None)


def save(folder: Path, state: dict[str, Any]) -> float | None:
    """Write last.pt; returns the seconds it took, or None when it could not be written (disk full, ...):
    then the previous checkpoint stays and the trial goes on (a checkpoint never fails a trial)."""
    t = time.perf_counter()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic(folder / LAST, lambda tmp: torch.save({"format": FORMAT, **state}, tmp))
    except OSError as e:
        warn(f"checkpoint {folder / LAST} not written ({e.strerror or e}); the previous one is kept")
        return None
    for old in folder.glob("labels-s*.npz"):  # stages before the checkpoint's are no longer needed
        if old.name != labels_file(folder, state["stage"]).name:
            old.unlink(missing_ok=True)
    return time.perf_counter() - t


def load(folder: Path, fingerprint: str) -> dict[str, Any] | None:
    """The folder's checkpoint with its stage's labels (state["segs"], state["sal_targets"]), or None: no
    checkpoint, or an unreadable one (a warning naming the file; the trial then starts from its first
    epoch). CheckpointMismatch when it was written for another configuration."""
    path = folder / LAST
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"not a format-{FORMAT} trial checkpoint")
    except Exception as e:
        msg = str(e).strip().splitlines()
        warn(f"checkpoint {path} is unreadable ({type(e).__name__}: {msg[0] if msg else ''}); "
             "starting the trial from its first epoch")  # fmt: skip
        return None
    if state["fingerprint"] != fingerprint:
        raise CheckpointMismatch(
            f"checkpoint {path} was written by a trial of another configuration (fingerprint "
            f"{state['fingerprint']}, this one {fingerprint}); remove {folder} or use another folder"
        )
    try:
        state["segs"], state["sal_targets"] = load_labels(folder, state["stage"])
    except Exception as e:
        warn(f"checkpoint labels {labels_file(folder, state['stage'])} are unreadable ({type(e).__name__}); "
             "starting the trial from its first epoch")  # fmt: skip
        return None
    return state


def remove(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


def trial_state(
    fingerprint: str,
    stage: int,
    train: dict | None,
    net: torch.nn.Module,
    rng: np.random.Generator,
    record: dict,
) -> dict[str, Any]:
    """What last.pt holds for core.trial: the config it belongs to, the stage and its training state (None at
    the stage's start), the network, every random stream (rng_state) and the trial record so far (JSON)."""
    return {
        "fingerprint": fingerprint,
        "stage": stage,
        "train": train,
        "net": {k: v.detach().cpu() for k, v in net.state_dict().items()},
        "rng": rng_state(rng),
        "trial": json.dumps(record),
    }
