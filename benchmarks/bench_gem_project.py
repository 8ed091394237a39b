"""Benchmark ``gem_project_``: fused Triton vs the torch reference and Avalanche's host quadprog GEM.

"host_quadprog" is Avalanche's ``GEMPlugin``: flatten g and the references, copy them to the host in
float64, form G G^T and G g with numpy, solve the dual with quadprog, copy g + G^T v back. g and the
references are built so that constraints are active, and every call (every provider) first restores g
from a saved copy, since a projected g is already feasible; so the op moves (2k + 3) N values plus the
2N of the restore, which ``bytes`` counts.

    python benchmarks/bench_gem_project.py --sizes 1e6 1e7 --k 8
"""

from __future__ import annotations

import numpy as np
import quadprog
import torch
from harness import Bench, Skip, main

from hft_kernels import gem_project_


def make_inputs(shapes, dtype, device, args):
    base = [torch.randn(s, device=device) for s in shapes]
    refs = [[b + 0.3 * torch.randn(s, device=device) for b, s in zip(base, shapes, strict=True)] for _ in range(args.k)]
    saved = [(-b).to(dtype) for b in base]
    return [g.clone() for g in saved], refs, saved


def bytes_moved(inputs, args):
    grads, refs, _ = inputs
    g_bytes = sum(g.numel() * g.element_size() for g in grads)
    return 5 * g_bytes + 2 * sum(t.numel() * 4 for r in refs for t in r)


def _restoring(project):
    def setup(inputs, args):
        grads, refs, saved = inputs

        def fn():
            torch._foreach_copy_(grads, saved)
            return project(grads, refs)

        return fn

    return setup


def _triton(grads, refs):
    return gem_project_(grads, refs, backend="triton")


def triton(inputs, args):
    if inputs[0][0].device.type != "cuda":
        raise Skip("CUDA only: on CPU the kernel runs in the Triton interpreter, which is not a benchmark")
    return _restoring(_triton)(inputs, args)


def host_quadprog(grads, refs, eps=1e-3):
    """Avalanche GEMPlugin.solve_quadprog, then the copy back into the gradients."""
    memories = torch.stack([torch.cat([t.reshape(-1) for t in r]) for r in refs]).cpu().double().numpy()
    g = torch.cat([t.reshape(-1) for t in grads]).cpu().double().numpy()
    k = memories.shape[0]
    p = memories @ memories.T
    p = 0.5 * (p + p.T) + np.eye(k) * eps
    v = quadprog.solve_qp(p, -(memories @ g), np.eye(k), np.zeros(k))[0]
    z = torch.from_numpy(v @ memories + g).float().to(grads[0].device)
    torch._foreach_copy_(
        grads, [s.view(t.shape) for s, t in zip(z.split([t.numel() for t in grads]), grads, strict=True)]
    )


BENCH = Bench(
    op="gem_project",
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    providers={
        "triton": triton,
        "torch": _restoring(lambda grads, refs: gem_project_(grads, refs, backend="torch")),
        "host_quadprog": _restoring(host_quadprog),
    },
    extra=lambda args: {"k": args.k},
    add_args=lambda parser: parser.add_argument("--k", type=int, default=8, help="reference gradients"),
)

if __name__ == "__main__":
    main(BENCH)
