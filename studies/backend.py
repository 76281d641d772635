"""What a backend is: the one call studies.run makes to run a study, and what it promises.

run_study = backend("optuna")      # studies.optuna_backend.run_study; "ray": studies.ray_backend's
outcomes = run_study(plan, url, workers=2, n_trials=None, retry_failed=False, artifacts=None,
                     log=print, events=None)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # studies.execute loads Optuna: the CLI imports this module before it needs it
    from studies.execute import Outcome, TrialEvents
    from studies.plan import Plan

BACKENDS = ("optuna", "ray")


class Backend(Protocol):
    """Run (or resume) the study `plan` into the results store at `url`; return this invocation's outcomes.

    The contract both backends keep:
    - Every trial is the harness's (studies.execute.execute): its rows in the store, its Optuna trial in the
      same database, opened and closed through studies.optuna_adapter.OptunaStudy, so the dashboard and the
      report see one study whichever backend ran it.
    - A grid point runs exactly once across processes and machines (its claim in the store); a point whose
      trial ended interrupted, or failed with retry_failed, runs again; one that ended otherwise never does.
    - What a killed run left open is closed first (interrupted, in both stores) and run again.
    - workers: trials at once (None: the backend's default, optuna 1 in this process, Ray as many as the
      cluster holds); n_trials: at most this many
      trials in this invocation (None: the grid, or the study's n_trials less those finished); artifacts:
      the Optuna artifact store folder for the galleries (None: none); log: one line per ended trial and
      per recovery; events: told as each trial starts and ends (studies.live).
    - On KeyboardInterrupt (Ctrl-C, or SIGTERM through studies.run) this invocation's trials are stopped,
      closed as interrupted in both stores, their lines logged and their ends told to events, and the
      KeyboardInterrupt is raised again.
    A backend may take further keyword-only options with defaults (Ray: the cluster address, resources).
    """

    def __call__(
        self,
        plan: Plan,
        url: str,
        *,
        workers: int | None = ...,
        n_trials: int | None = None,
        retry_failed: bool = False,
        artifacts: str | None = None,
        log: Callable[[str], None] = print,
        events: TrialEvents | None = None,
    ) -> list[Outcome]: ...


def backend(name: str) -> Backend:
    """The run_study of backend `name` (imported on demand: Ray loads only when asked for)."""
    if name == "ray":
        from studies.ray_backend import run_study as ray_run_study

        return ray_run_study
    if name == "optuna":
        from studies.optuna_backend import run_study as optuna_run_study

        return optuna_run_study
    raise ValueError(f"unknown backend {name!r} (expected one of {', '.join(BACKENDS)})")
