"""The one-way dependencies of DESIGN.md, checked on every import statement."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# (package whose files are checked, files left out, module prefixes they must not import)
RULES = [
    # service/cli/ is the composition root: it starts the gateway, the worker and beat.
    ("service", ("service/api/", "service/cli/"), ("workers", "service.api", "wirosim")),
    ("service/api", (), ("workers", "wirosim")),
    ("workers", (), ("service.api", "wirosim")),
    ("wirosim", (), ("service", "workers")),
    # The client is its own distribution: nothing of the server's, not even its libraries.
    (
        "clients/python/src/dreamgate_client",
        (),
        ("service", "workers", "wirosim", "migrations", "pydantic", "sqlalchemy", "celery"),
    ),
]


def imports_of(path: Path) -> list[tuple[int, str]]:
    """Every module a file imports, absolute or relative, with its line number."""
    found: list[tuple[int, str]] = []
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.append((node.lineno, module))
    return found


def violations(package: str, exempt: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    """Lines in ``package`` that import a forbidden module."""
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if any(rel.startswith(e) for e in exempt):
            continue
        for line, module in imports_of(path):
            if any(module == f or module.startswith(f + ".") for f in forbidden):
                bad.append(f"{rel}:{line} imports {module}")
    return bad


@pytest.mark.parametrize(
    ("package", "exempt", "forbidden"), RULES, ids=[r[0].rsplit("/", 1)[-1] for r in RULES]
)
def test_dependencies_run_one_way(
    package: str, exempt: tuple[str, ...], forbidden: tuple[str, ...]
) -> None:
    assert violations(package, exempt, forbidden) == []


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    sample = ROOT / "service" / "_architecture_probe.py"
    sample.write_text("from workers.tasks import submit\nfrom ..workers import app\n")
    try:
        found = violations("service", RULES[0][1], ("workers",))
    finally:
        sample.unlink()
    assert found == [
        "service/_architecture_probe.py:1 imports workers.tasks",
        "service/_architecture_probe.py:2 imports workers",
    ]


def calls_of(path: Path, names: set[str]) -> list[str]:
    """Calls in a file of attributes or functions named in ``names`` (``x.name(...)``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in names:
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} calls {name}")
    return found


def test_follow_ups_of_a_transition_happen_only_in_the_unit_of_work() -> None:
    # A transition's webhook message and admission wake-up follow its commit by
    # themselves (service/uow.py): no call site pairs a move with them by hand.
    bad = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        if path.name == "uow.py":
            continue
        bad += calls_of(path, {"announce", "released", "request_admission"})
    assert bad == []


def test_service_transitions_run_inside_a_unit_of_work() -> None:
    # A transition in a bare transaction() would commit without its follow-ups.
    bad = []
    for path in sorted((ROOT / "service").rglob("*.py")):
        source = path.read_text()
        if "jobs.transition(" in source and "transaction(svc.sessions)" in source:
            uses = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.With)]
            for node in uses:
                text = ast.unparse(node.items[0].context_expr)
                body = ast.unparse(node)
                if text.startswith("transaction(") and "jobs.transition(" in body:
                    bad.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}")
    assert bad == []
