"""A data set checked once, before a study's first trial: every image, mask and saliency map file of its
splits decodes and has its image's size, masks hold valid class ids, every image has labels
(VOCDataset.check_item: the reads a trial makes). The first bad file is a one-line DataError naming it.

    result = check_splits([train, val], cache_dir=Path("runs/cache/data-check"), num_classes=0)
    result.cached, result.items, result.seconds

A check that passed is remembered in cache_dir/<key>.json, the key a hash of every file's path, size and
modification time (and of the split lists, labels.json and classes.txt), written atomically; an unchanged
data set is then only stat()ed, a changed or regenerated one is decoded again.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .voc import VOCDataset

CHECK_VERSION = 1  # bump when check_item checks more, so older passes are not trusted


@dataclass(frozen=True)
class CheckResult:
    cached: bool  # the same files passed before: nothing was decoded
    items: int  # images checked (with their masks and saliency maps)
    files: int  # files behind them
    seconds: float


def _stat(p: Path | None) -> str:
    if p is None or not p.is_file():
        return f"{p}:-"
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def files_key(datasets: list[VOCDataset], num_classes: int = 0) -> tuple[str, int]:
    """(hash of what the check depends on, number of files): each split's root, name, saliency source and
    list file, labels.json, classes.txt and every item's files, by path, size and modification time."""
    h = hashlib.sha256(f"v{CHECK_VERSION}|{num_classes}".encode())
    n = 0
    for ds in datasets:
        root = ds.root.resolve()
        h.update(f"|{root}|{ds.split}|{ds.saliency_name}|{_stat(ds.split_file)}".encode())
        h.update(f"|{_stat(root / 'labels.json')}|{_stat(root / 'classes.txt')}".encode())
        for i in range(len(ds)):
            files = ds.item_files(i)
            n += len(files)
            h.update("|".join(_stat(f) for f in files).encode())
    return h.hexdigest()[:24], n


def check_splits(datasets: list[VOCDataset], cache_dir: Path, num_classes: int = 0) -> CheckResult:
    """Check every item of the splits (check_item) unless the same files passed before; DataError names the
    first bad file. A pass is recorded in cache_dir, atomically (temporary file + rename)."""
    t0 = time.time()
    key, n_files = files_key(datasets, num_classes)
    items = sum(len(ds) for ds in datasets)
    record = Path(cache_dir) / f"{key}.json"
    if record.is_file():
        return CheckResult(True, items, n_files, time.time() - t0)
    for ds in datasets:
        keep, ds.cache = ds.cache, False
        try:  # without classes.txt the class count reads every mask: once, without keeping them in memory
            ds.num_classes
        finally:
            ds.cache = keep
        for i in range(len(ds)):
            ds.check_item(i)
    record.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{key}.", dir=record.parent)
    with os.fdopen(fd, "w") as fh:
        json.dump({"roots": [str(ds.root.resolve()) for ds in datasets], "items": items, "files": n_files,
                   "seconds": time.time() - t0, "checked_at": time.time()}, fh)  # fmt: skip
    os.replace(tmp, record)
    return CheckResult(False, items, n_files, time.time() - t0)
