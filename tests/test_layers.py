"""The layers import one way: no module outside reir/cli/ imports the command line."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reir"


def imported_modules(source: str, package: str) -> set[str]:
    """Every module an ``import`` or ``from ... import`` in ``source`` names (at any depth), with relative
    imports resolved against ``package``, the package the source lives in."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def test_imported_modules_sees_every_import_form():
    source = ("import os\nimport reir.cli as c\nfrom reir import cli\nfrom ..cli import common\n"
              "def later():\n    from reir.cli.serve import main\n")
    found = imported_modules(source, "reir.model")
    assert {"os", "reir.cli", "reir.cli.common", "reir.cli.serve"} <= found
    assert not {m for m in imported_modules("import reir.api\nfrom . import network\n", "reir.model")
                if m.startswith("reir.cli")}


def test_no_library_module_imports_the_cli():
    """``reir/__main__.py`` is the command's own entry point (``python -m reir``), so it is the one exception."""
    checked, offenders = 0, {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent)
        if relative.parts[1] == "cli" or relative.parts[1:] == ("__main__.py",):
            continue
        package = ".".join(relative.parts[:-1])
        cli = sorted(m for m in imported_modules(path.read_text(encoding="utf-8"), package)
                     if m == "reir.cli" or m.startswith("reir.cli."))
        checked += 1
        if cli:
            offenders[str(relative)] = cli
    assert not offenders
    assert checked > 30, "the walk found the library modules"
