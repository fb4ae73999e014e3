"""*Reload* in developer mode: the core package and this Lib are reloaded too, each module after those it imports.

``ScriptedLoadableModuleWidget.onReload`` re-executes ``DeepAbdominalReg.py`` only; edits to
``DeepAbdominalRegLib`` or to the core package ``deepabdominalreg`` would need a Slicer restart.  The widget's
``onReload`` first calls :func:`reloadPackages`, which ``importlib.reload``\\ s every loaded
module of the two packages in dependency order: a module's module-level imports (read from the source files, so
the order follows the code as it is) are reloaded before it, and ``from X import name`` then binds the new
objects.  Imports inside functions need no order: they look the module up when called.
"""

from __future__ import annotations

import ast
import graphlib
import importlib
import sys
from pathlib import Path

__all__ = ["PACKAGES", "moduleImports", "reloadOrder", "reloadPackages"]

MODULE_DIRECTORY = Path(__file__).resolve().parent.parent
PACKAGES = ("deepabdominalreg", "DeepAbdominalRegLib")
"""The packages in the module folder that a reload covers (the core first, then the Slicer glue)."""


def _moduleName(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _moduleLevelStatements(body: list[ast.stmt]):
    """Statements run at import: the body and its ``if``/``try``/``with`` blocks, not function or class bodies."""
    for statement in body:
        yield statement
        if isinstance(statement, (ast.If, ast.With, ast.Try)) or type(statement).__name__ == "TryStar":
            for block in ("body", "orelse", "finalbody"):
                yield from _moduleLevelStatements(getattr(statement, block, []))
            for handler in getattr(statement, "handlers", []):
                yield from _moduleLevelStatements(handler.body)


def _isTypeCheckingBlock(statement: ast.stmt) -> bool:
    test = getattr(statement, "test", None)
    return isinstance(statement, ast.If) and getattr(test, "id", getattr(test, "attr", None)) == "TYPE_CHECKING"


def _imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The known modules that ``tree`` imports when it is executed (``if TYPE_CHECKING:`` blocks left out)."""
    skipped = {id(s) for t in tree.body if _isTypeCheckingBlock(t) for s in _moduleLevelStatements(t.body)}
    found = set()
    for statement in _moduleLevelStatements(tree.body):
        if id(statement) in skipped:
            continue
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0:
            # 'from package import submodule' needs the submodule (the package only has to exist);
            # 'from module import name' needs the module
            names = [f"{statement.module}.{alias.name}" if f"{statement.module}.{alias.name}" in known
                     else statement.module for alias in statement.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def moduleImports(moduleDirectory: Path = MODULE_DIRECTORY) -> dict[str, set[str]]:
    """``{module: the modules of PACKAGES it imports at module level}`` for every module of :data:`PACKAGES`.

    ``__main__`` modules are left out: they are scripts, not imported by anything.
    """
    sources = {}
    for package in PACKAGES:
        for path in sorted((moduleDirectory / package).rglob("*.py")):
            if path.name != "__main__.py":
                sources[_moduleName(path, moduleDirectory)] = path
    known = set(sources)
    return {name: _imports(ast.parse(path.read_text(encoding="utf-8")), known) - {name}
            for name, path in sources.items()}


def reloadOrder(moduleDirectory: Path = MODULE_DIRECTORY) -> list[str]:
    """Every module of :data:`PACKAGES`, each after the modules it imports at module level; the core's first
    (the core never imports the Lib, so this keeps the order valid)."""
    sorter = graphlib.TopologicalSorter()
    for name, imported in moduleImports(moduleDirectory).items():
        sorter.add(name, *sorted(imported))
    return sorted(sorter.static_order(), key=lambda name: PACKAGES.index(name.split(".")[0]))


def reloadPackages(moduleDirectory: Path = MODULE_DIRECTORY) -> list[str]:
    """``importlib.reload`` every loaded module of :data:`PACKAGES`, dependencies first; returns their names."""
    reloaded = []
    for name in reloadOrder(moduleDirectory):
        module = sys.modules.get(name)
        if module is not None:
            importlib.reload(module)
            reloaded.append(name)
    return reloaded
