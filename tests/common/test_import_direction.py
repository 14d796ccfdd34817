"""`common` sits strictly below the method packages and the application layer: it never imports them.

Parsed with `ast`, so imports inside functions (lazy imports) count too, and nothing is executed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

COMMON = Path(__file__).resolve().parents[2] / "common"
ABOVE = {"lungdet", "lungseg", "lungcls", "lungcad"}


def imported_packages(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in a module, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
            "import_module",
            "__import__",
        ):
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                found.append((node.lineno, arg.value.split(".")[0]))
    return found


MODULES = sorted(COMMON.rglob("*.py"))


def test_common_has_modules():
    assert len(MODULES) > 20


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(COMMON.parent)))
def test_common_module_imports_no_package_above_it(path):
    bad = [f"line {line}: {name}" for line, name in imported_packages(path) if name in ABOVE]
    assert not bad, f"{path.relative_to(COMMON.parent)} imports {bad}; move that code into the owning package"


def test_the_check_sees_lazy_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from lungcls.models import x\n    import lungdet.data\n")
    assert [name for _, name in imported_packages(module)] == ["lungcls", "lungdet"]
