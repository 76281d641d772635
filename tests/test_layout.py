"""The code's dependency rules (README "Code layout"), checked on the source: they break silently."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from core.records import Status
from tests.conftest import ROOT


def imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def files(*folders: str) -> list[Path]:
    return sorted(p for f in folders for p in (ROOT / f).rglob("*.py"))


def offending(paths: list[Path], banned: tuple[str, ...]) -> dict[str, list[str]]:
    hits = {str(p.relative_to(ROOT)): sorted(m for m in imports(p) if m.startswith(banned)) for p in paths}
    return {k: v for k, v in hits.items() if v}


@pytest.mark.parametrize(
    "folders, banned",
    [
        (("core",), ("studies", "reports", "testkit", "tests", "bench")),  # core knows nothing above it
        (("studies",), ("tests", "testkit", "bench")),
        (("reports",), ("json", "studies.models", "sqlalchemy.orm", "tests", "testkit", "bench")),
        (("bench", "testkit"), ("tests",)),
    ],
)
def test_dependencies_point_one_way(folders, banned):
    assert offending(files(*folders), banned) == {}


def test_pretrain_imports_nothing_from_the_trial():
    assert offending([ROOT / "core" / "pretrain.py"], ("core.trial", "core.cli")) == {}


def test_no_test_module_imports_another():
    tests = [p for p in files("tests") if p.name.startswith("test_")]
    hits = {
        str(p.relative_to(ROOT)): sorted(m for m in imports(p) if m.startswith("tests.test_")) for p in tests
    }
    assert {k: v for k, v in hits.items() if v} == {}


def literals(side: ast.expr) -> list[ast.expr]:
    """A comparison's side, or the elements of a tuple, list or set display at any depth
    (`sorted(...) == [("seg", 0, "complete")]`); a subscript or a call is not looked into."""
    if isinstance(side, (ast.Tuple, ast.List, ast.Set)):
        return [c for e in side.elts for c in literals(e)]
    return [side]


def test_statuses_are_compared_through_the_enum():
    """No comparison with a status string literal outside core/records.py (the enum) and the store's reading
    of legacy rows, the tests included: `t.status == "complete"` would keep working until a status is
    renamed. (A status as data, e.g. a stored row or a result dict a test writes, is no comparison.)"""
    values = {s.value for s in Status}
    found = []
    for p in files("core", "studies", "reports", "bench", "testkit", "tests"):
        if p == ROOT / "core" / "records.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                found += [
                    f"{p.relative_to(ROOT)}:{node.lineno}"
                    for c in literals(side)
                    if isinstance(c, ast.Constant) and c.value in values
                ]
    assert found == []


def test_kinds_and_decisions_are_compared_through_their_enums():
    """No comparison with a study kind (studies.spec.StudyKind) or a row decision
    (studies.sequential.Decision) as a string literal outside the module that defines it: `kind ==
    "ablation"` would keep working until a kind is added or renamed."""
    from studies.sequential import Decision
    from studies.spec import StudyKind

    found = []
    for enum, home in ((StudyKind, "studies/spec.py"), (Decision, "studies/sequential.py")):
        values = {e.value for e in enum}
        for p in files("core", "studies", "reports", "bench", "testkit"):
            if p == ROOT / home:
                continue
            for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Compare):
                    continue
                for side in [node.left, *node.comparators]:
                    consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                    found += [
                        f"{p.relative_to(ROOT)}:{node.lineno} {c.value!r}"
                        for c in consts
                        if isinstance(c, ast.Constant) and c.value in values
                    ]
    assert found == []


def test_both_backends_keep_the_backend_protocol():
    """studies.backend.Backend is the contract studies.run calls: each backend's run_study takes its
    parameters (same names, kinds and defaults but workers') and nothing more that lacks a default."""
    import inspect

    from studies.backend import BACKENDS, Backend, backend

    want = list(inspect.signature(Backend.__call__).parameters.values())[1:]  # without self
    for name in BACKENDS:
        have = inspect.signature(backend(name)).parameters
        for p in want:
            q = have.get(p.name)
            assert q is not None and q.kind == p.kind, (name, p.name)
            if p.name != "workers":
                assert q.default == p.default, (name, p.name, q.default)
        extra = [q for n, q in have.items() if n not in {p.name for p in want}]
        assert all(q.kind == q.KEYWORD_ONLY and q.default is not q.empty for q in extra), (name, extra)
    with pytest.raises(ValueError, match="unknown backend 'dask'"):
        backend("dask")


def test_configs_are_built_in_planning_only():
    """A trial's config is built once, when its study is planned (studies/plan.py), and travels with its grid
    point and Job: no other studies module builds one (spec.py checks the study file's base.set at parse)."""
    calls = []
    for p in files("studies"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", "")) in (
                "make_config",
                "config_from_dict",
            ):
                calls.append(p.name)
    assert set(calls) <= {"plan.py", "spec.py"} and calls.count("spec.py") == 1, calls


def test_studies_call_reports_only_at_the_cli_edge():
    """The one upward edge: studies.run's write_report builds the report at the end of a run. The summary,
    the live display and the progress counts live in studies."""
    hits = offending([p for p in files("studies") if p.name != "run.py"], ("reports",))
    assert hits == {}
    assert {m for m in imports(ROOT / "studies" / "run.py") if m.startswith("reports")} == {"reports"}


def test_the_cli_and_the_trial_flow_stay_short():
    """studies/run.py is argparse and the flow of main (checks in preflight, printing in summary); run_trial
    is its named steps in order (core.trial._Trial)."""
    assert len((ROOT / "studies" / "run.py").read_text(encoding="utf-8").splitlines()) <= 300
    tree = ast.parse((ROOT / "core" / "trial.py").read_text(encoding="utf-8"))
    (fn,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run_trial"]
    assert fn.end_lineno - fn.lineno + 1 <= 80
