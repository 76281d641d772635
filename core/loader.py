"""Training batches prepared ahead in worker processes (train.loader_workers), with unchanged numbers.

The training process draws every random choice that core.train.batches draws, in its order: the epoch's
permutation, then each sample's scale, flip and crop offset (core.data.transforms.draw_transform, which
needs only the image's size, read from its file's header). The workers only carry them out: decode the
image, resize, flip, crop. So a trial's numbers are bit-identical for any worker count, and a checkpoint,
which stores the generator's state after an epoch, resumes exactly: by the end of an epoch the generator has
drawn what batches() would have. An epoch's choices are drawn as its batches are handed to the workers,
never the next epoch's: the next permutation is drawn after the epoch's checkpoint, as without workers (the
cost is one batch's wait at each epoch's start).

Workers: spawned processes (core.parallel.spawn_pool) that die with the training process
(core.parallel.die_with_parent), started at the first epoch and kept until close(); at most
PREFETCH_PER_WORKER batches per worker are in flight (a bounded queue). Memory: each worker reads its own
images from disk and keeps no decoded cache (the OS page cache holds the compressed files once for all
processes), so a worker holds the batches in flight and no more; decoding a 500x375 JPEG is a small part
of preparing it (README "Benchmarks", bench_input). The pseudo-label maps, which live in the training
process, travel with each job.

Normalising is a lookup of each uint8 level in normalize_lut, which normalize itself computed: no arithmetic
happens after the workers' resize, so the image is bit for bit what paired_random_transform gives, wherever
the lookup runs. For CUDA the workers send the image as uint8 (3 x crop x crop, a quarter of the float32
bytes); the training process copies it from pinned memory (non_blocking) and looks it up on the device. For
the CPU the workers look it up themselves (torch.take on the CPU took 25 ms for a paper-preset batch, numpy
in a worker 3.5 ms), so the training process only wraps the arrays. Label maps come back as uint8 (an
eighth of int64) and are widened where they land.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

from core.config import Config
from core.data import VOCDataset
from core.data.transforms import (
    Draw,
    apply_transform_uint8,
    draw_transform,
    normalize_lut,
    normalize_uint8,
)
from core.data.voc import read_image
from core.parallel import bounded_map, spawn_pool

# Batches in flight per worker: one being prepared and one waiting, so a worker never idles between jobs.
PREFETCH_PER_WORKER = 2
# auto on CUDA takes the cores left to this trial besides the training process, up to this many: a paper-
# preset batch (4 x 321 px from ~500x375 JPEGs) takes one worker 15-30 ms (bench_input), so 4 keep ahead of
# a 30-40 ms GPU step with room for a slow core; more would only hold memory.
MAX_AUTO_WORKERS = 4

# (samples: (image file, label maps, random choices), crop, image-level labels, normalise in the worker)
Job = tuple[list[tuple[str, dict[str, np.ndarray], Draw]], int, np.ndarray, bool]


def resolve_loader_workers(cfg: Config, device: torch.device) -> int:
    """train.loader_workers as a count: auto is 0 on the CPU, where the training step itself uses every core
    and a worker would take one from it; on CUDA, the cores this trial may use (train.threads, which
    studies.run sets to a trial's share when several run at once, else this process's CPU affinity) less
    one for the training process, at least 1 and at most MAX_AUTO_WORKERS."""
    v = cfg.train.loader_workers
    if v != "auto":
        return int(v)
    if device.type != "cuda":
        return 0
    cores = cfg.train.threads or len(os.sched_getaffinity(0))
    return max(1, min(cores - 1, MAX_AUTO_WORKERS))


def prepare_batch(job: Job) -> dict[str, np.ndarray]:
    """In a worker: decode, resize, flip and crop each sample as drawn; stack them; normalise the images if
    the job says so (else they stay uint8, see the module)."""
    samples, crop, labels, normalise = job
    outs = [apply_transform_uint8({"image": read_image(Path(p)), **maps}, crop, d) for p, maps, d in samples]
    batch = {k: np.stack([o[k] for o in outs]) for k in outs[0]}
    batch["labels"] = labels
    if normalise:
        batch["image"] = normalize_uint8(batch["image"], batch.pop("valid"), _lut())
    return batch


@functools.cache
def _lut() -> np.ndarray:
    return normalize_lut()


def epoch_jobs(
    ds: VOCDataset,
    cfg: Config,
    rng: np.random.Generator,
    extra: Callable[[int], dict] | None,
    normalise: bool,
) -> Iterator[Job]:
    """One epoch's batches as jobs, drawing from rng exactly what core.train.batches draws, in its order."""
    t = cfg.train
    order = rng.permutation(len(ds))
    for s in range(0, len(order), t.batch_size):
        idx = order[s : s + t.batch_size]
        if len(idx) == 1 and s > 0:  # BatchNorm needs more than one sample (as batches())
            break
        samples = []
        for i in idx:
            h, w = ds.image_size(i)
            maps = extra(i) if extra is not None else {}
            d = draw_transform(h, w, t.crop, (t.scale_min, t.scale_max), True, rng)
            samples.append((str(ds.image_path(i)), maps, d))
        yield samples, t.crop, np.stack([ds.labels(i) for i in idx]), normalise


class BatchLoader:
    """Training batches prepared by `workers` spawned processes (0: none; core.train.batches then prepares
    them in the training process, as before). Use as a context manager, or call close().
    normalise_on_device: look the uint8 image up on `device` rather than in the workers (default: on CUDA)."""

    def __init__(self, workers: int, device: torch.device, normalise_on_device: bool | None = None):
        if workers < 0:
            raise ValueError(f"BatchLoader: workers must be >= 0, got {workers}")
        self.workers = workers
        self.device = device
        self.on_device = device.type == "cuda" if normalise_on_device is None else normalise_on_device
        self._pool: ProcessPoolExecutor | None = None
        self._lut = torch.from_numpy(_lut()).to(device)
        self._offsets = (torch.arange(3, device=device) * 256).view(1, 3, 1, 1)
        self._pin = device.type == "cuda"

    def epoch(
        self,
        ds: VOCDataset,
        cfg: Config,
        rng: np.random.Generator,
        extra: Callable[[int], dict] | None = None,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """One epoch of batches, on the device: what core.train.batches yields, bit for bit."""
        if self.workers == 0:
            raise RuntimeError("BatchLoader.epoch: no workers (core.train.batches prepares the batches)")
        if self._pool is None:
            self._pool = spawn_pool(self.workers)
        window = PREFETCH_PER_WORKER * self.workers
        jobs = epoch_jobs(ds, cfg, rng, extra, not self.on_device)
        for batch in bounded_map(self._pool, prepare_batch, jobs, window):
            yield self.to_device(batch)

    def _send(self, a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        if self._pin:  # page-locked: the copy runs by DMA while the host goes on (non_blocking)
            return t.pin_memory().to(self.device, non_blocking=True)
        return t.to(self.device)

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A worker's batch -> the tensors batches() yields (image normalised, maps int64), on the device."""
        batch = dict(batch)
        if "valid" not in batch:  # normalised in the worker; numpy widens the maps in a fraction of torch's
            # time on a busy CPU (0.3 ms against 1.5-4 ms per paper-preset map)
            wide = {k: a.astype(np.int64) if a.dtype == np.uint8 else a for k, a in batch.items()}
            return {k: self._send(a) for k, a in wide.items()}
        img = self._send(batch.pop("image"))
        valid = torch.from_numpy(batch.pop("valid")).to(self.device)
        x = torch.take(self._lut, img.long() + self._offsets)  # normalize's values, looked up
        n = x.shape[-1]
        at = torch.arange(n, device=self.device)
        rows, cols = valid[:, 0].view(-1, 1, 1), valid[:, 1].view(-1, 1, 1)
        inside = (at.view(1, n, 1) < rows) & (at.view(1, 1, n) < cols)
        # the padding is +0.0 as apply_transform's canvas; multiplying by 0 would give -0.0 below the mean
        out = {"image": torch.where(inside[:, None], x, torch.zeros((), device=self.device))}
        out.update({k: self._widen(self._send(a)) for k, a in batch.items()})
        return out

    @staticmethod
    def _widen(t: torch.Tensor) -> torch.Tensor:
        return t.long() if t.dtype == torch.uint8 else t  # label maps: int64 as batches() gives them

    def close(self) -> None:
        """Stop the workers (and wait for them); the loader starts new ones if used again."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def worker_pids(self) -> list[int]:
        """The live workers' process ids (for tests and benchmarks)."""
        procs = getattr(self._pool, "_processes", None) or {}
        return sorted(procs)

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
