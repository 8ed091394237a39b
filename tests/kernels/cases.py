"""Shared cases for the kernel tests: shape sweeps, dtype tolerances, tensor-list builders.

Interpreter shapes stay small (the Triton interpreter runs each program in Python); ``MIXED`` still crosses
a chunk boundary so that a tensor spanning several programs is covered.

Inputs are drawn on the CPU from seeded generators (the same values on every machine) and placed on
``DEVICE``: CUDA where there is one, so that ``backend="triton"`` runs the compiled kernels; else the CPU,
where it runs them in the Triton interpreter (``tests/conftest.py``). Oracles compute on the CPU in fp64.
"""

from __future__ import annotations

import pytest
import torch

from hft_kernels import HAS_TRITON
from hft_kernels._multi_tensor import CHUNK

# Per-element tolerance of an op's output in the dtype it is stored in (one rounding plus fp32 sum order).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1.6e-2),
    torch.float16: (1e-3, 2e-3),
}
DTYPES = list(TOLERANCES)

SHAPES = {
    "one": [(1,)],
    "odd": [(3, 5), (7,), (11, 13)],
    "pow2p1": [(2**10 + 1,), (2**4 + 1, 2**3 + 1)],
    "many_small": [(i % 7 + 1, 1 + i % 3) for i in range(48)],
    "mixed": [(CHUNK + 3,), (1,), (0,), (64, 33), (5,)],
    "noncontig": [(6, 8), (5, 7), (4, 3, 2)],
    "empty": [],
}
SHAPE_IDS = list(SHAPES)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator, noncontig: bool, fn=torch.randn):
    """A tensor of ``shape`` on ``DEVICE``: a transposed or strided view when ``noncontig``.

    The view is taken on the device: ``Tensor.to`` would make a strided view contiguous.
    """
    if not noncontig:
        return fn(shape, generator=gen).to(DEVICE, dtype)
    if len(shape) == 2:
        return fn(shape[::-1], generator=gen).to(DEVICE, dtype).t()
    return fn((*shape[:-1], 2 * shape[-1]), generator=gen).to(DEVICE, dtype)[..., ::2]


def make_list(case: str, dtype: torch.dtype, gen: torch.Generator, fn=torch.randn) -> list[torch.Tensor]:
    return [make(s, dtype, gen, case == "noncontig", fn) for s in SHAPES[case]]


def assert_close(actual, expected, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.double().cpu(), expected.double().cpu(), atol=atol, rtol=rtol)


def assert_lists_close(actual, expected, dtype: torch.dtype) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == dtype
        assert_close(a, e, dtype)


needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: only the torch reference runs")
BACKENDS = ["torch", pytest.param("triton", marks=needs_triton)]


_PEAK_SCRIPT = """
import torch
torch.set_num_threads(1)

def build(sizes):
    return {build}

def run(lists):
    {op}

def high_water_mib():  # this process's peak RSS: VmHWM belongs to the process's memory map, new at exec
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

run(build([5, 3]))  # warm-up: imports and first calls page in code, which RSS counts
lists = build([1 << 23, 1 << 22, 3, 1 << 22])
before = high_water_mib()
run(lists)
print(high_water_mib() - before)
"""
MODEL_MIB = 64  # one fp32 role of the 2**24-element list measured by ``peak_growth_mib``


def peak_growth_mib(build: str, op: str) -> float:
    """Peak resident memory added by ``op`` (MiB), measured in a fresh process on a 2**24-element list.

    ``build`` is an expression of ``sizes`` giving the op's lists (with ``torch.full``: no temporaries, so
    the high-water mark before the op is the inputs themselves); ``op`` a statement using ``lists``. torch's
    CPU allocator is invisible to ``tracemalloc``; the RSS high-water mark is not. It is read from ``VmHWM``, not
    ``getrusage``: Linux carries ``ru_maxrss`` across ``exec``, so a child of a large test process would start at
    the parent's peak and report no growth. A fixed glibc mmap
    threshold makes every large block its own mapping, returned on free: with glibc's adaptive threshold,
    heap fragmentation added 0 or 64 MiB at random to the same run.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
        "HFT_KERNELS_BACKEND": "torch",
        "TRITON_INTERPRET": "0",
        "MALLOC_MMAP_THRESHOLD_": "65536",
    }
    script = _PEAK_SCRIPT.format(build=build, op=op)
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


linux_only = pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="reads /proc")


def flat64(tensors) -> torch.Tensor:
    """All tensors of a list as one fp64 vector on the CPU (test oracles only)."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([t.reshape(-1).double().cpu() for t in tensors])


def gem_inputs(case: str, dtype: torch.dtype, k: int, seed: int = 0, kind: str = "random"):
    """Gradients and k references; ``kind="conflict"`` makes g oppose correlated references (active constraints)."""
    gen = torch.Generator().manual_seed(seed)
    grads = make_list(case, dtype, gen)
    if kind == "random":
        refs = [make_list(case, torch.float32, gen) for _ in range(k)]
    else:
        base = make_list(case, torch.float32, gen)
        refs = [[b + 0.3 * make(b.shape, torch.float32, gen, False) for b in base] for _ in range(k)]
        grads = [(0.5 * g.float() - b).to(dtype) for g, b in zip(grads, base, strict=True)]
    return grads, refs
