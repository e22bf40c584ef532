"""The architecture rules that import-linter cannot see (docs/architecture.md).

No private name crosses a module boundary, nothing outside trainer.py reads a trainer's private
attributes, and no module grows past 500 lines. Each check reads the source, so a violation
fails here with the file and line.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src" / "tfloop"
MODULES = sorted(SOURCE.rglob("*.py"))
MAX_LINES = 500


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _relative(path: Path) -> str:
    return str(path.relative_to(SOURCE.parent)) if path.is_relative_to(SOURCE) else path.name


def _is_module(dotted: str, root: Path) -> bool:
    path = root.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def private_imports(path: Path, root: Path = SOURCE) -> list[str]:
    """``from tfloop.x import _name`` lines of ``path`` (a private module may be imported,
    a private name may not)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tfloop"):
            found += [
                f"{_relative(path)}:{node.lineno}: {alias.name}"
                for alias in node.names
                if _private(alias.name) and not _is_module(f"{node.module}.{alias.name}", root)
            ]
    return found


def _names_a_trainer(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in ("trainer", "_trainer")
    return isinstance(node, ast.Attribute) and node.attr in ("trainer", "_trainer")


def private_trainer_reads(path: Path) -> list[str]:
    """``trainer._x`` / ``self.trainer._x`` / ``getattr(trainer, "_x")`` in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if _names_a_trainer(node.value):
                found.append(f"{_relative(path)}:{node.lineno}: .{node.attr}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr")
            and len(node.args) >= 2
            and _names_a_trainer(node.args[0])
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _private(node.args[1].value)
        ):
            found.append(f"{_relative(path)}:{node.lineno}: {node.args[1].value!r}")
    return found


def test_the_checks_find_what_they_look_for(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(
        "from tfloop.errors import _first_line\n"
        "def f(trainer):\n"
        "    return trainer._loops, getattr(trainer, '_epochs', None)\n"
    )
    assert private_imports(bad) and len(private_trainer_reads(bad)) == 2


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_no_private_name_is_imported_across_modules(path):
    assert private_imports(path) == []


@pytest.mark.parametrize("path", [m for m in MODULES if m.name != "trainer.py"], ids=_relative)
def test_nothing_outside_the_trainer_reads_its_private_attributes(path):
    assert private_trainer_reads(path) == []


@pytest.mark.parametrize("path", MODULES, ids=_relative)
def test_no_module_is_over_500_lines(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{_relative(path)} has {lines} lines: split it by concept"
