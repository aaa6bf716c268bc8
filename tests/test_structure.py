"""The package layering, read from the source: core imports no service code, helip imports no worker or api
(its CLI, the entry point over all of them, imports them inside its commands), and no package imports up."""

from __future__ import annotations

import ast
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
