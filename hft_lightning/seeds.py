"""One function for every random stream of a run: :func:`derive_seed`.

Each stream (a stage's batch order, a replay draw, a memory's reservoir, a built-in ability's examples) is seeded
with ``derive_seed(seed, *parts)``: the run's seed and the parts that name the stream, hashed. Streams named
differently are independent, whatever the numbers in their names, and a stream's seed depends on nothing but its
name, so a resumed run draws what the uninterrupted run drew. This module imports nothing from the package, so
every layer may import it.
"""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, *parts: int | str) -> int:
    """The seed of the random stream named ``parts`` in a run seeded with ``seed``.

    Args:
        seed: The run's seed (``data.seed``).
        *parts: The stream's name, most general first, e.g. ``("replay", stage_index, batch_index, rank)``.

    Returns:
        A non-negative 63-bit integer (a valid ``torch.Generator`` and ``random.Random`` seed), the same on every
        machine and Python version: a blake2b digest of the arguments' ``repr``.

    Example::

        generator = torch.Generator().manual_seed(derive_seed(datamodule.seed, "memory", stage_index))
    """
    for part in (seed, *parts):
        if not isinstance(part, int | str) or isinstance(part, bool):
            raise TypeError(f"derive_seed takes ints and strings, got {part!r} ({type(part).__name__})")
    digest = hashlib.blake2b(repr((seed, *parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
