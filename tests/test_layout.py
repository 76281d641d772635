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


def test_statuses_are_compared_through_the_enum():
    """No comparison with a status string literal outside core/records.py (the enum) and the store's reading
    of legacy rows: `t.status == "complete"` would keep working until a status is renamed."""
    values = {s.value for s in Status}
    found = []
    for p in files("core", "studies", "reports", "bench", "testkit"):
        if p == ROOT / "core" / "records.py":
            continue
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            for side in [node.left, *node.comparators]:
                consts = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
                found += [
                    f"{p.relative_to(ROOT)}:{node.lineno}"
                    for c in consts
                    if isinstance(c, ast.Constant) and c.value in values
                ]
    assert found == []
