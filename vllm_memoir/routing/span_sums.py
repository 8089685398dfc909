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

Everything in the forward is tensor operations on preallocated device buffers, like
BlockSums: where a request's tails and heads start and end is found on the host when it
enters the batch (routing.span_marks, from its prompt token ids) and published per slot, as the request
buffers are. Costs two more [num_blocks, D_local] float32
buffers beside BlockSums' one, and two more scatter-adds per forward.
"""

from __future__ import annotations

import torch

from vllm_memoir.routing.block_sums import BlockSums
from vllm_memoir.routing.device import reads_are_free
from vllm_memoir.routing.layout import TokenIndex, TokenLayout
from vllm_memoir.routing.span_marks import no_marks


TAIL, HEAD = 0, 1


class SpanBlockSums:
    """Tail and head sums per physical KV block, with the offsets they start or end at; rows
    line up with BlockSums' (its zero and discard rows included)."""

    def __init__(self, block_sums: BlockSums):
        self.block_sums = block_sums
        self.block_size = block_sums.block_size
        # [rows, 2, D]: each block's tail and head sums; [rows, 2]: the offset its tail starts
        # at and its head ends at (one table each, so a reset is one operation).
        self.parts: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None

    def _allocate(self, layout: TokenLayout) -> None:
        sums = self.block_sums.table(layout)
        self.parts = torch.zeros(sums.shape[0], 2, sums.shape[1], dtype=sums.dtype, device=sums.device)
        self._empty = torch.tensor(no_marks(self.block_size), dtype=torch.int32, device=sums.device)
        self.offsets = self._empty.repeat(sums.shape[0], 1)

    @property
    def tail(self) -> torch.Tensor:
        return self.parts[:, TAIL]

    @property
    def head(self) -> torch.Tensor:
        return self.parts[:, HEAD]

    # --- recording (after the forward's routing decisions) --------------------------------------

    def record(self, x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex, token_marks: torch.Tensor) -> None:
        """Add this forward's tokens to the tails and heads of the blocks their KV went to.

        token_marks: [T, 2] each token's block marks (SlotBlockMarks.of_tokens). A block
        written from its first slot is new content: its sums are reset and its offsets set
        from the marks of the token written there.
        """
        self.record_at(x, *self.block_sums.token_blocks(x, layout, tokens), token_marks, layout)

    def record_at(self, x: torch.Tensor, block: torch.Tensor, offset: torch.Tensor, token_marks: torch.Tensor,
                  layout: TokenLayout) -> None:
        """record(), with BlockSums.token_blocks() already found."""
        if self.parts is None:
            self._allocate(layout)
        discard = self.block_sums.discard_row
        starting = torch.where(offset == 0, block, discard)
        # Several tokens may land on the discard row; which value it keeps does not matter.
        self.offsets.index_put_((starting,), token_marks)
        if reads_are_free(x) and not bool((token_marks != self._empty).any()):
            # No token here is in a block with a tail or head (decode steps past the prompt's
            # boundaries): nothing to add, and the blocks started here have empty offsets, so
            # their stale parts are never read.
            return
        self.parts.index_fill_(0, starting, 0.0)
        # Empty marks (no_marks) select no token here.
        in_tail = offset >= token_marks[:, TAIL]
        in_head = offset < token_marks[:, HEAD]
        flat = self.parts.view(-1, self.parts.shape[-1])  # row 2b: block b's tail, 2b + 1: its head
        block2 = torch.where(in_tail, block, discard) * 2
        inputs = x.to(flat.dtype)
        flat.index_add_(0, block2, inputs)
        flat[HEAD:].index_add_(0, torch.where(in_head, block, discard) * 2, inputs)

    # --- reading (at a routing decision, before this forward is recorded) ------------------------

    def sum_between(self, layout: TokenLayout, rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                    first: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, D] summed inputs of batch rows `rows` over their positions [lo, hi), all before
        `first` (each row's first position in this forward); and [P] bool, where the sum is
        approximate (a boundary block without matching offsets: the whole block was used).

        Blocks below `first` hold positions up to min(block end, first) (the last one partly).
        """
        if self.parts is None:
            self._allocate(layout)
        size = self.block_size
        sums = self.block_sums.sums
        table = layout.block_table.index_select(0, rows).long()
        last_column = table.shape[1] - 1
        has = lo < hi
        zero_row = self.block_sums.zero_row
        start_column = torch.div(lo, size, rounding_mode="floor").clamp(0, last_column)
        end_column = torch.div(hi - 1, size, rounding_mode="floor").clamp(0, last_column)
        start_block = table.gather(1, start_column.unsqueeze(1)).squeeze(1).clamp(0, zero_row - 1)
        end_block = table.gather(1, end_column.unsqueeze(1)).squeeze(1).clamp(0, zero_row - 1)
        # The span's first block from its tail, where it starts inside the block.
        begin = lo - start_column * size
        needs_tail = has & (begin != 0)
        from_tail = needs_tail & (self.offsets[:, TAIL].index_select(0, start_block) == begin)
        # Its last block to its head, where it ends before what the block holds.
        end = hi - end_column * size
        recorded = torch.minimum((end_column + 1) * size, first) - end_column * size
        needs_head = has & (end < recorded)
        to_head = needs_head & (self.offsets[:, HEAD].index_select(0, end_block) == end)
        # Whole blocks: the columns between, less the boundary blocks taken from a tail or head.
        column = torch.arange(table.shape[1], device=table.device).unsqueeze(0)
        whole = has.unsqueeze(1) & (column * size < hi.unsqueeze(1)) & ((column + 1) * size > lo.unsqueeze(1))
        whole &= ~((column == start_column.unsqueeze(1)) & from_tail.unsqueeze(1))
        whole &= ~((column == end_column.unsqueeze(1)) & to_head.unsqueeze(1))
        total = self.block_sums.sum_blocks(table, whole)
        zero = total.new_zeros(())
        total += torch.where(from_tail.unsqueeze(1), self.tail.index_select(0, start_block), zero)
        total += torch.where(to_head.unsqueeze(1), self.head.index_select(0, end_block), zero)
        # One block with both: tail + head - the whole block.
        both = from_tail & to_head & (start_column == end_column)
        total -= torch.where(both.unsqueeze(1), sums.index_select(0, start_block), zero)
        approximate = (needs_tail & ~from_tail) | (needs_head & ~to_head)
        return total, approximate
