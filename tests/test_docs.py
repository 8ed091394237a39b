"""Every ``python`` and ``yaml`` block of the README and docs/ runs: the code executes, the config instantiates.

Blocks meant as illustrations use ``text`` (or an indented block for shell commands, which the end-to-end tests
run: the default fit in ``test_default_run.py``, ``--plan_only`` in ``test_cli.py``).
"""

import re
from pathlib import Path

import pytest

from hft_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FAST_DATA = ["--data.num_train=64", "--data.num_val=6", "--data.vocab_size=300", "--trainer.logger=false"]


def blocks(language: str) -> list[tuple[str, str]]:
    return [
        (f"{path.relative_to(ROOT)}#{i}", code)
        for path in DOCUMENTS
        for i, code in enumerate(re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.S | re.M))
    ]


def test_the_readme_is_a_map():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 250


def test_every_relative_link_points_to_a_file():
    missing = [
        f"{path.relative_to(ROOT)}: {target}"
        for path in DOCUMENTS
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text())
        if not (path.parent / target).exists()
    ]
    assert missing == []


@pytest.mark.parametrize(("where", "code"), blocks("python"), ids=[w for w, _ in blocks("python")])
def test_python_blocks_run(where, code):
    exec(compile(code, where, "exec"), {})


@pytest.mark.parametrize(("where", "code"), blocks("yaml"), ids=[w for w, _ in blocks("yaml")])
def test_yaml_blocks_are_configs_that_instantiate(where, code, tmp_path, monkeypatch):
    # docs/retention.md's own method, importable as the YAML that adds it names it
    (tmp_path / "my_retention.py").write_text(dict(blocks("python"))["docs/retention.md#0"])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(ROOT)  # paths in the examples are relative to the repository root
    config = tmp_path / "config.yaml"
    config.write_text(code)
    cli = main(["--config", str(config), *FAST_DATA, f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert cli.trainer is not None and cli.datamodule.ability_names
