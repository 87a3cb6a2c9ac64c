"""The packages of llmopt/ stand on floors, and a module imports only from its own package or from floors below:

  0  config, kernels, slurm  the config schema, the Triton kernels (the model's and the optimizers'), the SLURM callback
  1  data, model, optim       the token pipeline (its config on the schema's defaults); model and optim: neither
                              imports the other, both build on the kernels
  2  accounting, metrics      the papers' memory accounting counts a model's parameters per optimizer; the diagnostics
                              read a model and its optimizer
  3  train, analysis          the trainer wires everything; the run reader and figures read what runs wrote
  4  report                   the tables beside the papers' numbers, over the run reader

Every import counts, also one inside a function (a lazy import still ties the packages together). One edge upward is
allowed, in LAZY_EXCEPTIONS, with its reason.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "llmopt"
FLOORS = {"config": 0, "kernels": 0, "slurm": 0, "data": 1, "model": 1, "optim": 1, "accounting": 2, "metrics": 2,
          "train": 3, "analysis": 3, "report": 4}
# An optimizer's diagnostics(record) hook writes its quantities under the diagnostics' key names. The hook is called
# by llmopt.metrics.diagnostics with its Record, so that package is loaded whenever the hook runs; imported inside
# the hook, keys.py (names only, importing nothing of llmopt) adds no dependency when the optimizers load.
LAZY_EXCEPTIONS = {("optim", "llmopt.metrics.diagnostics.keys")}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = ROOT.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def llmopt_imports(path: Path) -> list[tuple[str, bool, int]]:
    """The llmopt modules that `path` imports, each with whether the import is inside a function (lazy) and its line;
    `from llmopt.a import b` names llmopt.a.b where b is a module, else llmopt.a."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    lazy_nodes = {id(node) for function in ast.walk(tree) if isinstance(function, (ast.FunctionDef,
                                                                                   ast.AsyncFunctionDef))
                  for node in ast.walk(function)}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per dot beyond the first
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if is_module(f"{base}.{alias.name}") else base for alias in node.names]
        else:
            continue
        targets = dict.fromkeys(targets)  # `from llmopt.a import b, c`: llmopt.a once
        found += [(target, id(node) in lazy_nodes, node.lineno) for target in targets
                  if target == "llmopt" or target.startswith("llmopt.")]
    return found


def package_of(module: str) -> str:
    """llmopt.optim.scale -> optim; llmopt (the root) -> ""."""
    return module.split(".")[1] if "." in module else ""


def import_edges() -> list[tuple[str, str, str, bool, int]]:
    """(importing module, its package, imported module, lazy, line) for every llmopt import under llmopt/."""
    return [(module_name(path), package_of(module_name(path)), target, lazy, line)
            for path in sorted(ROOT.rglob("*.py")) for target, lazy, line in llmopt_imports(path)]


def test_every_package_stands_on_a_floor():
    packages = {package_of(module_name(path)) for path in ROOT.rglob("*.py")} - {""}
    assert packages == set(FLOORS), (f"packages without a floor: {sorted(packages - set(FLOORS))}; floors of missing "
                                     f"packages: {sorted(set(FLOORS) - packages)} (edit FLOORS)")


def test_the_import_graph_is_read():
    """Edges known to exist are found (top-level and lazy): the layering test below cannot pass by reading nothing."""
    edges = {(module, target, lazy) for module, _, target, lazy, _ in import_edges()}
    assert ("llmopt.model.cross_entropy", "llmopt.kernels.common", False) in edges
    assert ("llmopt.model.cross_entropy", "llmopt.kernels.common", True) not in edges  # under `if`, not a function
    assert ("llmopt.optim.scale", "llmopt.kernels.rows", False) in edges
    assert ("llmopt.accounting", "llmopt.model", False) in edges
    assert ("llmopt.optim.sgd_ll", "llmopt.metrics.diagnostics.keys", True) in edges


def test_packages_import_only_from_floors_below():
    wrong = []
    for module, package, target, lazy, line in import_edges():
        target_package = package_of(target)
        if target_package in ("", package):
            continue
        if lazy and (package, target) in LAZY_EXCEPTIONS:
            continue
        if package == "" and FLOORS[target_package] == 0:  # llmopt/__init__.py registers the config schema
            continue
        if FLOORS[target_package] >= FLOORS[package]:
            wrong.append(f"{module} (line {line}) imports {target}{' in a function' if lazy else ''}: {package} is on "
                         f"floor {FLOORS[package]}, {target_package} on {FLOORS[target_package]}")
    assert not wrong, "imports against the layers (move the shared code down a floor):\n" + "\n".join(wrong)


def test_the_allowed_exception_imports_nothing_of_llmopt():
    for _, target in LAZY_EXCEPTIONS:
        path = ROOT.parent.joinpath(*target.split(".")).with_suffix(".py")
        assert llmopt_imports(path) == [], f"{target} is imported from below its floor: it must stay a leaf"


def test_kernels_import_no_other_llmopt_package():
    """The ground floor's strictest case, spelled out: the kernels import nothing of llmopt but each other."""
    outside = [(module, target) for module, package, target, _, _ in import_edges()
               if package == "kernels" and package_of(target) != "kernels"]
    assert outside == []
