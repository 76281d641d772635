"""Artifacts shared by trials (warm-up checkpoint, initial CAMs), keyed by what they depend on.

runs/cache/<key>/ is complete iff it exists: it is filled in a temporary sibling folder and renamed
into place in one step, so a killed run never leaves a half-written artifact that a later run trusts.
A per-key file lock makes concurrent trials with the same key wait for one computation.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def atomic_dir(final: Path, fill: Callable[[Path], None]) -> bool:
    """Create `final` by fill(tmp) + rename unless it exists. Returns True if it already existed (a hit)."""
    final = Path(final)
    with locked(final.parent / f".{final.name}.lock"):
        if final.is_dir():
            return True
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
        try:
            fill(tmp)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return False


def writable_dir(path: str | Path) -> Path:
    """path as a folder this process can write (created if missing), or OSError: proven with a real file,
    since permission bits alone do not tell (root, read-only mounts, full disks)."""
    p = Path(path).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=p, prefix=".write-check-"):
        pass
    return p


def check_writable_dir(path: str | Path) -> Path:
    """OSError unless writable_dir(path) would succeed, without creating anything: path is a folder this
    process can write, or the nearest folder above it that exists is (a file in the way is ENOTDIR)."""
    p = Path(path).expanduser().absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "a file is in the way", str(probe))
    with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-check-"):
        pass
    return p
