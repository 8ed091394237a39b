"""The import rules of the package: data flows one way, kernels are a leaf (DESIGN.md, STYLE.md §2 and §11)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(source: str, package: str) -> set[str]:
    """Every module (and imported name) a source imports, absolute: relative imports resolved against ``package``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def files(directory: str) -> list[Path]:
    return sorted((ROOT / directory).rglob("*.py"))


def violations(paths: list[Path], forbidden: tuple[str, ...]) -> list[str]:
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in paths
        for name in sorted(imported_modules(path.read_text(), ".".join(path.relative_to(ROOT).parts[:-1])))
        if any(name == f or name.startswith(f"{f}.") for f in forbidden)
    ]


def test_kernels_import_neither_lightning_nor_the_package():
    assert files("hft_kernels")
    assert violations(files("hft_kernels"), ("lightning", "hft_lightning", "transformers")) == []


def test_the_plan_imports_nothing_else_from_the_package_but_its_errors():
    imported = imported_modules((ROOT / "hft_lightning" / "plan.py").read_text(), "hft_lightning")
    assert {name for name in imported if name.startswith("hft_lightning")} == {
        "hft_lightning.errors", "hft_lightning.errors.ConfigError",
    }  # fmt: skip
    assert violations([ROOT / "hft_lightning" / "errors.py"], ("hft_lightning",)) == []  # a leaf: importable anywhere


@pytest.mark.parametrize("layer", ["data", "retention", "metrics", "planners", "scoring"])
def test_nothing_below_the_curriculum_imports_it(layer):
    assert files(f"hft_lightning/{layer}")
    assert violations(files(f"hft_lightning/{layer}"), ("hft_lightning.curriculum",)) == []


def test_data_sits_below_the_curriculum_its_planners_and_the_training_code():
    above = ("curriculum", "planners", "retention", "metrics", "module", "report", "cli", "callbacks", "progress")
    assert violations(files("hft_lightning/data"), tuple(f"hft_lightning.{name}" for name in above)) == []


def test_scoring_needs_only_the_example_the_sandbox_and_the_errors():
    allowed = {"hft_lightning.data.example", "hft_lightning.sandbox", "hft_lightning.errors", "hft_lightning.scoring"}
    imported = {
        name
        for path in files("hft_lightning/scoring")
        for name in imported_modules(path.read_text(), "hft_lightning.scoring")
        if name.startswith("hft_lightning")
    }
    assert {name for name in imported if not any(name == a or name.startswith(f"{a}.") for a in allowed)} == set()


def test_the_rules_see_relative_and_absolute_imports():
    source = "from ..curriculum import Curriculum\nimport hft_lightning.module\nfrom . import sft\n"
    assert imported_modules(source, "hft_lightning.data") == {
        "hft_lightning.curriculum", "hft_lightning.curriculum.Curriculum", "hft_lightning.module",
        "hft_lightning.data", "hft_lightning.data.sft",
    }  # fmt: skip
