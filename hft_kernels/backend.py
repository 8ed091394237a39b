"""The switch between the Triton kernels and the pure-torch references.

Every op takes ``backend: str | None``; ``None`` reads the environment variable
``HFT_KERNELS_BACKEND`` (default ``"auto"``):

- ``"auto"``: the Triton kernel when the tensors are on CUDA and triton imports, else the torch reference;
- ``"triton"``: always the kernel. On CPU tensors this needs the Triton interpreter (``TRITON_INTERPRET=1``
  set before triton is imported), which is how the test suite runs the kernels without a GPU;
- ``"torch"``: always the reference (``torch._foreach_*`` and bucketed flat buffers).

triton is imported here once, guarded: macOS and CPU-only installs have none, and the package must still
import and run its references there. When it is missing, ``triton`` and ``tl`` below are stand-ins whose
``jit`` returns the function unchanged, so the op modules can define their kernels unconditionally; those
kernels are never launched because ``resolve_backend`` refuses ``"triton"``.
"""

from __future__ import annotations

import os

import torch

BACKEND_ENV_VAR = "HFT_KERNELS_BACKEND"
BACKENDS = ("auto", "triton", "torch")

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform: the torch references carry every op.

    class _NoTriton:
        """Stand-in for ``triton`` and ``triton.language``: enough to define kernels, not to launch them."""

        constexpr = None

        @staticmethod
        def jit(fn):
            return fn

    triton = tl = _NoTriton()
    HAS_TRITON = False


def interpreter_enabled() -> bool:
    """Whether Triton kernels run on CPU through the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """Picks the implementation for tensors on ``device``.

    Args:
        backend: ``"auto"``, ``"triton"``, ``"torch"``, or ``None`` to read ``HFT_KERNELS_BACKEND``.
        device: Device of the op's tensors.

    Returns:
        ``"triton"`` or ``"torch"``.

    Raises:
        ValueError: ``backend`` (or the environment variable) is not one of ``BACKENDS``, or ``"triton"`` is
            forced on non-CUDA tensors without the Triton interpreter.
        RuntimeError: ``"triton"`` is forced but triton is not installed.
    """
    source = "backend" if backend is not None else BACKEND_ENV_VAR
    name = backend if backend is not None else os.environ.get(BACKEND_ENV_VAR, "auto")
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r}: expected one of {BACKENDS}")
    if name == "auto":
        return "triton" if HAS_TRITON and device.type == "cuda" else "torch"
    if name == "triton":
        if not HAS_TRITON:
            raise RuntimeError(f"{source}='triton' but triton is not installed; use 'torch' or 'auto'")
        if device.type != "cuda" and not interpreter_enabled():
            raise ValueError(
                f"{source}='triton' on {device.type} tensors needs TRITON_INTERPRET=1 set before triton is "
                "imported; use 'torch' or 'auto' for the reference path"
            )
    return name
