"""Before a study runs: what studies.run checks and decides once, ahead of any trial.

The checks (a bad path or file is one line and exit 2, before any trial is scheduled and before a store or
folder is created): the store URL (check_storage, open_store), the artifact folder (check_artifacts), the
device, initial weights and data set of every distinct setting (check_user_data, check_data), and old
checkpoints that are no longer resumed (note_legacy_checkpoints). The sizing: how many trials run at once
on this machine and how many threads each gets (auto_workers, thread_overrides).
"""

from __future__ import annotations

import os
from typing import Any

from core.config import ConfigError
from core.errors import HarnessError
from studies.plan import Plan


class UsageError(HarnessError):
    pass


def check_user_data(plan: Plan, log=print) -> None:
    """The device, the initial weights and the data set are checked once per distinct setting before any
    trial is scheduled, so a wrong path or a bad file is one line and exit 2, not every trial failing. The
    data set check (check_data) decodes every image, mask and saliency map file once and remembers the
    pass by the files' stats."""
    from core.init_weights import check_init_weights

    seen: set = set()
    for cfg in plan.configs():
        if cfg.train.device.startswith("cuda") and cfg.train.device not in seen:
            seen.add(cfg.train.device)
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(
                    f"train.device={cfg.train.device}: this machine has no CUDA device "
                    f"(torch {torch.__version__}); use train.device=cpu"
                )
        if (cfg.model.init_weights, cfg.model.width) not in seen:
            seen.add((cfg.model.init_weights, cfg.model.width))
            check_init_weights(cfg.model.init_weights, cfg.model.width)
        if cfg.data not in seen:
            seen.add(cfg.data)
            check_data(cfg, log)


def check_data(cfg, log=print) -> None:
    """The data set of cfg: layout, split lists and saliency source (core.build.load_data), then every
    file decoded and sized (core.data.check, cached under runs/cache/data-check/); DataError names the
    first bad file. The embedded benchmark's own folder is left to the first trial while it does not
    exist yet: it is generated then, correct by construction (and checked from the next run on)."""
    from core.build import load_data, runs_dir
    from core.data.check import check_splits

    if cfg.data.name == "synthetic" and not cfg.data.root:  # core.build.resolve_data_root's folder
        generated = runs_dir() / "data" / f"synthetic-{cfg.data.preset}-seed{cfg.data.seed}"
        if not (generated / "summary.json").is_file():  # a cold first run: say why the first trial waits
            log(f"[studies] data set {generated}: the first trial generates it (once)")
            return
    train, val = load_data(cfg, validate=False)
    r = check_splits([train, val], runs_dir() / "cache" / "data-check", cfg.data.num_classes)
    how = "unchanged since its last check" if r.cached else f"checked in {r.seconds:.1f} s"
    log(
        f"[studies] data set {train.root}: {len(train)} train + {len(val)} val images, {r.files} image, "
        f"mask and saliency files decode at their image's size ({how})"
    )


def note_legacy_checkpoints(study: str) -> None:
    """One line when checkpoints of the layout before store tags are on disk: they are neither resumed
    (no store can tell they are its own) nor deleted (one may be another store's only copy)."""
    from studies.execute import legacy_checkpoints, study_checkpoints

    old = legacy_checkpoints(study)
    if old:
        print(
            f"[studies] note: {len(old)} checkpoint folder(s) in {study_checkpoints(study)} are of the "
            "layout before store tags and are not resumed; delete them once no interrupted trial needs them",
            flush=True,
        )


def check_artifacts(folder: str, create: bool = True) -> str:
    """The artifact folder proven writable before any trial (created when create; else only checked, so
    that a run stopped by a later check leaves no folder behind); its absolute path."""
    from pathlib import Path

    from core.cache import check_writable_dir, writable_dir

    p = Path(folder).expanduser().resolve()
    try:
        (writable_dir if create else check_writable_dir)(p)
    except OSError as e:
        raise UsageError(f"--artifacts {folder}: not a writable folder ({e.strerror or e})") from None
    return str(p)


def check_storage(url: str) -> None:
    """The store URL, reachable and writable, before anything else is checked or created: a file that is
    not a database, a folder or an unwritable path is one line in about a second (no store is created)."""
    from studies.db import StoreError, check_reachable

    try:
        check_reachable(url)
    except StoreError as e:
        raise UsageError(f"--storage: {e}") from None


def open_store(url: str):
    """The store the in-process trials use (one engine pair per process), created if new."""
    import sqlalchemy as sa

    from studies.db import StoreError, redact_url
    from studies.execute import get_store

    try:
        return get_store(url)
    except (StoreError, sa.exc.SQLAlchemyError) as e:  # e.g. an SQLite file damaged past its header
        why = " ".join(str(getattr(e, "orig", None) or e).split())
        raise UsageError(f"--storage: cannot open {redact_url(url)} ({why})") from None


def thread_overrides(plan_keys: set[str], cores_per_trial: int) -> dict[str, Any]:
    """Divide the cores among parallel trials unless the user set the thread counts."""
    out = {}
    for key in ("train.threads", "train.workers"):
        if key not in plan_keys:
            out[key] = max(1, cores_per_trial)
    return out


# Automatic parallelism (--workers not given, optuna backend). On the CPU a narrow net's step gains only
# 1.7x from a second intra-op thread and 2x from a second single-threaded process (default preset, full
# model, batch 8, bf16: 174 ms/step with 1 thread, 111 with 2; README "Time"), so such trials run one per
# core with one thread each. Nets wider than NARROW_WIDTH (the paper preset) run one at a time, as do GPU
# trials. TRIAL_MEMORY_BYTES bounds the count by the machine's memory: a default-preset trial's process
# held about 0.6 GiB resident (VmHWM, read during training); 2 GiB leaves room for the CRF and the data.
NARROW_WIDTH = 0.25
TRIAL_MEMORY_BYTES = 2 << 30


def auto_workers(
    plan: Plan, user_keys: set[str], n_trials: int | None = None, cores: int | None = None
) -> int:
    """Trials at once on this machine for the optuna backend when the user did not say (see above)."""
    cfgs = plan.configs()
    if any(c.train.device.startswith("cuda") for c in cfgs):
        return 1
    if any(c.train.device == "auto" for c in cfgs):
        import torch

        if torch.cuda.is_available():
            return 1
    if max(c.model.width for c in cfgs) > NARROW_WIDTH:
        return 1
    cores = cores or os.cpu_count() or 1
    threads = max(c.train.threads for c in cfgs) if "train.threads" in user_keys else 1
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = TRIAL_MEMORY_BYTES * cores
    bound = [max(1, cores // max(threads, 1)), max(1, memory // TRIAL_MEMORY_BYTES)]
    bound += [n for n in (len(plan.points), n_trials) if n]
    return min(bound)
