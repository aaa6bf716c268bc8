"""The package layering, read from the source: core imports no service code, helip imports no worker or api
(its CLI, the entry point over all of them, imports them inside its commands), and no package imports up."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# package -> top-level modules it must never import, at module level or inside a function
FORBIDDEN = {
    "core": {"helip", "api", "worker", "sqlalchemy", "celery", "fastapi", "synthworld"},
    "helip": {"worker", "api"},
    "api": {"worker", "torch"},
    "worker": {"api"},
}
# entry points: they start the API, the worker or a local run, so they import what they start
ENTRY_POINTS = {"helip/cli.py", "helip/demo.py"}
# the API's wire format (pydantic models, no FastAPI): the Python client is typed with the very same models
SHARED = {"api.schemas"}


def imported_modules(path: Path) -> set[str]:
    """Top-level packages `path` imports (a module in SHARED does not count as its package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name.split(".")[0] for alias in node.names if alias.name not in SHARED)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module not in SHARED:
            out.add(node.module.split(".")[0])
    return out


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_package_imports_a_layer_above_it(package: str) -> None:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ENTRY_POINTS:
            continue
        bad = imported_modules(path) & FORBIDDEN[package]
        if bad:
            found[rel] = sorted(bad)
    assert found == {}


def test_the_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from worker.reaper import reap\n    import celery.app\n")
    assert imported_modules(src) == {"os", "worker", "celery"}


def test_docs_spec_describes_every_spec_field() -> None:
    """docs/spec.md is the field reference: every field of core.spec.JobSpec is named there."""
    from pydantic import BaseModel

    from core.spec import EvalSpec, JobSpec

    doc = (ROOT / "docs" / "spec.md").read_text()
    missing = []
    for section, field in JobSpec.model_fields.items():
        sub = field.annotation
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            if f"`{section}`" not in doc:
                missing.append(section)
            continue
        for name in sub.model_fields:
            if sub is EvalSpec and name in ("zeroshot", "retrieval", "linear_probe"):
                item = EvalSpec.model_fields[name].annotation.__args__[0]  # list[ItemSpec]
                if f"`eval.{name}[]`" not in doc or not all(k in doc for k in item.model_fields):
                    missing.append(f"eval.{name}")
            elif f"`{section}.{name}`" not in doc:
                missing.append(f"{section}.{name}")
    assert missing == []


def _runtime_imports(path: Path) -> set[str]:
    """Dotted modules `path` imports when it runs (module level or in a function), not those only imported
    for type checking (`if TYPE_CHECKING:`); `from pkg import mod` names pkg.mod as well as pkg."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for stmt in node.body for n in ast.walk(stmt)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _source(module: str) -> Path | None:
    """The project file of a dotted module name, else None (a third-party module, or a name inside a module)."""
    base = ROOT.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def reachable_imports(start: list[Path]) -> dict[str, set[str]]:
    """{third-party top-level package: the project modules that import it} over every project module the
    `start` files reach through their run-time imports (each module's parent packages included)."""
    seen: set[Path] = set()
    todo = list(start)
    found: dict[str, set[str]] = {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in sorted(_runtime_imports(path)):
            parts = module.split(".")
            project = [p for p in (_source(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if p]
            if project:
                todo.extend(project)
            elif _source(parts[0]) is None and not (ROOT / parts[0]).is_dir():
                found.setdefault(parts[0], set()).add(path.relative_to(ROOT).as_posix())
    return found


# Imports of torch-bound packages the walk reaches but the API never runs: helip.registry.generate() rebuilds
# the open_clip snapshot, and only `python -m helip.registry` calls it (the API reads the JSON snapshot).
NOT_RUN_BY_THE_API = {"open_clip": {"helip/registry.py"}}


def test_the_api_process_never_imports_torch() -> None:
    """Everything the api package imports, followed through core and helip: no torch (nor open_clip, which
    imports it). The thumbnails read images through core.index and core.decoding, not core.data (the
    runtime check: tests/test_ui_api.py serves a thumbnail in a fresh process and looks at sys.modules)."""
    reached = reachable_imports(sorted((ROOT / "api").rglob("*.py")))
    assert "numpy" in reached and "PIL" in reached  # the walk does reach the image code
    bound = {k: v - NOT_RUN_BY_THE_API.get(k, set()) for k, v in reached.items()
             if k in {"torch", "open_clip", "torchvision"}}
    assert {k: sorted(v) for k, v in bound.items() if v} == {}


def test_the_import_walk_follows_project_modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nfrom pkg import b\nif TYPE_CHECKING:\n"
                              "    import torch\n")
    (pkg / "b.py").write_text("def f():\n    import torch.nn\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert reachable_imports([pkg / "a.py"]) == {"typing": {"pkg/a.py"}, "torch": {"pkg/b.py"}}
