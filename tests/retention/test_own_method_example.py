"""The own-retention-method example of docs/retention.md, run exactly as written: the class and its YAML."""

import re
import sys
from pathlib import Path

import torch

from hft_lightning.cli import main
from tests.retention.common import GradientProbe, fit

DOC = (Path(__file__).resolve().parents[2] / "docs" / "retention.md").read_text()
SECTION = DOC.split("## Your own retention method", 1)[1]
CODE = re.search(r"```python\n(.*?)```", SECTION, re.S).group(1)
YAML = re.search(r"```yaml\n(.*?)```", SECTION, re.S).group(1)


def test_the_example_is_short_and_a_retention_callback():
    assert len(CODE.strip().splitlines()) < 40
    namespace: dict = {}
    exec(CODE, namespace)
    assert namespace["L2Anchor"](strength=0.5).strength == 0.5


def test_the_example_pulls_gradients_toward_the_last_stage_end(tmp_path):
    namespace: dict = {}
    exec(CODE, namespace)
    method = namespace["L2Anchor"](strength=0.5)
    before, after = GradientProbe(), GradientProbe()
    fit(tmp_path, [before, method, after])
    theta = before.weights[-1]
    for name, g in before.steps[-1].items():
        expected = g + 0.5 * (theta[name] - method.anchors[name])
        torch.testing.assert_close(after.steps[-1][name], expected)
    assert any(not torch.equal(before.steps[-1][n], after.steps[-1][n]) for n in theta)
    for name, w in before.weights[8].items():  # anchors: the end of the second stage (steps 0..7)
        torch.testing.assert_close(method.anchors[name], w)


def test_the_yaml_adds_it_after_the_curriculum(tmp_path, monkeypatch):
    (tmp_path / "my_retention.py").write_text(CODE)
    (tmp_path / "config.yaml").write_text(YAML)
    monkeypatch.syspath_prepend(str(tmp_path))
    cli = main(["--config", str(tmp_path / "config.yaml")], run=False)
    callbacks = [type(c).__name__ for c in cli.trainer.callbacks]
    assert callbacks.index("Curriculum") < callbacks.index("L2Anchor")
    assert next(c for c in cli.trainer.callbacks if type(c).__name__ == "L2Anchor").strength == 0.01
    sys.modules.pop("my_retention", None)
