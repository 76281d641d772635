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
import sys
import threading

from core.config import parse_overrides
from core.errors import HarnessError
from studies.backend import BACKENDS, backend
from studies.plan import Plan, confirm_name, confirm_plan, make_plan
from studies.preflight import (
    UsageError,
    auto_workers,
    check_artifacts,
    check_storage,
    check_user_data,
    note_legacy_checkpoints,
    open_store,
    thread_overrides,
)
from studies.records import Status
from studies.spec import Spec, SpecError, load_spec
from studies.summary import dry_run, study_summary


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage + error)
        raise UsageError(f"studies.run: {message} (see --help)")


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
    p.add_argument("--backend", choices=BACKENDS, default="optuna")
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


def _set_keys(spec: Spec, name: str, cli: dict) -> set[str]:
    s = spec.study(name)
    keys = set(spec.base_overrides) | set(s.overrides) | set(cli)
    for r in list(s.rows) + list(s.variants):
        keys |= set(r.overrides)
    return keys


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
        plan = make_plan(spec, args.name, preset=args.preset, cli_overrides=cli)
        workers = args.workers or 1
        if args.workers is None and args.backend == "optuna":
            workers = auto_workers(plan, user_keys, args.n_trials)
        per = (os.cpu_count() or 1) // workers if args.backend == "optuna" and workers > 1 else 0
        plan = plan.derive(thread_overrides(user_keys, per) if per else {})
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
        run_study = backend(args.backend)
        ray_options = dict(address=args.address, cpus_per_trial=args.cpus_per_trial,
                           gpus_per_trial=args.gpus_per_trial, user_keys=user_keys)  # fmt: skip
        try:
            return run_study(
                p,
                url,
                workers=args.workers if args.backend == "ray" else workers,
                n_trials=n_trials,
                retry_failed=args.retry_failed,
                artifacts=artifacts,
                log=live.log,
                events=live,
                **(ray_options if args.backend == "ray" else {}),
            )
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
