"""core.loader: batches prepared in worker processes are bit for bit the synchronous path's, the random
choices stay in the training process, train.loader_workers resolves as documented, the workers end."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest
import torch

from bench.bench_input import write_voc_folder
from core.config import ConfigError, make_config
from core.data import DataError, VOCDataset
from core.data.transforms import (
    apply_transform_uint8,
    draw_transform,
    normalize_uint8,
    paired_random_transform,
)
from core.loader import MAX_AUTO_WORKERS, BatchLoader, resolve_loader_workers
from core.train import batches
from tests.conftest import alive


def sample(rng: np.random.Generator, h: int, w: int) -> dict:
    return {
        "image": rng.integers(0, 256, (h, w, 3), dtype=np.uint8),
        "seg": rng.integers(0, 21, (h, w)).astype(np.uint8),  # a stage's pseudo labels
        "wide": rng.integers(0, 256, (h, w)).astype(np.int64),  # another integer dtype
        "mask": rng.random((h, w)) > 0.5,  # bool
        "soft": rng.random((h, w)).astype(np.float32),  # a soft map
        "labels": np.array([0.0, 1.0], np.float32),  # passed through
    }


@pytest.mark.parametrize("h, w, crop", [(40, 52, 32), (20, 26, 32), (31, 17, 24), (24, 24, 24)])
def test_the_uint8_path_with_lookup_normalisation_is_paired_random_transform_bit_for_bit(h, w, crop):
    """Images larger and smaller than the crop (padding), flips both ways, every map dtype."""
    lut = None
    for seed in range(12):
        s = sample(np.random.default_rng(seed), h, w)
        want = paired_random_transform(s, crop, (0.7, 1.3), True, np.random.default_rng(100 + seed))
        d = draw_transform(h, w, crop, (0.7, 1.3), True, np.random.default_rng(100 + seed))
        got = apply_transform_uint8(s, crop, d)
        assert got["image"].dtype == np.uint8 and got["seg"].dtype == np.uint8
        img = normalize_uint8(got["image"][None], got["valid"][None], lut)[0]
        assert img.tobytes() == want["image"].tobytes()  # bytes: +0.0 padding, not -0.0
        for k in ("seg", "wide", "mask"):
            assert got[k].astype(np.int64).tobytes() == want[k].tobytes(), k
        assert got["soft"].tobytes() == want["soft"].tobytes()
        assert got["labels"] is s["labels"]


def test_a_label_map_the_uint8_path_cannot_hold_is_refused():
    s = sample(np.random.default_rng(0), 20, 20)
    s["wide"][3, 3] = 300
    with pytest.raises(ValueError, match="'wide' must hold label ids in 0..255"):
        apply_transform_uint8(s, 16, draw_transform(20, 20, 16, rng=np.random.default_rng(0)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    # JPEGs of three shapes; 29 images in batches of 4: the last batch of 1 is dropped (BatchNorm), as
    # batches() drops it
    return write_voc_folder(tmp_path_factory.mktemp("voc") / "voc", 29, sizes=((60, 80), (80, 60), (50, 80)))


def stage_extra(ds: VOCDataset):
    rng = np.random.default_rng(5)
    segs = [rng.integers(0, 21, ds.image_size(i)).astype(np.uint8) for i in range(len(ds))]
    sals = [(rng.random(ds.image_size(i)) > 0.5).astype(np.uint8) for i in range(len(ds))]
    return lambda i: {"seg": segs[i], "sal": sals[i]}


@pytest.mark.parametrize("on_device", [False, True])
def test_workers_yield_what_batches_yields_and_draw_the_same_numbers(folder, on_device):
    """Two epochs (stage batches with both maps, then warm-up batches) with 2 workers against the
    synchronous path: equal tensors, dtypes and sign bits, and the generator left in the same state, so a
    checkpoint after the epoch resumes the same. on_device: the lookup the training process does for CUDA,
    run here on the CPU."""
    cfg = make_config("smoke", ["train.crop=48", "train.batch_size=4"])
    sync_ds, ds = VOCDataset(folder, "train"), VOCDataset(folder, "train")
    extra = stage_extra(sync_ds)
    a, b = np.random.default_rng(3), np.random.default_rng(3)
    with BatchLoader(2, torch.device("cpu"), normalise_on_device=on_device) as loader:
        for ex in (extra, None):
            want = list(batches(sync_ds, cfg, a, ex))
            got = list(batches(ds, cfg, b, ex, loader))
            assert len(got) == len(want) == 7
            for x, y in zip(want, got):
                assert list(x) == list(y)
                for k in x:
                    assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, k
                    assert x[k].numpy().tobytes() == y[k].numpy().tobytes(), k
            assert a.bit_generator.state == b.bit_generator.state
        pids = loader.worker_pids()
        assert len(pids) == 2 and all(alive(p) for p in pids)
    assert not ds._cache  # the training process decoded nothing: the workers read the images
    deadline = time.monotonic() + 30
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in pids), "close() left workers running"


def test_a_worker_error_reaches_the_training_process_as_the_data_error(folder, tmp_path):
    broken = tmp_path / "voc"
    shutil.copytree(folder, broken)
    victim = sorted((broken / "JPEGImages").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:700])  # the header (its size) reads, the pixels do not
    ds = VOCDataset(broken, "train")
    cfg = make_config("smoke", ["train.crop=48", "train.batch_size=4"])
    with BatchLoader(1, torch.device("cpu")) as loader:
        with pytest.raises(DataError, match=rf"^{victim}: cannot decode image"):
            for _ in batches(ds, cfg, np.random.default_rng(0), None, loader):
                pass


def test_loader_workers_resolve_and_bad_counts_are_one_line_errors():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert resolve_loader_workers(make_config("smoke"), cpu) == 0  # auto on the CPU: as before
    assert resolve_loader_workers(make_config("smoke", ["train.loader_workers=3"]), cpu) == 3
    cores = len(os.sched_getaffinity(0))
    assert resolve_loader_workers(make_config("smoke"), cuda) == max(1, min(cores - 1, MAX_AUTO_WORKERS))
    assert resolve_loader_workers(make_config("smoke", ["train.threads=3"]), cuda) == 2
    assert resolve_loader_workers(make_config("smoke", ["train.threads=64"]), cuda) == MAX_AUTO_WORKERS
    assert resolve_loader_workers(make_config("smoke", ["train.threads=1"]), cuda) == 1
    for bad in ("-1", "two", "1.5"):
        with pytest.raises(ConfigError) as e:
            make_config("smoke", [f"train.loader_workers={bad}"])
        assert str(e.value) == (
            f"train.loader_workers must be auto or a count >= 0 (0: batches prepared in the training "
            f"process), got {bad}"
        )
