"""Open optuna-dashboard on a results store with its artifact folder, so the study notes show their figures.

    python -m studies.dashboard [--storage URL] [--artifacts DIR] [--port N] [--host HOST] [--study-file F]

The report's figures and the trials' galleries are Optuna artifacts in the folder `studies.run --artifacts`
wrote them to (runs/artifacts by default); optuna-dashboard serves them only when it is started on that
folder (its --artifact-dir), else a note shows each figure's alt text. This starts the dashboard through its
documented API (optuna_dashboard.run_server with a FileSystemArtifactStore) on the store's Optuna storage
(Store.optuna_storage: the same driver, lock handling and URL normalisation as studies.run). The store
defaults to the study file's `storage` (as studies.run's), the artifact folder to runs/artifacts. A store
that does not exist or holds no study, or an artifact folder that does not exist, is one line, exit 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.errors import HarnessError
from studies.db import DEFAULT_URL, StoreError, redact_url


class DashboardError(HarnessError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        raise DashboardError(f"studies.dashboard: {message} (see --help)")


def default_storage(study_file: str) -> str:
    """The study file's storage, as studies.run uses it; DEFAULT_URL without a readable study file."""
    from studies.spec import SpecError, load_spec

    try:
        return load_spec(study_file).storage
    except (SpecError, OSError, ValueError):
        return DEFAULT_URL


def open_storage(url: str):
    """The Optuna storage of an existing results store with at least one study, or DashboardError."""
    from studies.store import Store

    try:
        store = Store(url, create=False)
        store.check_readable()
        return store.optuna_storage()
    except StoreError as e:
        raise DashboardError(f"studies.dashboard: {e}") from None
    except Exception as e:  # e.g. a file that is not a database
        msg = " ".join(str(getattr(e, "orig", None) or e).split())
        raise DashboardError(f"studies.dashboard: cannot open {redact_url(url)} ({msg})") from None


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m studies.dashboard", description=__doc__.split("\n\n")[0])
    p.add_argument("--storage", default=None, help="results store URL (default: the study file's storage)")
    p.add_argument("--artifacts", default="runs/artifacts", help="artifact folder (default runs/artifacts)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--host", default="127.0.0.1", help="127.0.0.1 (default): this machine only")
    p.add_argument("--study-file", default="study.yaml")
    try:
        args = p.parse_args(argv)
        url = args.storage or default_storage(args.study_file)
        artifacts = Path(args.artifacts).expanduser().resolve()
        if not artifacts.is_dir():
            raise DashboardError(
                f"studies.dashboard: no artifact folder {artifacts} (the --artifacts that studies.run wrote "
                "to; without it the notes show no figures)"
            )
        storage = open_storage(url)
    except HarnessError as e:
        print(str(e), file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return int(e.code or 0)
    from optuna.artifacts import FileSystemArtifactStore
    from optuna_dashboard import run_server

    print(
        f"[studies] optuna-dashboard on {redact_url(url)} with artifacts {artifacts}: "
        f"http://{args.host}:{args.port}/dashboard (Ctrl-C stops it)",
        flush=True,
    )
    try:
        run_server(
            storage, host=args.host, port=args.port, artifact_store=FileSystemArtifactStore(str(artifacts))
        )
    except KeyboardInterrupt:
        return 0
    except OSError as e:  # the port is taken
        print(
            f"studies.dashboard: cannot serve on {args.host}:{args.port} ({e.strerror or e})", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
