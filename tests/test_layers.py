"""The layers import one way: a module imports only from its own layer and the layers after it,
in the order docs/ARCHITECTURE.md gives."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "reir"
# Highest first: each name is a folder of reir/ or a module at its top. The package's own __init__ (the
# public API, imported by name on first use) and __main__ (``python -m reir``) stand above them all.
LAYERS = (("cli",), ("service",), ("training",), ("retrieval", "plots"), ("model",), ("data",),
          ("fileio", "errors", "argtypes", "validation", "settings", "distributed", "devices"))
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}


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


def upward_imports(relative: Path, source: str) -> list[str]:
    """The ``reir`` modules that ``source``, the module at ``relative`` (``reir/...``), imports from a higher
    layer, or from no declared one."""
    own = LAYER_OF[relative.parts[1].removesuffix(".py")]
    found = imported_modules(source, ".".join(relative.parts[:-1]))
    return sorted(module for module in found if module.startswith("reir.")
                  and LAYER_OF.get(module.split(".")[1], -1) < own)


def library_modules() -> list[Path]:
    return [path for path in sorted(PACKAGE.rglob("*.py"))
            if path.relative_to(PACKAGE).parts not in (("__init__.py",), ("__main__.py",))]


def test_every_module_belongs_to_a_declared_layer():
    undeclared = sorted({p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in library_modules()}
                        - set(LAYER_OF))
    assert not undeclared, f"add {undeclared} to LAYERS here and to docs/ARCHITECTURE.md"


def test_every_import_points_to_its_own_layer_or_a_lower_one():
    offenders = {}
    for path in library_modules():
        relative = path.relative_to(PACKAGE.parent)
        upward = upward_imports(relative, path.read_text(encoding="utf-8"))
        if upward:
            offenders[str(relative)] = upward
    assert not offenders
    assert len(library_modules()) > 30, "the walk found the library modules"


def test_upward_imports_are_found():
    """The check itself: a data module importing the model layer or an undeclared name is caught, inside
    a function and relative too; its own layer and the foundations are not; retrieval and plots share one."""
    source = ("from reir.errors import ReirError\nfrom . import images\ndef later():\n"
              "    from reir.model import network\n    from ..training import train\n    import reir.nowhere\n")
    assert upward_imports(Path("reir/data/build.py"), source) == [
        "reir.model", "reir.model.network", "reir.nowhere", "reir.training", "reir.training.train"]
    assert upward_imports(Path("reir/plots/report.py"), "from reir.retrieval import metrics\n") == []
    assert upward_imports(Path("reir/fileio.py"), "from reir.errors import ReirError\n") == []


def test_the_documented_order_is_this_order():
    """docs/ARCHITECTURE.md states the same layers, in the same order."""
    text = (PACKAGE.parent / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    stated = re.search(r"the layers after it in\s+(.*?)\. ", text, re.S).group(1)
    layers = tuple(tuple(re.findall(r"`(\w+)`", group)) for group in stated.split(";"))
    assert layers == LAYERS
