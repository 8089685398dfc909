"""Sums of the edited layer's down_proj input per KV-cache block, for prompts seen in parts.

A route feature is the mean of layer L's down_proj input over a prompt (or over a span of
it). With chunked prefill a prompt reaches layer L over several forwards, and with prefix
caching its cached tokens never reach it at all. Both are covered by keeping, beside vLLM's
KV cache, each physical block's sum of the input over the positions written to it: a
request's tokens before its first position in a forward are exactly the blocks of its
block table, whether it computed them in an earlier chunk or the prefix cache handed them
over from another request.

Why a block's sum fits every request that shares it: vLLM's prefix cache hands a block to
another request only when all tokens up to the block's end agree (the block hash chains
over the whole prefix), and the input at a position depends on those tokens alone when it
does not depend on any route, i.e. the edit sits at the last decoder layer (the start-up
checks refuse the other cases under prompt splitting).

A block's sum is reset when a token is written at its first slot: vLLM fills a block from
its first slot whenever it (re)computes it, and never rewrites a cached block.

Recording is one reset and one scatter-add per forward, of fixed shape (the forward's
token count): cheap enough for every decode step, which must record too (a later turn of a
chat re-sends this answer as prompt, and the prefix cache hands its blocks over). Reading
walks a request's block table once, at its routing decision. The table is float32, as the
reference's sum over a prompt is; nothing is read back to the host.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from vllm_memoir.routing.layout import TokenIndex, TokenLayout

logger = logging.getLogger(__name__)


class BlockSums:
    """[num_blocks + 2, D_local] float32: a row per KV block, then an always-zero row (read for
    block-table entries a request does not use) and a row that absorbs padding writes."""

    def __init__(self, block_size: int, local_dim: int, device: torch.device | str,
                 num_blocks: int | Callable[[], int | None] | None = None):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.local_dim = local_dim
        self.device = torch.device(device)
        # An int, or a callable giving the KV cache's block count once the engine knows it.
        self._num_blocks = num_blocks
        self.sums: torch.Tensor | None = None

    def _allocate(self, layout: TokenLayout) -> None:
        num_blocks = self._num_blocks() if callable(self._num_blocks) else self._num_blocks
        if not num_blocks:
            # Unknown before the KV cache exists (unit tests): size from the first forward's
            # block table, with room; one host read, once.
            num_blocks = 2 * (int(layout.block_table.max()) + 1) + 64
            logger.warning("MEMOIR: KV block count unknown; sizing block sums for %d blocks", num_blocks)
        self.sums = torch.zeros(num_blocks + 2, self.local_dim, dtype=torch.float32, device=self.device)

    def table(self, layout: TokenLayout) -> torch.Tensor:
        """The sums table (allocated at the first forward that needs it)."""
        if self.sums is None:
            self._allocate(layout)
        return self.sums

    @property
    def zero_row(self) -> int:
        return self.sums.shape[0] - 2

    @property
    def discard_row(self) -> int:
        return self.sums.shape[0] - 1

    def sum_before(self, layout: TokenLayout, rows: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """[P, D] the summed input of batch rows `rows` over their positions 0..first-1 (zero
        where first is 0): the blocks of their block tables below `first`, the last one as far
        as it was written. Read before this forward is recorded."""
        self.table(layout)
        table = layout.block_table.index_select(0, rows).long()  # [P, max blocks per request]
        used = torch.arange(table.shape[1], device=table.device) * self.block_size < first.unsqueeze(1)
        return self.sum_blocks(table, used)

    def sum_blocks(self, table: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """[P, D] per row of `table` ([P, C] physical block ids), the sum of its blocks where
        `used` ([P, C] bool); the others read the always-zero row."""
        blocks = torch.where(used, table.clamp(0, self.zero_row - 1), self.zero_row)
        return self.sums.index_select(0, blocks.flatten()).view(*blocks.shape, -1).sum(dim=1)

    def token_blocks(self, x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] the table row each of this forward's tokens goes to (padding tokens: the discard
        row) and [T] its offset inside its block."""
        self.table(layout)
        size = self.block_size
        slots = layout.slot_mapping[: x.shape[0]].long()
        if slots.shape[0] < x.shape[0]:  # padding tokens beyond the metadata's slots
            slots = torch.cat([slots, slots.new_full((x.shape[0] - slots.shape[0],), -1)])
        if not tokens.decode_only:  # padding tokens past the last row: whatever their slots say
            slots = torch.where(tokens.valid, slots, -1)
        # Padding slots are -1: their block, -1, wraps to the discard row (the table's last).
        block = torch.div(slots, size, rounding_mode="floor").remainder_(self.sums.shape[0])
        return block, slots % size

    def record(self, x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex) -> None:
        """Add this forward's tokens to the blocks their KV went to (padding tokens: to the
        discard row), resetting the blocks written from their first slot."""
        self.record_at(x, *self.token_blocks(x, layout, tokens))

    def record_at(self, x: torch.Tensor, block: torch.Tensor, offset: torch.Tensor) -> None:
        """record(), with token_blocks() already found."""
        self.sums.index_fill_(0, torch.where(offset == 0, block, self.discard_row), 0.0)
        self.sums.index_add_(0, block, x.to(self.sums.dtype))
