"""Benchmark ``gem_dots``: fused Triton vs the torch reference and the flatten-then-matmul baseline.

"flatten" concatenates g and the k references into vectors (model-sized copies) and multiplies them, as
a direct port of GEM does. The op must read (k + 1) N values.

    python benchmarks/bench_gem_dots.py --sizes 1e6 1e7 --k 8
"""

from __future__ import annotations

import torch
from harness import Bench, Skip, main

from hft_kernels import gem_dots


def make_inputs(shapes, dtype, device, args):
    grads = [torch.randn(s, device=device).to(dtype) for s in shapes]
    return grads, [[torch.randn(s, device=device) for s in shapes] for _ in range(args.k)]


def bytes_moved(inputs, args):
    grads, refs = inputs
    return sum(g.numel() * g.element_size() for g in grads) + sum(t.numel() * 4 for r in refs for t in r)


def triton(inputs, args):
    if inputs[0][0].device.type != "cuda":
        raise Skip("CUDA only: on CPU the kernel runs in the Triton interpreter, which is not a benchmark")
    return lambda: gem_dots(*inputs, backend="triton")


def reference(inputs, args):
    return lambda: gem_dots(*inputs, backend="torch")


def flatten(inputs, args):
    grads, refs = inputs

    def fn():
        g = torch.cat([t.reshape(-1) for t in grads]).float()
        G = torch.stack([torch.cat([t.reshape(-1) for t in r]) for r in refs])
        return G @ g, G @ G.T

    return fn


BENCH = Bench(
    op="gem_dots",
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    providers={"triton": triton, "torch": reference, "flatten": flatten},
    extra=lambda args: {"k": args.k},
    add_args=lambda parser: parser.add_argument("--k", type=int, default=8, help="reference gradients"),
)

if __name__ == "__main__":
    main(BENCH)
