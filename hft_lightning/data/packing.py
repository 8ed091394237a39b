"""Padding-free batches: a batch's examples packed into rows of a fixed length, attention kept within each example.

A padded batch of ``B`` examples costs ``B`` rows of its longest example's length, however short the others are.
Packing lays the same examples out end to end in rows of ``row_length`` tokens (first-fit decreasing; rows grow to
the batch's longest example if it is longer, and no example is split), with position ids restarting at 0 at every
example. transformers (4.54 and later) reads the restarts as sequence boundaries: sdpa, eager and flex attention get a
block-diagonal causal mask, flash attention its variable-length path, so no token attends to another example.

The first token of every example is labelled ``-100``: in the padded layout it is never a target either (the shift
of a causal LM's loss drops a row's first label), so the loss is the mean over exactly the same tokens. Packing
changes the layout, not what is trained: the loss and the gradients equal the padded batch's up to float rounding
(a test checks it). The batch still holds the same ``B`` examples, so the curriculum, replay and resume see no
difference; what changes is the cost: fewer padded tokens, longer rows (attention over a row of ``L`` tokens costs
``L^2`` with a dense mask, only the examples' own blocks with flash attention).
"""

from __future__ import annotations

import torch

from hft_lightning.data.sft import IGNORE_INDEX


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of indices into ``lengths`` whose lengths sum to at most ``capacity``, longest items placed first.

    Args:
        lengths: Item lengths, each in ``[1, capacity]``.
        capacity: Length of a bin.

    Returns:
        The bins, each a list of item indices in the order they were placed.
    """
    bins: list[list[int]] = []
    free: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, room in enumerate(free) if room >= lengths[index]), len(bins))
        if row == len(bins):
            bins.append([])
            free.append(capacity)
        bins[row].append(index)
        free[row] -= lengths[index]
    return bins


def pack_batch(batch: dict[str, torch.Tensor], pad_token_id: int, row_length: int) -> dict[str, torch.Tensor]:
    """Packs a right-padded batch into rows of ``row_length`` tokens.

    Args:
        batch: ``input_ids``, ``attention_mask`` and ``labels``, shape ``[B, T]``, every row right-padded (its
            tokens first, then padding).
        pad_token_id: The token filling the end of a row that is not full.
        row_length: Tokens per packed row; rows are ``max(row_length, T)`` long at most, and trimmed to the
            longest one.

    Returns:
        ``input_ids``, ``position_ids`` and ``labels`` of shape ``[R, L]``, ``L <= max(row_length, T)`` (no
        ``attention_mask``: transformers finds the examples from the position ids). The padding at the end of a
        row is a sequence of its own (positions from 0, labels ``-100``).
    """
    input_ids, labels = batch["input_ids"], batch["labels"]
    real = batch["attention_mask"].bool()
    lengths = real.sum(1).tolist()  # the one host sync: the bin packing runs on the host
    rows = first_fit_decreasing(lengths, max(row_length, input_ids.shape[1]))
    row_of, start_of, used = [0] * len(lengths), [0] * len(lengths), []
    for row, members in enumerate(rows):
        offset = 0
        for index in members:
            row_of[index], start_of[index] = row, offset
            offset += lengths[index]
        used.append(offset)
    width = max(used)

    device = input_ids.device
    position = torch.arange(input_ids.shape[1], device=device).expand_as(input_ids)
    dest_row = torch.tensor(row_of, device=device)[:, None].expand_as(input_ids)[real]
    dest_col = (torch.tensor(start_of, device=device)[:, None] + position)[real]
    # Before the examples are written in, every column holds its distance from the end of its row's examples:
    # the padding after them then starts a sequence at position 0.
    packed_position = torch.arange(width, device=device) - torch.tensor(used, device=device)[:, None]
    packed_position[dest_row, dest_col] = position[real]
    packed_ids = input_ids.new_full((len(rows), width), pad_token_id)
    packed_ids[dest_row, dest_col] = input_ids[real]
    packed_labels = labels.new_full((len(rows), width), IGNORE_INDEX)
    packed_labels[dest_row, dest_col] = labels.masked_fill(position == 0, IGNORE_INDEX)[real]
    return {"input_ids": packed_ids, "position_ids": packed_position, "labels": packed_labels}
