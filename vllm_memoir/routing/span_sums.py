"""Partial KV-block sums, for route features over part of the prompt (a routing span).

BlockSums keeps each KV block's whole sum of the edited layer's down_proj input:
enough for a feature over the whole prompt. A routing span (the last user message) starts and
ends anywhere inside a block, so where its earlier tokens reached the layer before this
forward (an earlier chunk of the same request, or blocks the prefix cache handed over from
another request), whole-block sums also hold tokens outside the span.

So for each block, the request that computes it also keeps:
- tail: the sum from the block's last span start (a position right after a user marker) to
  the block's end;
- head: the sum from the block's start to its span end (where a message-end marker begins:
  the first one at or after the block's span start when it has one, else the first);
with the offsets they were summed from. A span [s, e) is then exactly whole blocks, plus the
tail of s's block and the head of e's block (tail + head - whole block when both fall in one
block).

Why the offsets fit a later request: the prefix cache shares a block only between requests
whose tokens agree up to that block's end, so the markers in it sit at the same places; a
request's span starts after its *last* user marker, which is then the last one in its block
as well, and ends at the first end marker after that. Offsets are compared, not assumed: a
block computed while another span rule was served, or whose markers were generated tokens
of the request that computed it, does not match, and the caller gets an approximate sum
(the whole block) flagged as such.

Costs two more [num_blocks, D_local] float32 buffers, beside BlockSums' one, and
host-side work only for rows whose tokens share a block with a span boundary.
"""

from __future__ import annotations

import numpy as np
import torch

from vllm_memoir.routing.block_sums import BlockSums
from vllm_memoir.core.route_span import SpanBoundaries

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


class SpanBlockSums:
    """Tail and head sums per physical KV block, with the offsets they start or end at."""

    def __init__(self, block_size: int, local_dim: int, device: torch.device | str):
        self.block_size = block_size
        self.tail = torch.zeros(0, local_dim, dtype=torch.float32, device=device)
        self.head = torch.zeros(0, local_dim, dtype=torch.float32, device=device)
        # Offsets inside the block, kept on the host: they are derived from host-side token ids.
        self.tail_from = np.zeros(0, dtype=np.int64)
        self.head_to = np.zeros(0, dtype=np.int64)

    def _ensure_blocks(self, num_blocks: int) -> None:
        have = self.tail.shape[0]
        if num_blocks <= have:
            return
        grown = max(num_blocks, 2 * have)
        for name in ("tail", "head"):
            old = getattr(self, name)
            new = torch.zeros(grown, old.shape[1], dtype=old.dtype, device=old.device)
            new[:have] = old
            setattr(self, name, new)
        for name in ("tail_from", "head_to"):
            setattr(self, name, np.concatenate([getattr(self, name), np.full(grown - have, NONE, dtype=np.int64)]))

    # --- recording (after the forward's routing decisions) --------------------------------------

    def record(self, x: torch.Tensor, slot_mapping: torch.Tensor, rows: list[tuple[int, int, int, SpanBoundaries | None]]) -> None:
        """Add this forward's tokens to the tails and heads of the blocks their KV went to.

        rows: (first token index in x, token count, first position, span boundaries or None)
        per batch row. A block written from its first slot is new content: its sums and
        offsets are reset, then set by the row that writes it.
        """
        size = self.block_size
        slots = slot_mapping[: x.shape[0]].to(torch.int64).cpu().numpy()
        valid = slots >= 0
        if not valid.any():
            return
        blocks = slots // size
        self._ensure_blocks(int(blocks[valid].max()) + 1)
        starting = np.unique(blocks[valid & (slots % size == 0)])
        if starting.size:
            index = torch.from_numpy(starting).to(self.tail.device)
            self.tail.index_fill_(0, index, 0.0)
            self.head.index_fill_(0, index, 0.0)
            self.tail_from[starting] = NONE
            self.head_to[starting] = NONE
        tail_tokens, tail_blocks, head_tokens, head_blocks = [], [], [], []
        for token_start, count, first, boundaries in rows:
            if boundaries is None or count == 0:
                continue
            last = boundaries.last
            if last < 0 or first // size > last // size:
                continue  # every token of the row lies in blocks after its last span boundary
            positions = np.arange(first, first + count, dtype=np.int64)
            tail_start, head_end = tail_and_head(boundaries, positions, size)
            row_blocks = blocks[token_start:token_start + count]
            ok = valid[token_start:token_start + count]
            begins = ok & (positions % size == 0)
            offset = positions % size
            self.tail_from[row_blocks[begins]] = np.where(tail_start[begins] >= 0, (tail_start - positions + offset)[begins], NONE)
            self.head_to[row_blocks[begins]] = np.where(head_end[begins] >= 0, (head_end - positions + offset)[begins], NONE)
            in_tail = ok & (tail_start >= 0) & (positions >= tail_start)
            in_head = ok & (head_end >= 0) & (positions < head_end)
            tail_tokens.append(token_start + np.flatnonzero(in_tail))
            tail_blocks.append(row_blocks[in_tail])
            head_tokens.append(token_start + np.flatnonzero(in_head))
            head_blocks.append(row_blocks[in_head])
        self._add(self.tail, x, tail_tokens, tail_blocks)
        self._add(self.head, x, head_tokens, head_blocks)

    @staticmethod
    def _add(target: torch.Tensor, x: torch.Tensor, tokens: list[np.ndarray], blocks: list[np.ndarray]) -> None:
        if not tokens:
            return
        token_index = np.concatenate(tokens)
        if token_index.size == 0:
            return
        device = target.device
        rows = x.index_select(0, torch.from_numpy(token_index).to(x.device)).float().to(device)
        target.index_add_(0, torch.from_numpy(np.concatenate(blocks)).to(device), rows)

    # --- reading (at a routing decision, before this forward is recorded) ------------------------

    def span_sum(self, block_sums: BlockSums, block_table_row: torch.Tensor, lo: int, hi: int,
                 first: int) -> tuple[torch.Tensor, bool]:
        """Summed inputs over positions [lo, hi) of one request, all before `first` (its first
        position in this forward); and whether the sum is exact.

        block_table_row: the request's physical KV block ids. Blocks below `first` hold
        positions up to min(block end, first) (the last one partly, from this request's chunk).
        """
        size = self.block_size
        sums = block_sums.sums
        first_block, last_block = lo // size, (hi - 1) // size
        physical = block_table_row[first_block:last_block + 1].to(torch.int64).cpu().tolist()
        total = torch.zeros(sums.shape[1], dtype=torch.float32, device=sums.device)
        exact = True
        whole: list[int] = []
        for i, block in enumerate(physical):
            start = (first_block + i) * size
            begin, end = max(lo, start) - start, min(hi, start + size) - start
            recorded = min(start + size, first) - start
            if block >= sums.shape[0] or block >= self.tail.shape[0]:
                exact = False  # never recorded (cannot happen for blocks this layer saw; a guard)
                continue
            if begin == 0 and end == recorded:
                whole.append(block)
                continue
            part, part_exact = self._part(sums, block, begin, end, recorded)
            total += part
            exact = exact and part_exact
        if whole:
            total += sums.index_select(0, torch.tensor(whole, dtype=torch.int64, device=sums.device)).sum(dim=0)
        return total, exact

    def _part(self, sums: torch.Tensor, block: int, begin: int, end: int, recorded: int) -> tuple[torch.Tensor, bool]:
        """Offsets [begin, end) of a block holding [0, recorded): tail and/or head, where their
        offsets match; else the nearest approximation (the recorded block)."""
        exact = True
        if begin == 0:
            part = sums[block]
        elif self.tail_from[block] == begin:
            part = self.tail[block]
        else:
            part, exact = sums[block], False
        if end < recorded:
            if self.head_to[block] == end:
                part = part + self.head[block] - sums[block]
            else:
                exact = False
        return part, exact
