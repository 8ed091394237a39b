"""Multi-tensor plumbing shared by every op: validation, launch tables, reference buckets.

An op works on R aligned *roles* (e.g. params, anchors, fisher, grads), each a list of T tensors, where
``roles[r][i]`` all have the shape of tensor i. Two views of that work exist:

Triton path: one launch per dtype signature (a model in one dtype has one), over a launch table, in the
spirit of apex's ``multi_tensor_apply`` and of Triton's grouped-GEMM tutorial, which loads raw addresses
from an int64 tensor and casts them to typed pointers. The table is one int64 buffer on the device::

    addrs  [R, T]  data_ptr() of roles[r][i]
    numels [T]     elements of tensor i
    chunks [C, 2]  (tensor index, first element) of each CHUNK-element piece; one program per chunk

A kernel decodes its chunk with ``chunk_span`` and its typed pointers with ``role_ptr``; the element type
of each role comes from a *witness* argument (the role's first tensor), so the JIT specializes the kernel
on dtypes as it does for ordinary pointer arguments. The table depends only on addresses and sizes, so it
is cached on exactly those: the first call for a parameter set uploads it (from pinned memory, without a
host sync), later calls reuse it. Non-contiguous tensors are replaced by contiguous copies for the launch,
and written back afterwards when the op writes to them: correct, but they cost the copy.

Reference path: the lists are cut into buckets of at most ``BUCKET`` elements (contiguous tensors are
split, non-contiguous ones taken whole), each role of a bucket is concatenated into one flat fp32 buffer,
the op does its math on those, and ``torch._foreach_copy_`` writes results back. Every model-sized tensor
is read once and written at most once; temporaries are bucket-sized (a few MiB, cache resident), never
model-sized.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from hft_kernels.backend import tl, triton

CHUNK = 16384  # elements per program: 61k programs and a 1 MiB table at 1e9 parameters.
BUCKET = 1 << 18  # reference bucket (1 MiB per fp32 flat buffer).
_TABLE_CACHE_SIZE = 32
_table_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()

TensorLists = Sequence[Sequence[torch.Tensor]]


def check_lists(names: Sequence[str], lists: TensorLists) -> torch.device | None:
    """Checks that the lists are aligned, floating point and on one device.

    Args:
        names: Argument name of each list, for error messages.
        lists: R lists of T tensors; ``lists[r][i]`` must all have the shape of ``lists[0][i]``.

    Returns:
        The common device, or ``None`` when the lists are empty.

    Raises:
        ValueError: Naming the argument and index that do not match.
    """
    first, n = names[0], len(lists[0])
    for name, tensors in zip(names, lists, strict=True):
        if len(tensors) != n:
            raise ValueError(f"{name} has {len(tensors)} tensors but {first} has {n}")
    if n == 0:
        return None
    device = lists[0][0].device
    for name, tensors in zip(names, lists, strict=True):
        for i, (t, ref) in enumerate(zip(tensors, lists[0], strict=True)):
            if t.shape != ref.shape:
                raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)} but {first}[{i}] has {tuple(ref.shape)}")
            if t.device != device:
                raise ValueError(f"{name}[{i}] is on {t.device} but {first}[0] is on {device}")
            if not t.is_floating_point():
                raise ValueError(f"{name}[{i}] has dtype {t.dtype}; expected a floating point dtype")
    return device


@dataclass(frozen=True)
class Launch:
    """One kernel launch: a dtype-uniform group of aligned tensors and its device table."""

    addrs: torch.Tensor
    numels: torch.Tensor
    chunks: torch.Tensor
    num_tensors: int
    num_chunks: int
    witnesses: tuple[torch.Tensor, ...]


def launches(lists: TensorLists) -> list[Launch]:
    """Groups aligned contiguous tensors by dtype signature and builds (or reuses) each group's table.

    Args:
        lists: R lists of T contiguous tensors on one device (see ``contiguous``).

    Returns:
        One ``Launch`` per distinct tuple of role dtypes, skipping empty tensors.
    """
    groups: dict[tuple[torch.dtype, ...], list[int]] = {}
    for i in range(len(lists[0])):
        if lists[0][i].numel():
            groups.setdefault(tuple(role[i].dtype for role in lists), []).append(i)
    out = []
    for index in groups.values():
        group = [[role[i] for i in index] for role in lists]
        table = _table(group)
        r, t = len(group), len(index)
        out.append(
            Launch(
                addrs=table[: r * t],
                numels=table[r * t : (r + 1) * t],
                chunks=table[(r + 1) * t :],
                num_tensors=t,
                num_chunks=(table.numel() - (r + 1) * t) // 2,
                witnesses=tuple(role[0] for role in group),
            )
        )
    return out


def _table(group: list[list[torch.Tensor]]) -> torch.Tensor:
    device = group[0][0].device
    numels = [t.numel() for t in group[0]]
    key = (device, len(group), *(t.data_ptr() for role in group for t in role), *numels)
    table = _table_cache.get(key)
    if table is not None:
        _table_cache.move_to_end(key)
        return table
    sizes = torch.tensor(numels, dtype=torch.int64)
    per_tensor = (sizes + CHUNK - 1) // CHUNK
    tensor_of_chunk = torch.repeat_interleave(torch.arange(len(numels)), per_tensor)
    first_chunk = torch.cumsum(per_tensor, 0) - per_tensor
    starts = (torch.arange(tensor_of_chunk.numel()) - first_chunk[tensor_of_chunk]) * CHUNK
    addrs = torch.tensor([t.data_ptr() for role in group for t in role], dtype=torch.int64)
    host = torch.cat([addrs, sizes, torch.stack([tensor_of_chunk, starts], 1).view(-1)])
    # On CUDA: pinned + non_blocking, so no host sync, also under CUDA graph capture.
    table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    _table_cache[key] = table
    if len(_table_cache) > _TABLE_CACHE_SIZE:
        _table_cache.popitem(last=False)
    return table


def contiguous(lists: TensorLists, written: Sequence[int]) -> tuple[list[list[torch.Tensor]], list[tuple]]:
    """Replaces non-contiguous tensors with contiguous copies for a launch.

    Args:
        lists: R lists of T tensors.
        written: Roles the op writes in place.

    Returns:
        The lists to launch on, and ``(original, copy)`` pairs that ``write_back`` copies back.
    """
    out = [list(role) for role in lists]
    pending = []
    for r, role in enumerate(out):
        for i, t in enumerate(role):
            if not t.is_contiguous():
                role[i] = t.contiguous()
                if r in written:
                    pending.append((t, role[i]))
    return out, pending


def write_back(pending: list[tuple]) -> None:
    """Copies the results computed in contiguous copies back into the caller's tensors."""
    for original, copy in pending:
        original.copy_(copy)


def buckets(lists: TensorLists) -> Iterator[list[list[torch.Tensor]]]:
    """Cuts aligned lists into buckets of at most ``BUCKET`` elements for the reference path.

    Contiguous tensors are flattened and split; a tensor non-contiguous in any role is taken whole.

    Args:
        lists: R lists of T tensors.

    Yields:
        R lists of aligned pieces (same shapes across roles).
    """
    bucket: list[list[torch.Tensor]] = [[] for _ in lists]
    size = 0
    for i in range(len(lists[0])):
        tensors = [role[i] for role in lists]
        n = tensors[0].numel()
        if all(t.is_contiguous() for t in tensors):
            flat = [t.view(-1) for t in tensors]
            pieces = [[f[s : s + BUCKET] for f in flat] for s in range(0, n, BUCKET)]
        else:
            pieces = [tensors]
        for piece in pieces:
            if size and size + piece[0].numel() > BUCKET:
                yield bucket
                bucket, size = [[] for _ in lists], 0
            for r, p in enumerate(piece):
                bucket[r].append(p)
            size += piece[0].numel()
    if size:
        yield bucket


def flat_f32(pieces: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenates a bucket's pieces of one role into a flat fp32 buffer."""
    return torch.cat([p.reshape(-1) for p in pieces]).float()


def copy_flat_(pieces: Sequence[torch.Tensor], flat: torch.Tensor) -> None:
    """Writes a flat fp32 buffer back into the pieces it came from (one rounding to their dtypes)."""
    parts = flat.split([p.numel() for p in pieces])
    torch._foreach_copy_(list(pieces), [f.view(p.shape) for f, p in zip(parts, pieces, strict=True)])


@triton.jit
def chunk_span(chunks_ptr, numels_ptr, CHUNK: tl.constexpr):
    """This program's chunk: its index, its tensor, and the element range [start, end) in that tensor."""
    c = tl.program_id(0)
    t = tl.load(chunks_ptr + 2 * c)
    start = tl.load(chunks_ptr + 2 * c + 1)
    end = tl.minimum(start + CHUNK, tl.load(numels_ptr + t))
    return c, t, start, end


@triton.jit
def role_ptr(addrs_ptr, num_tensors, role, t, witness):
    """Typed pointer to tensor ``t`` of ``role``; ``witness`` is a tensor of that role (gives the dtype)."""
    return tl.load(addrs_ptr + role * num_tensors + t).to(witness.dtype)
