import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hft_kernels import BACKEND_ENV_VAR, resolve_backend
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
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # 'triton' on CPU tensors, also on a machine with a GPU
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
import hft_kernels
assert not hft_kernels.HAS_TRITON
g = [torch.zeros(3)]
p = hft_kernels.ewc_penalty_([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], g, lam=2.0)
assert p.item() == 3.0 and g[0].tolist() == [2.0, 2.0, 2.0], (p, g)
try:
    hft_kernels.ewc_penalty_([torch.ones(3)], [torch.zeros(3)], [torch.ones(3)], g, lam=2.0, backend="triton")
except RuntimeError as e:
    assert "triton is not installed" in str(e)
else:
    raise AssertionError("backend='triton' without triton did not raise")
"""
    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", script], cwd=root, check=True)


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from hft_kernels.ewc import _ewc_kernel
from hft_kernels.fisher import _fisher_kernel
from hft_kernels.gem_dots import _gem_dots_kernel
from hft_kernels.gem_project import _gem_update_kernel

table = {"addrs_ptr": "*i64", "numels_ptr": "*i64", "chunks_ptr": "*i64", "num_tensors": "i32"}
tiles = {"CHUNK": 16384, "BLOCK": 256}
gem = {"grad_w": "*bf16", "ref_w": "*fp32", "K": "constexpr", "K_PAD": "constexpr"}
kernels = [
    (_ewc_kernel, {"partials_ptr": "*fp32", "lam": "fp32", "param_w": "*bf16", "anchor_w": "*fp32",
                   "fisher_w": "*fp32", "grad_w": "*bf16"}, {}),
    (_fisher_kernel, {"decay": "fp32", "scale": "fp32", "fisher_w": "*fp32", "grad_w": "*fp16"}, {}),
    (_gem_dots_kernel, {"partials_ptr": "*fp32", **gem}, {"K": 3, "K_PAD": 4}),
    (_gem_update_kernel, {"v_ptr": "*fp32", **gem}, {"K": 3, "K_PAD": 4}),
]
for fn, args, consts in kernels:
    signature = {**table, **args, "CHUNK": "constexpr", "BLOCK": "constexpr"}
    compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs={**consts, **tiles}),
                              target=GPUTarget("cuda", 90, 32))
    assert ".entry" in compiled.asm["ptx"], fn
"""


@needs_triton
def test_kernels_compile_to_ptx_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], cwd=root, env=env, capture_output=True, text=True)
    if "constexprs" in result.stderr and "unexpected keyword" in result.stderr:
        pytest.skip("this triton's ASTSource predates the 3.x constexprs argument")
    assert result.returncode == 0, result.stderr[-2000:]
