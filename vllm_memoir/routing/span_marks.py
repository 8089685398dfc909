"""Where each request's KV blocks start a tail and end a head (see routing.span_sums).

Found on the host from a request's span boundaries (its prompt token ids) when it enters the
batch, kept per slot in a host table and copied to the device for the slots that changed when
the request buffers are published: the routing op reads each token's marks with one gather.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_memoir.core.route_span import SpanBoundaries
from vllm_memoir.routing.layout import TokenIndex

NONE = -1


def tail_and_head(boundaries: SpanBoundaries, positions: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each position: the span start its block's tail is summed from, and the span end its
    block's head is summed to (absolute positions, NONE where the block has none)."""
    block_start = positions - positions % block_size
    block_end = block_start + block_size
    starts, ends = boundaries.starts, boundaries.ends
    tail_start = np.full(positions.shape, NONE, dtype=np.int64)
    if starts.size:
        last = np.searchsorted(starts, block_end, side="left") - 1  # the last start before the block's end
        found = starts[np.maximum(last, 0)]
        tail_start = np.where((last >= 0) & (found >= block_start), found, NONE)
    head_end = np.full(positions.shape, NONE, dtype=np.int64)
    if ends.size:
        after = np.where(tail_start >= 0, tail_start, block_start)
        first = np.searchsorted(ends, after, side="left")  # the first end at or after `after`
        found = ends[np.minimum(first, ends.size - 1)]
        head_end = np.where((first < ends.size) & (found < block_end), found, NONE)
    return tail_start, head_end


def no_marks(block_size: int) -> tuple[int, int]:
    """The marks of a block without a tail or head: a tail from its end, a head to its start
    (both empty, and never the offsets a span boundary inside the block is looked up by)."""
    return block_size, 0


def block_marks(boundaries: SpanBoundaries | None, num_blocks: int, block_size: int) -> np.ndarray:
    """[num_blocks, 2] int32 for a request's logical blocks: the offset inside the block its tail
    starts at and its head ends at (no_marks() where the block has none)."""
    marks = np.empty((num_blocks, 2), dtype=np.int32)
    marks[:] = no_marks(block_size)
    if boundaries is None or boundaries.last < 0:
        return marks
    used = min(num_blocks, boundaries.last // block_size + 1)  # blocks after the last boundary have none
    block_start = np.arange(used, dtype=np.int64) * block_size
    tail_start, head_end = tail_and_head(boundaries, block_start, block_size)
    marks[:used, 0] = np.where(tail_start >= 0, tail_start - block_start, block_size)
    marks[:used, 1] = np.where(head_end >= 0, head_end - block_start, 0)
    return marks


class SlotBlockMarks:
    """block_marks() of the request in each slot: a host table and its device copy, refreshed
    for the slots that changed when the request buffers are published."""

    def __init__(self, capacity: int, num_blocks: int, block_size: int, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # One spare slot past the end (the request buffers' padding slot): never marked.
        self.host = torch.tensor(no_marks(block_size), dtype=torch.int32).repeat(capacity + 1, num_blocks, 1)
        self.device_table = self.host.to(device, copy=True)
        self._changed: set[int] = set()

    @property
    def capacity(self) -> int:
        return self.host.shape[0] - 1

    def set(self, slot: int, boundaries: SpanBoundaries | None) -> None:
        self.host[slot] = torch.from_numpy(block_marks(boundaries, self.num_blocks, self.block_size))
        self._changed.add(slot)

    def swap(self, a: int, b: int) -> None:
        self.host[[a, b]] = self.host[[b, a]]
        self._changed.update((a, b))

    def grown(self, capacity: int) -> "SlotBlockMarks":
        bigger = SlotBlockMarks(capacity, self.num_blocks, self.block_size, self.device_table.device)
        bigger.host[: self.capacity] = self.host[: self.capacity]
        bigger._changed = set(range(self.capacity))
        return bigger

    def publish(self) -> None:
        if not self._changed:
            return
        slots = torch.tensor(sorted(self._changed), dtype=torch.int64)
        self._changed.clear()
        rows = self.host.index_select(0, slots)
        device = self.device_table.device
        self.device_table.index_copy_(0, slots.to(device, non_blocking=True), rows.to(device, non_blocking=True))

    def of_tokens(self, tokens: TokenIndex, row_slots: torch.Tensor) -> torch.Tensor:
        """[T, 2] each token's marks: those of its request's logical block (padding tokens' are
        whatever; their KV slot sends them to the discard row)."""
        slot = row_slots.index_select(0, tokens.row)
        block = torch.div(tokens.position, self.block_size, rounding_mode="floor").clamp_(0, self.num_blocks - 1)
        return self.device_table.view(-1, 2).index_select(0, slot * self.num_blocks + block)
