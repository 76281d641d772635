"""What `studies.run` shows while a study runs: the study's progress and each of its running trials.

    live = Live(plan, store, workers, retry_failed=False, n_trials=None)
    run_study(..., log=live.log, events=live)   # the backends call live.started(job) / live.ended(job, out)
    live.close()

In a terminal (stderr is a TTY), tqdm bars redrawn every REFRESH_S seconds:

    ablation_tasks  3/15 points |#####          | running 2, failed 0, elapsed 4m10s, ETA 12m30s
      #3 seg+cls seed 1          |###            | stage 0 (of 1), epoch 3/8, 1m05s
      #4 seg seed 1              |               | warm-up and pseudo labels, 12s

Without a terminal (`nohup ... > log`), one flushed `[studies] progress:` line of at most LINE_CHARS
characters per trial event (a hand-off, one trial ending and the next starting, is one event: events within
HANDOFF_S share a line), and one after STATUS_S seconds without any, with the same numbers and each running
trial's stage and epoch (as many as fit, then `+k more`).

    [studies] progress: 3/15 points done, 2 running, 4m10s, ETA 12m30s | #3 seg seed 1: stage 0 3/8 | +1 more

The `[studies]` lines of the backends go through `log`, so they print above the bars, in order. So does all
other text while the bars are drawn (redirect_to_bars): this process's prints and Python warnings, Optuna's
log lines ("A new study created ..."), and the lines of the trial processes (relayed by the Optuna backend),
so no foreign text lands inside a bar's line.

Everything shown is read from the store, so it also counts the trials of other processes on the study:
points done / total and running / failed from the harness rows (studies.progress, the count the summary and
the report use), a running trial's stage from its stage rows and its epoch from its Optuna intermediate
values (step = global epoch). The ETA replays the claim order (longest point first, studies.plan) on this
process's workers, each point's time its cost (plan.trial_cost) times the seconds per cost unit of the
study's complete trials; a tuning study uses their median time. No ETA before the first trial ends. With
adaptive seeds the ETA is a range: the points the rule wants now, to every seed up to max for each row it
has not decided (and the baseline); and a `[studies] ROW: ...` line reports a row's decision each time it
moves (a seed landed, or it decided), with its deciding interval and, while unresolved, its forecast.
This module belongs to the CLI edge (studies.run), as its summary does.
"""

from __future__ import annotations

import io
import logging
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timezone
from typing import Any, TextIO

from tqdm import tqdm

from studies.execute import Job, Outcome
from studies.plan import Plan, trial_cost
from studies.records import Status, TrialProgress
from studies.sequential import Decision, forecast_text, interval_text, status_text
from studies.store import Store

REFRESH_S = 2.0  # terminal: how often the bars are redrawn from the store
STATUS_S = 60.0  # no terminal: a status line at least this often (and at every trial event)
HANDOFF_S = 0.5  # no terminal: trial events this close together share one status line
LINE_CHARS = 120  # no terminal: a status line's length at most (running trials beyond it: "+k more")
LABEL_CHARS = 16  # no terminal: a row label's length at most in a status line


def duration(seconds: float | None) -> str:
    """'45s', '4m10s', '1h02m'; '?' for None."""
    if seconds is None:
        return "?"
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def eta_text(snap: dict) -> str:
    """'4m10s'; with adaptive seeds, the work known now to the most the rule may add (every undecided row and
    the baseline up to max seeds): '4m10s–12m30s (up to max seeds)'."""
    eta, most = snap["eta"], snap.get("eta_max")
    if most is None or duration(most) == duration(eta):
        return duration(eta)
    return f"{duration(eta)}–{duration(most)} (up to max seeds)"


@dataclass
class TrialView:
    """One running trial of this process as the display shows it."""

    job: Job
    stages: int  # train.stages
    stage_epochs: int  # train.stage_epochs
    cost: float
    handed_at: float = 0.0  # when this process handed it out
    begun: bool = False  # its harness row exists (its process has started it)
    epochs_done: int = 0
    stages_done: int = 0
    seconds: float = 0.0

    @property
    def total_epochs(self) -> int:
        return self.stages * self.stage_epochs

    @property
    def name(self) -> str:
        return f"#{self.job.optuna_number} {self.job.label} seed {self.job.seed}"

    def where(self) -> str:
        """'stage 0 (of 2), epoch 3/8' (stages numbered from 0 as in the report, epochs of the stage done),
        or what the trial does before its first epoch / after its last."""
        if not self.begun:
            return "starting"
        if self.epochs_done == 0 and self.stages_done == 0:
            return "warm-up and pseudo labels"
        if self.epochs_done >= self.total_epochs:
            return "evaluation and gallery"
        s = min(self.epochs_done // self.stage_epochs, self.stages - 1)
        epoch = self.epochs_done - s * self.stage_epochs
        return f"stage {s} (of {self.stages}), epoch {epoch}/{self.stage_epochs}"

    def short(self) -> str:
        """'#3 seg+cls seed 1: stage 0 3/8' for a status line in a log (row label cut to LABEL_CHARS)."""
        label = self.job.label
        label = label if len(label) <= LABEL_CHARS else label[: LABEL_CHARS - 1] + "…"
        where = self.where()
        if where.startswith("stage "):
            s = min(self.epochs_done // self.stage_epochs, self.stages - 1)
            where = f"stage {s} {self.epochs_done - s * self.stage_epochs}/{self.stage_epochs}"
        else:
            where = {"warm-up and pseudo labels": "warm-up", "evaluation and gallery": "evaluation"}.get(
                where, where
            )
        return f"#{self.job.optuna_number} {label} seed {self.job.seed}: {where}"


class _Bar(tqdm):
    """A tqdm bar with a `{status}` field for its bar_format (tqdm's documented format_dict extension;
    `{postfix}` would start with a comma)."""

    status = ""

    @property
    def format_dict(self) -> dict:
        return {**super().format_dict, "status": self.status}


class _AboveBars(io.TextIOBase):
    """A text stream that hands each whole line written to it to write_line (which prints it above the
    bars); no terminal to whoever asks, so that tqdm bars of code run here (disable=None) stay off. A line
    without its newline yet waits for it (or for close)."""

    def __init__(self, write_line: Callable[[str], None], under: TextIO):
        super().__init__()
        self._write_line, self._under, self._part = write_line, under, ""

    def write(self, text: str) -> int:
        *lines, self._part = (self._part + text).split("\n")
        for line in lines:
            self._write_line(line.rsplit("\r", 1)[-1])  # a carriage return starts the line over
        return len(text)

    def isatty(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:  # C code that writes to the descriptor itself still gets the real one
        return self._under.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self._under, "encoding", "utf-8")

    def close(self) -> None:
        if self._part:
            self._write_line(self._part)
            self._part = ""
        super().close()


class _LogAboveBars(logging.Handler):
    """Optuna's log records ("A new study created ..."), formatted as Optuna's own handler does, printed above
    the bars."""

    def __init__(self, write_line: Callable[[str], None]):
        super().__init__()
        self._write_line = write_line
        self.setFormatter(logging.Formatter("[%(levelname)1.1s %(asctime)s] %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._write_line(self.format(record))
        except Exception:
            self.handleError(record)


class Live:
    """The live display of one `studies.run` invocation (see the module docstring). Thread-safe: a
    daemon thread redraws (terminal) or prints the periodic status line (no terminal)."""

    def __init__(
        self,
        plan: Plan,
        store: Store,
        workers: int,
        retry_failed: bool = False,
        n_trials: int | None = None,
        out: TextIO | None = None,
        err: TextIO | None = None,
        terminal: bool | None = None,
    ):
        self.plan, self.store, self.workers, self.retry_failed = plan, store, max(1, workers), retry_failed
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.terminal = self.err.isatty() if terminal is None else terminal
        self.t0 = time.time()
        self.mine: dict[int, TrialView] = {}  # this process's running trials by Optuna number
        self._rows_shown: dict[str, tuple[str, int]] = {}  # adaptive seeds: each row's last (status, n) shown
        self.started_here = 0
        self.budget = n_trials  # grid: at most this many new trials here; tuning: the study's n_trials
        s = plan.study
        if not plan.is_grid:
            self.budget = n_trials if n_trials is not None else s.n_trials
        self.cost = {p.key: p.cost for p in plan.points}
        self._lock = threading.RLock()
        self._last_line = 0.0
        self._stop = threading.Event()
        self._bars: list[Any] = []
        self._due: float | None = None  # no terminal: when the pending event's status line is due
        self._restore: Callable[[], None] | None = None
        if self.terminal:
            self._open_bars()
            self._restore = self.redirect_to_bars()
            self.status()
        else:  # the first line at once, shared with the first trial's start if it comes within HANDOFF_S
            self._due = time.time() + HANDOFF_S
        self._last_line = time.time()
        self._thread = threading.Thread(target=self._loop, name="studies-live", daemon=True)
        self._thread.start()

    # -- what the backends call ----------------------------------------------------------------
    def log(self, line: str) -> None:
        """A `[studies]` line: above the bars in a terminal, else printed and flushed at once."""
        self.above(line, self.out)

    def above(self, line: str, stream: TextIO) -> None:
        """line on stream, above the bars while they are drawn: they are cleared first and drawn again below
        it (tqdm.write would clear them only when it writes to their own stream, or when both streams are
        the sys ones, which redirect_to_bars replaces)."""
        with self._lock:
            if self.terminal and self._bars:
                with tqdm.external_write_mode(file=self.err):
                    stream.write(line + "\n")
                    stream.flush()
            else:
                print(line, file=stream, flush=True)

    def redirect_to_bars(self) -> Callable[[], None]:
        """While the bars are drawn, every other line of this process goes above them: sys.stdout and
        sys.stderr (prints, warnings, a trial run in this process) and Optuna's log records (its default
        handler writes to the stderr it found at import). Returns what undoes it."""
        import optuna

        saved = sys.stdout, sys.stderr
        sys.stdout = _AboveBars(lambda line: self.above(line, self.out), self.out)
        sys.stderr = _AboveBars(lambda line: self.above(line, self.err), self.err)
        logger = optuna.logging.get_logger("optuna")
        optuna.logging.disable_default_handler()
        handler = _LogAboveBars(lambda line: self.above(line, self.err))
        logger.addHandler(handler)

        def restore() -> None:
            logger.removeHandler(handler)
            optuna.logging.enable_default_handler()
            for stream in (sys.stdout, sys.stderr):
                if isinstance(stream, _AboveBars):
                    stream.close()
            sys.stdout, sys.stderr = saved

        return restore

    def started(self, job: Job) -> None:
        cfg = job.config
        view = TrialView(job, cfg.train.stages, cfg.train.stage_epochs, trial_cost(cfg), time.time())
        with self._lock:
            self.mine[job.optuna_number] = view
            self.started_here += 1
        self._event()

    def ended(self, job: Job, out: Outcome) -> None:
        with self._lock:
            self.mine.pop(job.optuna_number, None)
        self._event()

    def _event(self) -> None:
        """A trial started or ended: the bars now; without a terminal one status line HANDOFF_S later, which
        the trial handed out next (or any other event by then) shares."""
        if self.terminal:
            self.status()
            return
        with self._lock:
            if self._due is None:
                self._due = time.time() + HANDOFF_S

    def close(self) -> None:
        """Stop redrawing; the study bar stays on the screen with its last numbers."""
        self._stop.set()
        self._thread.join(timeout=5)
        if self._due is not None:  # an event not shown yet (the last trial's end)
            self.status()
        with self._lock:
            if self._restore is not None:
                self._restore()
                self._restore = None
            if self._bars:
                try:
                    self.status()
                except Exception:
                    pass
                for bar in reversed(self._bars[1:]):
                    bar.close()
                self._bars[0].close()
                self._bars = []

    # -- reading the store ---------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Counts, this process's running trials (stage, epoch, time) and the ETA, from the store."""
        from studies.progress import progress

        s = self.plan.study
        trials = self.store.trial_progress(s.name)
        # adaptive seeds: the points the rule wants so far (it reads the results: store.trials)
        stored = self.store.trials(s.name) if self.plan.adaptive else []
        decision = self.plan.decide(stored) if self.plan.adaptive else None  # once per refresh
        points = self.plan.expected_keys(stored, decision) if decision is not None else None
        attempts = [(t.key, t.status) for t in trials]
        if self.plan.is_grid:
            prog = progress(attempts, points if points is not None else [p.key for p in self.plan.points])
        else:
            prog = progress(attempts, None, self.budget)
        now = time.time()
        by_number = {t.optuna_number: t for t in trials}
        with self._lock:
            views = list(self.mine.values())
        storage = self.store.optuna_storage()
        for v in views:
            t = by_number.get(v.job.optuna_number)
            if t is None or t.status != Status.RUNNING:
                v.seconds = now - v.handed_at
                continue
            v.begun = True
            v.stages_done = t.stages
            if t.started_at is not None:
                v.seconds = now - t.started_at.replace(tzinfo=timezone.utc).timestamp()
            epochs = v.stages_done * v.stage_epochs
            if v.job.optuna_trial_id is not None:
                steps = storage.get_trial(v.job.optuna_trial_id).intermediate_values
                if steps:
                    epochs = max(epochs, max(steps) + 1)
            v.epochs_done = min(epochs, v.total_epochs)
        eta = self.eta(trials, views, None if points is None else set(points))
        eta_max = eta
        if decision is not None:  # at most: every seed up to max for each row the rule has not decided
            open_rows = {r for r, d in decision.rows.items() if d.status == Decision.UNRESOLVED}
            if open_rows:
                open_rows.add(s.baseline)
            upto = set(points) | {p.key for p in self.plan.points if p.row in open_rows}
            eta_max = self.eta(trials, views, upto)
        return {"progress": prog, "trials": trials, "views": views, "eta": eta, "eta_max": eta_max,
                "decision": decision}  # fmt: skip

    def eta(
        self, trials: list[TrialProgress], views: list[TrialView], expected: set | None = None
    ) -> float | None:
        """Seconds until this process's work is done (see the module docstring); None before any trial of
        the study is complete. expected: with adaptive seeds, the points wanted so far (not every seed up to
        max), so the ETA is that of the work known now."""
        done = [t for t in trials if t.status == Status.COMPLETE and t.seconds]
        if not done:
            return None
        if self.plan.is_grid:
            costs = [(self.cost.get(t.key), t.seconds) for t in done]
            costs = [(c, sec) for c, sec in costs if c]
            if not costs:
                return None
            rate = sum(sec for _, sec in costs) / sum(c for c, _ in costs)
            finished = {t.key for t in trials if t.status in (Status.COMPLETE, Status.PRUNED)}
            if not self.retry_failed:
                finished |= {t.key for t in trials if t.status == Status.FAILED}
            running = {t.key for t in trials if t.status == Status.RUNNING}
            running |= {(v.job.row, v.job.variant, v.job.seed) for v in views}  # handed out, maybe not begun
            todo = [p for p in self.plan.claim_order if p.key not in finished | running]
            left = [p.cost * rate for p in todo if expected is None or p.key in expected]
            if self.budget is not None:
                left = left[: max(0, self.budget - self.started_here)]
        else:
            per = statistics.median(t.seconds for t in done)
            rate = per / max(v.cost for v in views) if views else 0.0
            stored = sum(t.status != Status.INTERRUPTED for t in trials) + sum(not v.begun for v in views)
            left = [per] * max(0, self.budget - stored)
        loads = sorted(max(0.0, v.cost * rate - v.seconds) for v in views)
        loads += [0.0] * max(0, self.workers - len(loads))
        for work in left:  # list scheduling in claim order: the next point goes to the first free worker
            loads.sort()
            loads[0] += work
        return max(loads) if loads else 0.0

    # -- drawing ---------------------------------------------------------------------------------
    def _study_text(self, snap: dict) -> tuple[str, int, int]:
        prog = snap["progress"]
        failed = prog.states.get(Status.FAILED, 0)
        running = prog.running + sum(not v.begun for v in snap["views"])  # handed out, not begun yet
        text = (
            f"running {running}, failed {failed}, elapsed {duration(time.time() - self.t0)}, "
            f"ETA {eta_text(snap) if snap['eta'] is not None else '? (after the first trial)'}"
        )
        return text, prog.finished, prog.total

    def status(self) -> None:
        """Redraw the bars (terminal) or print one status line (no terminal)."""
        try:
            snap = self.snapshot()
        except Exception:  # the store is busy or briefly unreachable: the next refresh tries again
            return
        text, done, total = self._study_text(snap)
        self._row_lines(snap)
        with self._lock:
            if not self.terminal:
                print(self._log_line(snap, done, total), file=self.out, flush=True)
                self._last_line, self._due = time.time(), None
                return
            if not self._bars:
                return
            study = self._bars[0]
            study.total, study.n = total, done
            study.status = text
            study.refresh()
            views = sorted(snap["views"], key=lambda v: v.job.optuna_number)
            self._ensure_slots(len(views))
            for i, bar in enumerate(self._bars[1:]):
                if i < len(views):
                    v = views[i]
                    bar.set_description_str(v.name, refresh=False)
                    bar.total, bar.n = max(1, v.total_epochs), v.epochs_done
                    bar.status = f"{v.where()}, {duration(v.seconds)}"
                else:
                    bar.set_description_str("(idle)", refresh=False)
                    bar.total, bar.n = 1, 0
                    bar.status = ""
                bar.refresh()

    def _row_lines(self, snap: dict) -> None:
        """Adaptive seeds: one line per row each time its decision moves (a seed landed, or it decided), with
        its deciding interval and, while unresolved, the forecast (studies.sequential)."""
        if snap["decision"] is None:
            return
        rule, base = self.plan.study.adaptive, self.plan.study.baseline
        for row, d in snap["decision"].rows.items():
            waiting = d.status == Decision.UNRESOLVED and d.next_seed in rule.initial
            if waiting or self._rows_shown.get(row) == (d.status, d.n):
                continue
            self._rows_shown[row] = (d.status, d.n)
            fc = f"; {forecast_text(d, rule)}" if d.forecast else ""
            self.log(f"[studies] {row}: {status_text(d, rule)} at {d.n} paired seed(s), Δ vs {base} "
                     f"{interval_text(d)}{fc}")  # fmt: skip

    def _log_line(self, snap: dict, done: int, total: int) -> str:
        """The status line without a terminal: counts, time and ETA, then the running trials in order as long
        as the line stays within LINE_CHARS ('+k more' for the rest)."""
        prog = snap["progress"]
        failed = prog.states.get(Status.FAILED, 0)
        running = prog.running + sum(not v.begun for v in snap["views"])
        eta = eta_text(snap) if snap["eta"] is not None else "?"
        unit = "points" if self.plan.is_grid else "trials"
        line = f"[studies] progress: {done}/{total} {unit} done, {running} running"
        line += f", {failed} failed" if failed else ""
        line += f", {duration(time.time() - self.t0)}, ETA {eta}"
        views = sorted(snap["views"], key=lambda v: v.job.optuna_number)
        for i, v in enumerate(views):
            part, more = f" | {v.short()}", f" | +{len(views) - i} more"
            rest = len(views) - i - 1
            if len(line) + len(part) + (len(f" | +{rest} more") if rest else 0) > LINE_CHARS:
                return line + more
            line += part
        return line

    def _open_bars(self) -> None:
        unit = "points" if self.plan.is_grid else "trials"
        self._bars.append(
            _Bar(
                total=max(1, len(self.plan.points)),
                desc=self.plan.study.name,
                file=self.err,
                position=0,
                leave=True,
                dynamic_ncols=True,
                bar_format="{desc} {n_fmt}/{total_fmt} " + unit + " |{bar:20}| {status}",
                mininterval=0,
            )
        )
        self._ensure_slots(self.workers)

    def _ensure_slots(self, n: int) -> None:
        while len(self._bars) - 1 < n:
            self._bars.append(
                _Bar(
                    total=1,
                    desc="(idle)",
                    file=self.err,
                    position=len(self._bars),
                    leave=False,
                    dynamic_ncols=True,
                    bar_format="  {desc:<32} |{bar:20}| {status}",
                    mininterval=0,
                )
            )

    def _loop(self) -> None:
        while not self._stop.wait(REFRESH_S if self.terminal else HANDOFF_S / 5):
            now = time.time()
            if (
                self.terminal
                or now - self._last_line >= STATUS_S
                or (self._due is not None and now >= self._due)
            ):
                self.status()
