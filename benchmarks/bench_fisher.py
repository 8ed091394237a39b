"""Benchmark ``fisher_accumulate_``: fused Triton vs the torch reference, a per-tensor eager loop, compile.

"eager" is Avalanche's importance update, one tensor at a time: ``F = decay * F + scale * g.pow(2)``;
"compile" is ``torch.compile`` of that loop. The op must move 12 bytes per fp32 parameter (read F, g;
write F).

    python benchmarks/bench_fisher.py --sizes 1e6 1e7 --dtypes fp32 bf16
"""

from __future__ import annotations

import torch
from harness import Bench, Skip, main

from hft_kernels import fisher_accumulate_

DECAY, SCALE = 0.9, 0.1


def eager_accumulate(fisher, grads, decay, scale):
    for f, g in zip(fisher, grads, strict=True):
        f.mul_(decay).add_(scale * g.float().pow(2))


def make_inputs(shapes, dtype, device, args):
    return [torch.rand(s, device=device) for s in shapes], [torch.randn(s, device=device).to(dtype) for s in shapes]


def bytes_moved(inputs, args):
    return sum(f.numel() * (2 * f.element_size() + g.element_size()) for f, g in zip(*inputs, strict=True))


def triton(inputs, args):
    if inputs[0][0].device.type != "cuda":
        raise Skip("CUDA only: on CPU the kernel runs in the Triton interpreter, which is not a benchmark")
    return lambda: fisher_accumulate_(*inputs, DECAY, SCALE, backend="triton")


def reference(inputs, args):
    return lambda: fisher_accumulate_(*inputs, DECAY, SCALE, backend="torch")


def eager(inputs, args):
    return lambda: eager_accumulate(*inputs, DECAY, SCALE)


def compiled(inputs, args):
    fn = torch.compile(eager_accumulate)
    try:
        fn(*inputs, DECAY, SCALE)
    except Exception as e:
        raise Skip(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    return lambda: fn(*inputs, DECAY, SCALE)


BENCH = Bench(
    op="fisher",
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    providers={"triton": triton, "torch": reference, "eager": eager, "compile": compiled},
)

if __name__ == "__main__":
    main(BENCH)
