"""The ablation settings AuxSegNet accepts (paper Tables 3-4): branch, affinity and constraint names and
the rules that combine them. Torch-free, so that config validation can use the model's own check.

    check_config(("seg", "sal"), "cross_task", ("seg",))  -> normalised (branches, affinity, constraints)
    check_config(("seg",), "cross_task", ("seg",))        -> SettingError, key "affinity"
"""

from __future__ import annotations

from collections.abc import Collection

from core.errors import HarnessError

BRANCHES = ("seg", "cls", "sal")
AFFINITIES = ("none", "seg", "cross_task")
CONSTRAINTS = ("seg", "sal")


class SettingError(HarnessError, ValueError):
    """An impossible ablation setting; ``key`` names the argument at fault (branches, affinity or
    constraints), so a caller can name its own key for it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check_config(
    branches: Collection[str], affinity: str, constraints: Collection[str]
) -> tuple[tuple[str, ...], str, tuple[str, ...]]:
    """Validate an ablation setting (Tables 3-4); returns normalised (branches, affinity, constraints):
    names in canonical order, duplicates dropped. Raises SettingError."""
    for name, given, allowed in (("branches", branches, BRANCHES), ("constraints", constraints, CONSTRAINTS)):
        if isinstance(given, str):
            raise SettingError(name, f"{name} must be a collection of names, got the string {given!r}")
        bad = sorted(set(given) - set(allowed))
        if bad:
            raise SettingError(name, f"unknown {name} {bad}; choose from {allowed}")
    branches = tuple(b for b in BRANCHES if b in set(branches))
    constraints = tuple(c for c in CONSTRAINTS if c in set(constraints))
    if "seg" not in branches:
        raise SettingError("branches", f"the seg branch is always required, got branches={branches}")
    if affinity not in AFFINITIES:
        raise SettingError("affinity", f"affinity must be one of {AFFINITIES}, got {affinity!r}")
    if affinity == "cross_task" and "sal" not in branches:
        raise SettingError("affinity", "affinity='cross_task' needs the sal branch")
    if affinity == "none" and constraints:
        raise SettingError("constraints", f"constraints {constraints} need an affinity (affinity='none')")
    if affinity != "none" and "seg" not in constraints:
        raise SettingError(
            "constraints", f"affinity={affinity!r} needs the 'seg' constraint, got constraints={constraints}"
        )
    if "sal" in constraints and affinity != "cross_task":
        raise SettingError(
            "constraints", "the 'sal' constraint needs affinity='cross_task' (and the sal branch)"
        )
    return branches, affinity, constraints
