"""ARCHITECTURE.md is true of the tree: every path it names exists, every module is named there."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = (ROOT / "ARCHITECTURE.md").read_text()


def test_every_path_it_names_exists():
    named = set(re.findall(r"`((?:src|tests)/[\w/.]+)`", PAGE))
    assert len(named) > 40
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, missing


def test_every_module_of_the_package_is_named():
    named = set(re.findall(r"`(src/curvscope/[\w/.]+)`", PAGE))
    folders = {p.rstrip("/") for p in re.findall(r"`(src/curvscope/\w+/)`", PAGE)}
    modules = [p.relative_to(ROOT).as_posix() for p in (ROOT / "src" / "curvscope").rglob("*.py")
               if p.name not in ("__main__.py",) and "__pycache__" not in p.parts]
    unnamed = [m for m in modules
               if m not in named
               and not (m.endswith("__init__.py") and m.rsplit("/", 1)[0] in
                        {f"src/curvscope/{d}" for d in ("linops", "curvature", "solvers",
                                                          "estimators", "analysis", "report")})
               and not any(m.startswith(f + "/") for f in folders)]
    assert not unnamed, f"modules ARCHITECTURE.md does not name: {unnamed}"
