"""How far a study got: points done versus attempts made.

A grid point (row, variant, seed) may hold several trial records: a trial whose process died stays in the
store as `interrupted`, and the next `python -m studies.run` runs the point again as a new trial. So the
number of interrupted (or failed) trials counts attempts, not missing work; what is missing is the points
without a complete trial. A tuning study has no points: each trial is its own, and an interrupted one does
not count against the budget (n_trials). `progress` is the one place these counts are made: the report
(title, provenance, the n column) and the run's end-of-run summary (studies.run) both print from it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from studies.records import Status
from studies.sequential import StudyDecision
from studies.spec import Study

# Which attempt decides a point's state when it has several: a complete trial wins, then one still running.
_PRIORITY = (Status.COMPLETE, Status.RUNNING, Status.PRUNED, Status.FAILED, Status.INTERRUPTED)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


@dataclass(frozen=True)
class Progress:
    unit: str  # "point" (grid study: one (row, variant, seed)) or "trial" (tuning study)
    expected: int | None  # points in the grid, or the tuning budget; None when unknown
    states: Mapping[str, int]  # points per state: complete, running, pruned, failed, interrupted
    earlier: Mapping[
        str, int
    ]  # other attempts at points decided by a better one: failed, interrupted, running

    @property
    def complete(self) -> int:
        return self.states.get(Status.COMPLETE, 0)

    @property
    def finished(self) -> int:
        """Points that need no more work: complete, or stopped by the pruner (tuning)."""
        return self.complete + self.states.get(Status.PRUNED, 0)

    @property
    def not_started(self) -> int:
        return max(0, (self.expected or 0) - sum(self.states.values()))

    @property
    def total(self) -> int:
        return max(self.expected or 0, sum(self.states.values()))

    @property
    def running(self) -> int:
        """Trials running now (at points not complete, and any second attempt at a complete one)."""
        return self.states.get(Status.RUNNING, 0) + self.earlier.get(Status.RUNNING, 0)

    @property
    def partial(self) -> bool:
        """Trials still running, or points without a finished trial (failed, interrupted, not started)."""
        return self.running > 0 or self.finished < self.total

    def notes(self) -> list[str]:
        """What is not complete ('1 running', '2 not started', ...), then the earlier attempts
        ('2 earlier attempts interrupted'); [] when every point is complete at its first attempt."""
        order = [*_PRIORITY[1:], *sorted(k for k in self.states if k not in _PRIORITY)]
        out = [f"{self.states[k]} {k}" for k in order if self.states.get(k)]
        if self.not_started:
            out.append(f"{self.not_started} not started")
        if n := self.earlier.get(Status.RUNNING):  # another attempt at a point already complete
            out.append(f"{_plural(n, 'more attempt')} running")
        return out + [
            f"{_plural(n, 'earlier attempt')} {k}"
            for k in (Status.FAILED, Status.INTERRUPTED)
            if (n := self.earlier.get(k))
        ]

    def done_text(self) -> str:
        """'13/15 points complete' (tuning: '18/20 trials finished' when some were pruned)."""
        pruned = self.unit == "trial" and self.states.get(Status.PRUNED, 0)
        n = self.finished if pruned else self.complete
        return f"{n}/{self.total} {self.unit}s {'finished' if pruned else 'complete'}"

    def line(self) -> str:
        """'15/15 points complete; 2 earlier attempts interrupted', or
        '13/15 points complete (1 running, 1 failed); 1 earlier attempt interrupted'."""
        now = [n for n in self.notes() if "earlier attempt" not in n]
        before = [n for n in self.notes() if "earlier attempt" in n]
        return self.done_text() + (f" ({', '.join(now)})" if now else "") + "".join(f"; {b}" for b in before)


def progress(
    attempts: Iterable[tuple[tuple, Status]], points: Iterable[tuple] | None = None, budget: int | None = None
) -> Progress:
    """Points done and attempts made, from each trial's ((row, variant, seed), status). A grid study gives
    `points`, its (row, variant, seed) keys (variant None or ""); a tuning study gives `budget` (n_trials)
    instead, and each trial not interrupted is one of its points.
    A point's state is its best attempt (complete > running > pruned > failed > interrupted); its other
    failed and interrupted attempts are `earlier` attempts."""
    attempts = list(attempts)
    if points is None and budget is not None:  # tuning: interrupted trials never used up the budget
        states = Counter(s for _, s in attempts if s != Status.INTERRUPTED)
        earlier = Counter(s for _, s in attempts if s == Status.INTERRUPTED)
        return Progress("trial", budget, dict(states), dict(earlier))
    by_point: dict[tuple, list[Status]] = {}
    for (row, variant, seed), status in attempts:
        by_point.setdefault((row, variant or "", int(seed)), []).append(status)
    expected = {(r, v or "", int(s)) for r, v, s in points} if points is not None else set()
    states, earlier = Counter(), Counter()
    for statuses in by_point.values():
        best = min(statuses, key=lambda s: _PRIORITY.index(s) if s in _PRIORITY else len(_PRIORITY))
        states[best] += 1
        rest = list(statuses)
        rest.remove(best)
        earlier.update(s for s in rest if s in (Status.FAILED, Status.INTERRUPTED, Status.RUNNING))
    total = len(expected | set(by_point)) if points is not None else None
    return Progress("point", total, dict(states), dict(earlier))


def grid_points(
    spec: Study,
    ran: Iterable[tuple[str, str, int]],
    decision: StudyDecision | None = None,
    row: str | None = None,
    variant: str | None = None,
) -> list[tuple[str, str, int]] | None:
    """A grid study's (row, variant, seed) keys (variant "" when none), only those of `row` / `variant` when
    given: every point of the spec; with adaptive seeds the points the rule wants so far (decision) and
    those that ran (ran: the trials' keys). None for a tuning study."""
    if not spec.kind.is_grid:
        return None
    if spec.adaptive is not None:
        assert decision is not None, "adaptive seeds: the rule's decision on the trials"
        keys = {(r, "", int(seed)) for r, seed in decision.wanted}
        keys |= {(r, v or "", int(seed)) for r, v, seed in ran}
    else:
        variants = [v.label for v in spec.variants] or [""]
        keys = {(r.label, v, int(seed)) for r in spec.rows for v in variants for seed in spec.seeds}
    return sorted(k for k in keys if (row is None or k[0] == row) and (variant is None or k[1] == variant))
