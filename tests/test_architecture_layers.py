"""The layering ARCHITECTURE.md states, read from the import statements of the package."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "src" / "curvscope"


def _imports(path: pathlib.Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every ``from curvscope... import`` / ``import curvscope...``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.startswith("curvscope"):
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("curvscope")]
    return out


def _modules(folder: str) -> list[pathlib.Path]:
    root = PACKAGE / folder
    return sorted(root.rglob("*.py")) if root.is_dir() else [root.with_suffix(".py")]


RULES = [  # (files, modules they must not import, why)
    ("linops", ("curvscope.curvature", "curvscope.solvers", "curvscope.estimators",
                "curvscope.analysis", "curvscope.report", "curvscope.cli", "curvscope.study"),
     "the ground floor imports nothing above it"),
    ("_atomic", ("curvscope.",), "the ground floor imports nothing above it"),
    ("solvers", ("curvscope.estimators", "curvscope.analysis", "curvscope.report"),
     "solvers never import estimators (SLQ is built on Lanczos, one way)"),
    ("estimators", ("curvscope.analysis", "curvscope.report", "curvscope.cli"),
     "algorithms are below analyses and views"),
    ("curvature", ("curvscope.solvers", "curvscope.estimators", "curvscope.analysis",
                   "curvscope.report", "curvscope.cli"), "operators are below algorithms"),
    ("analysis", ("curvscope.report", "curvscope.cli", "curvscope.study"),
     "analyses compute; views show"),
]


@pytest.mark.parametrize("folder,forbidden,why", RULES, ids=[r[0] for r in RULES])
def test_layers_import_only_downwards(folder, forbidden, why):
    wrong = [f"{path.relative_to(PACKAGE)} imports {module}"
             for path in _modules(folder) for module, _ in _imports(path)
             if any(module == f.rstrip(".") or module.startswith(f.rstrip(".") + ".")
                    or (f.endswith(".") and module.startswith(f)) for f in forbidden)]
    assert not wrong, f"{why}: {wrong}"


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module, names in _imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{path.relative_to(PACKAGE)}: from {module} import {private}")
    assert not wrong, wrong
