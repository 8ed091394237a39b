"""Benchmark ``ewc_penalty_``: fused Triton vs the torch reference, eager autograd and torch.compile.

"eager" is what Avalanche does: build P = lambda/2 sum F (theta - theta*)^2 with autograd and backward it
into ``.grad``; "compile" is ``torch.compile`` of that same function. The op must move 20 bytes per fp32
parameter (read theta, theta*, F, g; write g).

    python benchmarks/bench_ewc.py --sizes 1e6 1e7 --dtypes fp32 bf16
"""

from __future__ import annotations

import torch
from harness import Bench, Skip, main

from hft_kernels import ewc_penalty_

LAM = 0.5


def eager_penalty(params, anchors, fisher, lam):
    return lam / 2 * sum((f * (p - a) ** 2).sum() for p, a, f in zip(params, anchors, fisher, strict=True))


def make_inputs(shapes, dtype, device, args):
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    anchors = [p.float() + 0.01 for p in params]
    fisher = [torch.rand(s, device=device) for s in shapes]
    grads = [torch.zeros_like(p) for p in params]
    return params, anchors, fisher, grads


def bytes_moved(inputs, args):
    return sum(
        p.numel() * (p.element_size() + a.element_size() + f.element_size() + 2 * g.element_size())
        for p, a, f, g in zip(*inputs, strict=True)
    )


def triton(inputs, args):
    if inputs[0][0].device.type != "cuda":
        raise Skip("CUDA only: on CPU the kernel runs in the Triton interpreter, which is not a benchmark")
    return lambda: ewc_penalty_(*inputs, LAM, backend="triton")


def reference(inputs, args):
    return lambda: ewc_penalty_(*inputs, LAM, backend="torch")


def _autograd(penalty_fn, inputs):
    params, anchors, fisher, grads = inputs
    leaves = [p.detach().requires_grad_() for p in params]
    for leaf, g in zip(leaves, grads, strict=True):
        leaf.grad = g

    def step():
        penalty = penalty_fn(leaves, anchors, fisher, LAM)
        penalty.backward()
        return penalty.detach()

    return step


def eager(inputs, args):
    return _autograd(eager_penalty, inputs)


def compiled(inputs, args):
    step = _autograd(torch.compile(eager_penalty), inputs)
    try:
        step()  # compiles here, so that a failure is recorded as a skip with its reason
    except Exception as e:
        raise Skip(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e
    return step


BENCH = Bench(
    op="ewc",
    make_inputs=make_inputs,
    bytes_moved=bytes_moved,
    providers={"triton": triton, "torch": reference, "eager": eager, "compile": compiled},
)

if __name__ == "__main__":
    main(BENCH)
