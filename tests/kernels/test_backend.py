import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import BACKEND_ENV_VAR, resolve_backend
from tests.kernels.cases import needs_triton

CPU = torch.device("cpu")


def test_auto_picks_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV_VAR, raising=False)
    assert resolve_backend(None, CPU) == "torch"
    assert resolve_backend("auto", CPU) == "torch"


@needs_triton
def test_auto_picks_triton_on_cuda():
    assert resolve_backend("auto", torch.device("cuda")) == "triton"


@needs_triton
def test_argument_overrides_environment(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV_VAR, "torch")
    assert resolve_backend(None, CPU) == "torch"
    assert resolve_backend("triton", CPU) == "triton"


def test_unknown_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match=r"backend='cuda': expected one of \('auto', 'triton', 'torch'\)"):
        resolve_backend("cuda", CPU)
    monkeypatch.setenv(BACKEND_ENV_VAR, "fast")
    with pytest.raises(ValueError, match=f"{BACKEND_ENV_VAR}='fast'"):
        resolve_backend(None, CPU)


@needs_triton
def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_backend("triton", CPU)


def test_package_imports_and_runs_without_triton():
    """macOS has no triton: the package must import, run the references, and refuse 'triton' clearly."""
    script = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch
import kernels
assert not kernels.HAS_TRITON
g = [torch.zeros(3)]
p = kernels.ewc_penalty_([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], g, lam=2.0)
assert p.item() == 3.0 and g[0].tolist() == [2.0, 2.0, 2.0], (p, g)
try:
    kernels.ewc_penalty_([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], g, lam=2.0, backend="triton")
except RuntimeError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("backend='triton' without triton did not raise")
"""
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True)
