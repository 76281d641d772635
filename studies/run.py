"""Run (or resume) one study of study.yaml.

    python -m studies.run NAME [--preset P] [--storage URL] [--backend optuna|ray] [--workers N]
                               [--set key=value ...] [--n-trials N] [--dry-run] [--study-file study.yaml]
                               [--retry-failed] [--address ADDR] [--cpus-per-trial C] [--gpus-per-trial G]
                               [--no-report]

Re-running the same command continues the study: finished trials are kept, trials left running by a
killed process are marked interrupted and their grid points run again. --n-trials caps the
new trials of an ablation in this invocation, or sets the total trial count of a tuning study. At the
end it prints a summary (row, n, mean +- std of the metric) and writes the report (runs/reports/).
Before the first trial the device, the initial weights and the data set are checked (every file decoded
once; the pass is cached by the files' stats). While trials run, studies.live shows the progress (bars in a
terminal, a flushed status line otherwise). Ctrl-C or SIGTERM stops this process's trials and closes them
as interrupted in both stores before it exits (status 130).
Exit status: 0 ok, 1 some trial failed or the run broke, 2 bad input (one line on stderr), 130 stopped.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import threading
from typing import Any

from core.config import ConfigError, make_config, parse_overrides
from core.errors import HarnessError
from studies.plan import Plan, confirm_name, confirm_plan, make_plan
from studies.records import Status, StoredTrial
from studies.sequential import forecast_text, interval_text, status_text
from studies.spec import Spec, SpecError, load_spec

# --dry-run's states of a grid point not run yet (adaptive seeds: "if needed" when its row may not need it).
TODO, IF_NEEDED = "todo", "if needed"


class UsageError(HarnessError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + error)
        raise UsageError(f"studies.run: {message} (see --help)")


def check_user_data(plan: Plan, log=print) -> None:
    """The device, the initial weights and the data set are checked once per distinct setting before any
    trial is scheduled, so a wrong path or a bad file is one line and exit 2, not every trial failing. The
    data set check (check_data) decodes every image, mask and saliency map file once and remembers the
    pass by the files' stats."""
    from core.init_weights import check_init_weights

    seen: set = set()
    for ov in [p.overrides for p in plan.points] or [{**plan.base_overrides, **plan.run_overrides}]:
        cfg = make_config(plan.preset, ov)
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


def _help_epilog(study_file: str = "study.yaml") -> str:
    from core.config import PRESETS

    lines = [f"presets: {', '.join(PRESETS)}"]
    try:
        spec = load_spec(study_file)
        width = max(len(n) for n in spec.studies)
        lines.append(f"studies in {study_file}:")
        lines += [f"  {n:<{width}}  {st.description}" for n, st in spec.studies.items()]
    except (SpecError, ValueError):
        lines.append(f"studies: (none listed: {study_file} is missing or invalid)")
    return "\n".join(lines)


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


def build_parser(study_file: str = "study.yaml") -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m studies.run",
        description="Run or resume one study of study.yaml.",
        epilog=_help_epilog(study_file),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("name", nargs="?", help="study name in the study file (listed below)")
    p.add_argument("--study-file", default="study.yaml")
    p.add_argument("--preset", default=None, help="config preset (default: base.preset of the study file)")
    p.add_argument("--storage", default=None, help="SQLAlchemy URL (default: storage of the study file)")
    p.add_argument("--backend", choices=("optuna", "ray"), default="optuna")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="trials at once (optuna: on this machine, default one single-threaded trial per core for CPU "
        "presets, 1 on a GPU or for wide nets; ray: default as many as the cluster holds)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="config overrides applied to every trial of the study",
    )
    p.add_argument("--n-trials", type=int, default=None)
    p.add_argument("--dry-run", action="store_true", help="print the trial list and exit")
    p.add_argument("--retry-failed", action="store_true", help="also rerun grid points whose trial failed")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    p.add_argument(
        "--artifacts",
        default="runs/artifacts",
        help="Optuna artifact store folder for the trials' image galleries (default runs/artifacts; "
        "on several machines a folder every node can write)",
    )
    p.add_argument("--address", default=None, help="Ray cluster address (--backend ray)")
    p.add_argument(
        "--cpus-per-trial",
        type=float,
        default=None,
        help="Ray CPUs per trial (default: the smallest node's CPU count)",
    )
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="Ray resources per trial")
    return p


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
    cfgs = [make_config(plan.preset, p.overrides) for p in plan.points] or [
        make_config(plan.preset, {**plan.base_overrides, **plan.run_overrides})
    ]
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


def _set_keys(spec: Spec, name: str, cli: dict) -> set[str]:
    s = spec.study(name)
    keys = set(spec.base_overrides) | set(s.overrides) | set(cli)
    for r in list(s.rows) + list(s.variants):
        keys |= set(r.overrides)
    return keys


def stored_progress(plan: Plan, url: str) -> tuple[list[StoredTrial], list[float]]:
    """The study's stored trials, and the wall times of complete trials run with the same preset (any
    study of the store); ([], []) when the store does not exist yet."""
    from studies.db import StoreError
    from studies.store import Store

    store = Store(url, create=False)
    try:
        store.check_readable()
    except StoreError:
        return [], []
    except Exception as e:  # unreachable server: the dry run still lists the plan
        print(f"storage: cannot read it ({type(e).__name__}); progress unknown")
        return [], []
    trials = store.trials(plan.study.name) if plan.study.name in store.study_names() else []
    seconds = []
    for name, preset in store.presets().items():
        if preset == plan.preset:
            seconds += [t.seconds for t in store.trials(name, Status.COMPLETE) if t.seconds]
    store.close()
    return trials, seconds


def dry_run(plan: Plan, url: str, workers: int, how: str = "") -> None:
    from studies.db import redact_url

    s = plan.study
    print(f"study {s.name} ({s.kind}, preset {plan.preset}): {s.description}")
    trials, seconds = stored_progress(plan, url)
    done_keys = {t.key for t in trials if t.status in (Status.COMPLETE, Status.PRUNED)}
    failed_keys = {t.key for t in trials if t.status == Status.FAILED}
    print(f"storage: {redact_url(url)} ({len(trials)} trial(s) of this study stored)")
    print(f"workers: {workers} trial(s) at once{how}")
    if plan.is_grid:
        if plan.adaptive:
            rule, n_rows = s.adaptive, len(s.rows)
            print(
                f"adaptive seeds: initial {list(rule.initial)}, at most {rule.max} per row (then seeds "
                f"{', '.join(map(str, rule.sequence()[len(rule.initial) :])) or 'none'}, as rows need them); "
                f"{n_rows * len(rule.initial)} to {len(plan.points)} trials = {n_rows} rows x "
                f"{len(rule.initial)} to {rule.max} seeds; metric {s.metric}"
            )
            print(rule.describe(n_rows - 1))
        else:
            print(
                f"{len(plan.points)} trials = {len(s.rows)} rows x {max(1, len(s.variants))} variants x "
                f"{len(s.seeds)} seeds; metric {s.metric}"
            )
        wanted = plan.wanted_keys(trials)  # adaptive: the points the rule asks for now
        print(f"{'#':>3}  {'row':<34} {'variant':<10} {'seed':>4}  {'state':<9} overrides")
        for p in plan.points:
            ov = " ".join(f"{k}={_fmt(v)}" for k, v in p.overrides.items())
            state = Status.DONE if p.key in done_keys else Status.FAILED if p.key in failed_keys else TODO
            state = IF_NEEDED if state == TODO and wanted is not None and p.key not in wanted else state
            print(f"{p.grid_index:>3}  {p.row:<34} {p.variant or '-':<10} {p.seed:>4}  {state:<9} {ov}")
        print(f"{'row':<34} {'variant':<10} done / left")
        for r in s.rows:
            for v in list(s.variants) or [None]:
                pts = [p for p in plan.points if p.row == r.label and p.variant == (v.label if v else None)]
                n_done = sum(p.key in done_keys for p in pts)
                print(f"{r.label:<34} {v.label if v else '-':<10} {n_done:>4} / {len(pts) - n_done}")
        left = sum(p.key not in done_keys and p.key not in failed_keys for p in plan.points)
        if wanted is not None:  # adaptive: at least the points wanted now, at most every seed up to max
            lo_left = sum(k not in done_keys and k not in failed_keys for k in wanted)
            for r, d in plan.decide(trials).rows.items():
                fc = f"; {forecast_text(d, s.adaptive)}" if d.forecast else ""
                print(f"  {r}: {status_text(d, s.adaptive)}, {d.n} paired seed(s), {interval_text(d)}{fc}")
            _estimate(plan, seconds, workers, lo_left, left)
            return
    else:
        print(
            f"{s.n_trials} trials, sampler {s.sampler} (seed {s.sampler_seed}), pruner {s.pruner} on "
            f"{s.stage_metric} per stage; metric {s.metric}"
        )
        for p in s.params:
            rng = (
                f"choices {list(p.choices)}"
                if p.type == "categorical"
                else f"[{p.low}, {p.high}]"
                + (" log" if p.log else "")
                + (f" step {p.step}" if p.step else "")
            )
            print(f"  {p.name}: {p.type} {rng}")
        ov = " ".join(f"{k}={_fmt(v)}" for k, v in plan.overrides_for_params({}).items())
        print(f"  fixed overrides: {ov}")
        left = max(0, s.n_trials - sum(t.status != Status.INTERRUPTED for t in trials))
        print(f"done: {s.n_trials - left}, left: {left}")
        if s.confirm is not None:
            c = s.confirm
            lo_n, hi_n = (c.top + 1) * len(c.rule.initial), (c.top + 1) * c.rule.max
            print(
                f"then the confirmation ({confirm_name(s.name)}): the top {c.top} parameter sets and the "
                f"preset's values on fresh seeds {list(c.rule.initial)}, at most {c.rule.max} per row: "
                f"{lo_n} to {hi_n} trials ({c.rule.describe(c.top)}); `confirm: false` switches it off"
            )
            _estimate(plan, seconds, workers, left + lo_n, left + hi_n)
            return
    _estimate(plan, seconds, workers, left, left)


def _estimate(plan: Plan, seconds: list[float], workers: int, low: int, high: int) -> None:
    """The dry run's time estimate for low to high trials left (the same number for a fixed grid)."""
    if not high:
        return
    if not seconds:
        print(f"estimate: none yet (no complete trial of preset {plan.preset} in this store)")
        return
    per = statistics.median(seconds)
    n = f"{low}" if low == high else f"{low} to {high}"
    t = f"{low * per / workers / 60:.1f}" + ("" if low == high else f" to {high * per / workers / 60:.1f}")
    print(
        f"estimate: {n} trial(s) x {per:.0f} s (median of {len(seconds)} complete trial(s) of preset "
        f"{plan.preset} in this store) / {workers} worker(s) = {t} min"
    )


def _fmt(v: Any) -> str:
    if isinstance(v, (list, tuple)):
        return ",".join(map(str, v)) if v else "[]"
    return str(v).lower() if isinstance(v, bool) else str(v)


def study_summary(plan: Plan, store) -> str:
    """row, variant, n, mean +- std of the metric (percent), then notes: what is not complete and the earlier
    attempts and collapsed trials; a last line with the points complete of the grid ("15/15 points complete;
    2 earlier attempts interrupted"). All trials in the store, read as the report reads them (reports.load:
    the same values, progress counts and collapse flags). Collapsed (studies.quality): complete, but IoU 0
    on every foreground class; still in the mean."""
    from collections import Counter

    from reports.load import load_study

    s, r = plan.study, load_study(plan.study.name, store.url)
    t, done = r.trials, r.complete
    if plan.is_grid:
        order = [(row, v) for row in r.row_order() for v in r.variant_order()]
    else:
        order = sorted(set(zip(t["row"], t["variant"])), key=str)
    lines = [
        f"{s.name}: {s.metric} (%), mean +- std over seeds",
        f"{'row':<34} {'variant':<10} {'n':>3}  {'mean':>6} +- {'std':<6} notes",
    ]
    for row, variant in order:
        g = done[(done["row"] == row) & (done["variant"] == variant)]
        vals = list(g["value"].dropna())
        mean = f"{100 * statistics.fmean(vals):6.2f}" if vals else f"{'-':>6}"
        std = f"{100 * statistics.stdev(vals):<6.2f}" if len(vals) > 1 else f"{'-':<6}"
        if plan.is_grid:
            notes = r.progress(row, variant).notes()
        else:  # a tuning study's rows are single trials: the status is the note
            n = Counter(t[(t["row"] == row) & (t["variant"] == variant)]["status"])
            notes = [f"{k} {x}" for x, k in sorted(n.items()) if x not in (Status.COMPLETE, Status.RUNNING)]
        notes += [f"{int(g['collapsed'].sum())} collapsed"] if g["collapsed"].any() else []
        lines.append(
            f"{row:<34} {variant or '-':<10} {len(vals):>3}  {mean} +- {std} {', '.join(notes)}".rstrip()
        )
    if not plan.is_grid and done["value"].notna().any():
        b = done.loc[done["value"].idxmax() if s.direction == "maximize" else done["value"].idxmin()]
        lines.append(
            f"best: #{b.optuna_number} {100 * b.value:.2f} with "
            + " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in b.params.items())
        )
    if plan.adaptive:
        lines.append(s.adaptive.describe(len(s.rows) - 1))
        for row, d in r.decisions().rows.items():
            lines.append(
                f"  {row}: {status_text(d, s.adaptive)}; {d.n} paired seed(s) "
                f"{list(d.seeds)}; Δ vs {s.baseline} {interval_text(d)}"
                + (f"; {forecast_text(d, s.adaptive)}" if d.forecast else "")
            )
    lines.append(r.progress().line())
    return "\n".join(lines)


def confirmation(plan: Plan, store, n_trials: int | None = None) -> Plan | None:
    """The confirmation plan of a tuning study whose search is done (n_trials finished, not counting
    interrupted trials), else None. A rerun confirms the sets the first run chose (stored with
    NAME.confirm)."""
    from studies.execute import finished_count

    s = plan.study
    if plan.is_grid or s.confirm is None:
        return None
    if finished_count(plan, store) < (n_trials if n_trials is not None else s.n_trials):
        return None
    name = confirm_name(s.name)
    stored = store.study(name).spec.rows if name in store.study_names() else None
    return confirm_plan(plan, store.trials(s.name), stored)


def write_report(name: str, url: str, out_dir: str = "runs/reports", artifacts: str | None = None) -> None:
    """The CLI edge's one call into reports: the study's results are safe in the store whatever happens
    here, so a failing report is a warning, not a failed run. artifacts: the Optuna artifact store that
    the dashboard note's figures are uploaded to."""
    import reports

    try:
        print(f"[studies] report: {reports.build_report(name, url, out_dir=out_dir, artifacts=artifacts)}")
    except Exception as e:
        msg = str(e).strip().splitlines()
        print(
            f"[studies] warning: report failed: {type(e).__name__}: {msg[0] if msg else ''}", file=sys.stderr
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus the study name taken back from --set when it came after it
    (`--set loss.sal=0.5 ablation_tasks`): a --set item without '=' is the name."""
    argv = sys.argv[1:] if argv is None else list(argv)
    study_file = "study.yaml"
    for i, a in enumerate(argv):
        if a == "--study-file" and i + 1 < len(argv):
            study_file = argv[i + 1]
        elif a.startswith("--study-file="):
            study_file = a.split("=", 1)[1]
    args = build_parser(study_file).parse_args(argv)
    bare = [o for o in args.overrides if "=" not in o]
    if bare:
        if args.name is not None or len(bare) > 1:
            raise UsageError(f"studies.run: --set {bare[0]}: expected KEY=VALUE (see --help)")
        args.name = bare[0]
        args.overrides = [o for o in args.overrides if "=" in o]
    if args.name is None:
        raise UsageError("studies.run: the following arguments are required: name (see --help)")
    return args


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM stops a run as Ctrl-C does: this process's trials are closed as interrupted first."""
    raise KeyboardInterrupt


def _line_buffered() -> None:
    """Every line out at once, in order, also when stdout is a file (`nohup ... > log`)."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            try:
                stream.reconfigure(line_buffering=True)
            except (ValueError, OSError):
                pass


def main(argv: list[str] | None = None) -> int:
    _line_buffered()
    try:
        args = parse_args(argv)
        if args.workers is not None and args.workers < 1:
            raise UsageError("studies.run: --workers must be >= 1")
        if args.n_trials is not None and args.n_trials < 1:
            raise UsageError("studies.run: --n-trials must be >= 1")
        spec = load_spec(args.study_file)
        spec.study(args.name)
        cli = parse_overrides(args.overrides)
        # Threads per trial: the optuna backend divides this machine's cores among its workers; the ray
        # backend derives them from the cluster's resources per trial (ray_backend.trial_resources).
        user_keys = _set_keys(spec, args.name, cli)
        workers = args.workers or 1
        if args.workers is None and args.backend == "optuna":
            workers = auto_workers(
                make_plan(spec, args.name, preset=args.preset, cli_overrides=cli), user_keys, args.n_trials
            )
        per = (os.cpu_count() or 1) // workers if args.backend == "optuna" and workers > 1 else 0
        derived = thread_overrides(user_keys, per) if per else {}
        plan = make_plan(spec, args.name, preset=args.preset, cli_overrides=cli, derived_overrides=derived)
        url = args.storage or spec.storage
        if args.dry_run:
            how = f", {per} thread(s) each" if per else ""
            how += "" if args.workers else " (automatic: --workers N to choose)"
            dry_run(plan, url, workers, how if args.backend == "optuna" else " (ray: as the cluster holds)")
            return 0
        # Storage and artifact folder first (a bad path is one line in about a second, not after the data
        # set check), created only once every check passed: a failed check leaves no store or folder.
        check_storage(url)
        check_artifacts(args.artifacts, create=False)
        check_user_data(plan, log=lambda line: print(line, flush=True))
        store = open_store(url)
        artifacts = check_artifacts(args.artifacts)
        note_legacy_checkpoints(plan.study.name)
    except HarnessError as e:  # usage, study file, config, data set, store
        print(str(e), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)

    from studies.live import Live

    main_thread = threading.current_thread() is threading.main_thread()
    old_term = signal.signal(signal.SIGTERM, _terminate) if main_thread else None

    def run_phase(p: Plan, n_trials: int | None) -> list:
        """One study on the chosen backend, with its live display."""
        live = Live(p, store, workers if args.backend == "optuna" else (args.workers or 1),
                    retry_failed=args.retry_failed, n_trials=n_trials)  # fmt: skip
        try:
            if args.backend == "ray":
                from studies.ray_backend import run_study

                return run_study(
                    p,
                    url,
                    workers=args.workers,
                    n_trials=n_trials,
                    retry_failed=args.retry_failed,
                    artifacts=artifacts,
                    log=live.log,
                    events=live,
                    address=args.address,
                    cpus_per_trial=args.cpus_per_trial,
                    gpus_per_trial=args.gpus_per_trial,
                    user_keys=user_keys,
                )
            from studies.optuna_backend import run_study

            return run_study(p, url, workers=workers, n_trials=n_trials, retry_failed=args.retry_failed,
                             artifacts=artifacts, log=live.log, events=live)  # fmt: skip
        finally:
            live.close()

    names = [args.name]
    try:
        outcomes = run_phase(plan, args.n_trials)
        print(study_summary(plan, store))
        cplan = confirmation(plan, store, args.n_trials)
        if cplan is not None:  # a tuning study's search is done: its top sets on fresh seeds
            print(f"[studies] confirmation {cplan.study.name}: {cplan.study.description}", flush=True)
            outcomes += run_phase(cplan, None)
            print(study_summary(cplan, store))
            names.append(cplan.study.name)
    except KeyboardInterrupt:
        sys.stdout.flush()  # the trial lines first, then the message
        print("studies.run: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except HarnessError as e:  # e.g. ClusterError: no node holds one trial
        print(f"studies.run: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        msg = str(e).strip().splitlines()
        print(f"studies.run: {type(e).__name__}: {msg[0] if msg else ''}", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
    if not args.no_report:
        for name in names[::-1]:  # the confirmation first: the tuning report reads it
            write_report(name, url, artifacts=artifacts)
    failed = [o for o in outcomes if o.status in (Status.FAILED, Status.INTERRUPTED)]
    if failed:
        print(
            f"studies.run: {len(failed)} trial(s) failed or were interrupted in this run "
            "(reasons in harness_trials.error; interrupted ones rerun on the next invocation)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
