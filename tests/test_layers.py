"""The data path's layers, read from the source: who may import whom, and no import cycle.

dataset -> precompute (teacher passes) -> store -> train (batches, losses, student);
``lm`` is what both sides share about models and command lines. ``store`` imports
neither side nor ``lm``; ``precompute`` and ``train`` never import each other.
``recipes`` (runs across both sides, such as CycleAlign's rounds) may import every
layer and no layer imports it. The command-line entries (each package's ``cli``)
sit above the layers: ``store``'s may use ``lm``'s option parser and error report,
``train``'s runs a recipe (``train cyclealign``).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("lm", "store", "precompute", "train", "recipes")
ALLOWED = {
    "lm": set(),
    "store": set(),
    "precompute": {"lm", "store"},
    "train": {"lm", "store"},
    "recipes": {"lm", "store", "precompute", "train"},
}
#: command-line entries: the packages each may import besides those its package may
ENTRIES = {
    "store.cli": {"lm"},  # lm.options: the parser of --storage-option; lm.cli: one-line errors
    "train.cli": {"recipes"},  # train cyclealign
}


def _imports() -> dict[str, set[str]]:
    """module name -> project modules it imports (anywhere in the file, lazy imports included,
    ``if TYPE_CHECKING:`` blocks left out)."""
    graph = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            module = f"{package}.{path.stem}" if path.stem != "__init__" else package
            tree = ast.parse(path.read_text())
            typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                           and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
            found = set()
            for node in ast.walk(tree):
                if id(node) in typing_only:  # annotations only: not imported when the code runs
                    continue
                if isinstance(node, ast.ImportFrom):
                    if node.level:  # relative: within the package
                        base = package if not node.module else f"{package}.{node.module}"
                        names = [base] if node.module else [f"{package}.{a.name}" for a in node.names]
                    else:
                        names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                found.update(n for n in names if n.split(".")[0] in PACKAGES)
            graph[module] = found
    modules = set(graph)
    # keep only names that are modules (``from store import format`` -> store.format, not store.X classes)
    return {m: {n if n in modules else n.rsplit(".", 1)[0] for n in deps if n in modules or
                n.rsplit(".", 1)[0] in modules} - {m} for m, deps in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, str] = {}  # module -> "open" while on the path, "done" after
    cycles = []

    def visit(module, path):
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(path + [dep]))
            elif dep not in state:
                visit(dep, path + [dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    return cycles


def test_each_package_imports_only_the_layers_below_it():
    def allowed(module: str) -> set[str]:
        return {module.split(".")[0]} | ALLOWED[module.split(".")[0]] | ENTRIES.get(module, set())

    wrong = [f"{module} imports {dep}" for module, deps in _imports().items() for dep in sorted(deps)
             if dep.split(".")[0] not in allowed(module)]
    assert wrong == []


def test_no_import_cycle():
    cycles = _cycles(_imports())
    assert cycles == []


def _imports_with_annotations(package: str) -> dict[str, set[str]]:
    """Like :func:`_imports` for one package's modules, ``if TYPE_CHECKING:`` imports counted too: a module
    that imports a sibling lazily while the sibling names it in annotations is a cycle dodged, not removed."""
    graph = {}
    for path in sorted((REPO / package).glob("*.py")):
        module = f"{package}.{path.stem}" if path.stem != "__init__" else package
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package if not node.module else f"{package}.{node.module}"
                found.update([base] if node.module else [f"{package}.{a.name}" for a in node.names])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == package:
                found.update([node.module] + [f"{node.module}.{a.name}" for a in node.names])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.split(".")[0] == package)
        graph[module] = found
    return {m: {n for n in deps if n in graph} - {m, package} for m, deps in graph.items()}


def test_store_has_no_import_cycle_even_through_lazy_imports_and_annotations():
    assert _cycles(_imports_with_annotations("store")) == []


#: private members of other libraries that the code reaches into: (file, name) -> why
FOREIGN_PRIVATE = {
    ("train/checkpoint.py", "_core"): "numpy 2 keeps numpy.core as numpy._core",
    ("train/checkpoint.py", "_reconstruct"): "numpy's array unpickler, which torch's weights-only load must allow",
}


def _private_defined(tree: ast.AST) -> set[str]:
    """The ``_names`` a module defines: functions, classes, assigned names and attributes, parameters."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Name, ast.Attribute)) and isinstance(node.ctx, ast.Store):
            names.add(node.id if isinstance(node, ast.Name) else node.attr)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_touches_another_modules_private_members():
    """``x._name`` only where this module defines ``_name`` (``self``/``cls`` always), and no ``from m import
    _name`` of a project module: other modules use a module's public API."""
    wrong = []
    for package in PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            where = path.relative_to(REPO).as_posix()
            tree = ast.parse(path.read_text())
            own = _private_defined(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    if getattr(node.value, "id", None) in ("self", "cls") or node.attr in own:
                        continue
                    if (where, node.attr) not in FOREIGN_PRIVATE:
                        wrong.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
                elif isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
                    wrong.extend(f"{where}:{node.lineno}: imports {a.name}" for a in node.names
                                 if a.name.startswith("_") and not a.name.startswith("__"))
    assert wrong == []
