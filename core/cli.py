"""`python -m core.trial`: one trial from the command line, its result.json and a summary.

python -m core.trial --preset smoke --set model.affinity=seg --out runs/one
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from core.cache import writable_dir
from core.config import ConfigError, make_config, parse_overrides
from core.errors import HarnessError
from core.records import Status
from core.trial import TrialResult, run_trial


def summary(res: TrialResult) -> str:
    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    m = res.config["model"]
    lines = [
        f"trial {res.status}" + (f": {res.error}" if res.error else ""),
        f"model: branches={'+'.join(m['branches'])} affinity={m['affinity']} "
        f"constraints={'+'.join(m['constraints']) or '-'} width={m['width']}",
    ]
    if res.dataset:
        d = res.dataset
        lines.append(
            f"data: {d['root']} ({d['n_train']} train / {d['n_val']} val, {d['num_classes']} classes, "
            f"saliency {d['saliency']})"
        )
    if res.warmup:
        lines.append(
            f"warm-up: {'cache hit' if res.warmup['cached'] else 'trained'} ({res.warmup['seconds']:.1f}s)"
        )
    if res.initial_pgt:
        p = res.initial_pgt
        lines.append(
            f"initial pseudo labels: precision {pct(p['precision'])} recall {pct(p['recall'])} "
            f"mIoU {pct(p['miou'])}"
        )
    lines.append("stage  val mIoU  mIoU post  pgt P / R / mIoU  seconds")
    for st in res.stages:
        v, p = st["val"], st["pgt"]
        lines.append(
            f"{st['stage']:>5}  {pct(v['miou']):>8}  {pct(v['miou_post']):>9}  "
            f"{pct(p['precision'])} / {pct(p['recall'])} / {pct(p['miou'])}  {st['seconds']:7.1f}"
        )
    for r in res.resumed_from:
        lines.append(f"resumed in stage {r['stage']} after {r['epoch']} of its epochs")
    lines.append(
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in res.timings.items()) + f"; total {res.seconds:.1f}s"
    )
    return "\n".join(lines)


def check_out(out: str) -> None:
    """--out: a folder (created if missing) this process can write; ConfigError (one line) otherwise."""
    p = Path(out).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(f"--out {out}: is a file, not a folder (for result.json and gallery.png)")
    try:
        writable_dir(p)
    except OSError as e:
        raise ConfigError(f"--out {out}: not a writable folder ({e.strerror or e})") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.trial", description="Run one complete AuxSegNet trial.")
    ap.add_argument("--preset", default="default")
    ap.add_argument("--set", dest="overrides", action="append", default=[], nargs="+", metavar="KEY=VALUE")
    ap.add_argument("--out", required=True, help="folder for result.json and gallery.png")
    args = ap.parse_args(argv)
    try:
        cfg = make_config(args.preset, parse_overrides([x for group in args.overrides for x in group]))
        check_out(args.out)  # before any training: a trial's result is never lost to a bad --out
        # The checkpoint lives beside result.json: rerunning the same command resumes a killed trial.
        res = run_trial(cfg, artifacts_dir=args.out, checkpoint_dir=Path(args.out) / "checkpoint")
    except HarnessError as e:  # a bad --preset, --set, --out, data set or init weights
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "result.json.tmp"
    tmp.write_text(json.dumps(res.to_dict(), indent=2))
    os.replace(tmp, out / "result.json")
    print(summary(res))
    print(f"wrote {out / 'result.json'}")
    return 0 if res.status == Status.COMPLETE else 1


if __name__ == "__main__":
    sys.exit(main())
