"""python -m reports NAME [--storage URL] [--out DIR] [--artifacts DIR]: write DIR/NAME.md (+ PNG figures);
from a store other than the default, DIR/NAME--<store>-<hash>.md, so no store's report overwrites
another's. The report is also the study's optuna-dashboard note, its figures uploaded to the artifact store
(--artifacts, the folder `optuna-dashboard --artifact-dir` serves)."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("MPLBACKEND", "Agg")

from core.errors import HarnessError
from studies.db import DEFAULT_URL

from . import DEFAULT_OUT, build_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m reports", description=__doc__)
    ap.add_argument("name", help="study name (as in study.yaml)")
    ap.add_argument("--storage", default=DEFAULT_URL, help=f"SQLAlchemy URL (default {DEFAULT_URL})")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT}/)")
    ap.add_argument(
        "--artifacts",
        default="runs/artifacts",
        help="Optuna artifact store folder for the dashboard note's figures (default runs/artifacts; "
        "'' to name the figure files instead)",
    )
    args = ap.parse_args(argv)
    try:
        path = build_report(args.name, args.storage, args.out, artifacts=args.artifacts or None)
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
