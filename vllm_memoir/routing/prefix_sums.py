"""Running sums of the edited layer's down_proj input, kept per KV-cache block.

A route feature is the mean of layer L's down_proj input over a prompt. With chunked prefill
a prompt reaches layer L over several forwards, and with prefix caching its cached tokens
never reach it at all. Both are covered by keeping, beside vLLM's KV cache, one *cumulative*
sum per physical block: the sum of the input over positions 0..p of the request that wrote
the block, p the last position it wrote there. A request's sum up to any position is then
its sum up to the end of the previous forward (one lookup: the block holding its position
first - 1) plus a running sum over this forward's tokens; no walk over its block table.

Why a block's cumulative sum fits every request that shares it: vLLM's prefix cache hands a
block to another request only when all tokens up to the block's end agree (the block hash
chains over the whole prefix), and the sum over positions 0..p depends on those tokens
alone when the down_proj input at a position does not depend on any route, i.e. the edit
sits at the last decoder layer (validation refuses the other cases under prompt splitting).

The table is float32, as the reference's sum over a prompt is. Within a forward of several
tokens per row the running sums are float64: they are differences of the batch's cumulative
sum (the sum before each row taken off), which float32 would round visibly on long batches.
Everything is a fixed-shape tensor operation (the forward's token count and batch size):
nothing is read back to the host.
"""

from __future__ import annotations

import logging

import torch

from vllm_memoir.routing.layout import TokenIndex, TokenLayout

logger = logging.getLogger(__name__)


def running_sums(x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex,
                 before_forward: torch.Tensor | None = None) -> torch.Tensor:
    """[T, D]: for each token, its row's summed input up to and including it (float64, or
    float32 in a decode-only forward, where no difference is taken).

    `before_forward` [R, D] is each row's sum over positions before this forward (None:
    zero, i.e. every row starts in this forward).
    """
    if tokens.decode_only:  # one token per row: its sum is the row's sum before, plus itself
        return x.float() if before_forward is None else before_forward + x
    rows = layout.num_rows
    total = (x.double() * tokens.valid.unsqueeze(1)).cumsum(dim=0)
    starts = layout.query_start[:rows].long()
    padded = torch.cat([total.new_zeros(1, total.shape[1]), total])
    per_row = -padded[starts]  # minus the batch's sum before each row's first token
    if before_forward is not None:
        per_row = per_row + before_forward
    return total + per_row[tokens.row]


class PrefixSums:
    """[num_blocks + 1, D_local] float32 cumulative sums (the last row absorbs padding writes)."""

    def __init__(self, block_size: int, local_dim: int, device: torch.device | str, num_blocks=None):
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
            logger.warning("MEMOIR: KV block count unknown; sizing prefix sums for %d blocks", num_blocks)
        self.sums = torch.zeros(num_blocks + 1, self.local_dim, dtype=torch.float32, device=self.device)

    @property
    def _padding_row(self) -> int:
        return self.sums.shape[0] - 1

    def before_forward(self, layout: TokenLayout, tokens: TokenIndex) -> torch.Tensor:
        """[R, D] each row's summed input over positions 0..first-1 (zero where first is 0)."""
        if self.sums is None:
            self._allocate(layout)
        # In a decode-only forward each row's one token is its first (tokens.position).
        first = tokens.position if tokens.decode_only else layout.row_first_position
        column = torch.div(first - 1, self.block_size, rounding_mode="floor").clamp_(min=0).unsqueeze(1)
        block = layout.block_table[: layout.num_rows].gather(1, column).squeeze(1)
        earlier = self.sums.index_select(0, block.clamp_(0, self._padding_row))
        return earlier.mul_((first > 0).unsqueeze(1))

    def update(self, x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex) -> torch.Tensor:
        """Record this forward's tokens; returns their running sums (running_sums, from the
        blocks' sums before this forward)."""
        running = running_sums(x, layout, tokens, self.before_forward(layout, tokens))
        self.record(running, layout, tokens)
        return running

    def record(self, running: torch.Tensor, layout: TokenLayout, tokens: TokenIndex) -> None:
        """Store each touched block's cumulative sum: at its last slot, or at the row's last
        token in this forward where the row stops inside the block."""
        if self.sums is None:
            self._allocate(layout)
        size = self.block_size
        slots = layout.slot_mapping[: running.shape[0]].long()
        if slots.shape[0] < running.shape[0]:  # padding tokens beyond the metadata's slots
            slots = torch.cat([slots, slots.new_full((running.shape[0] - slots.shape[0],), -1)])
        if tokens.decode_only:
            writes = slots >= 0  # every token is its row's last
        else:
            writes = tokens.valid & (slots >= 0) & ((slots % size == size - 1) | tokens.is_row_last)
        # Each block has at most one writer per forward (its last token here); other tokens
        # write the padding row.
        block = torch.where(writes, slots // size, self._padding_row)
        self.sums.index_copy_(0, block, running.to(self.sums.dtype))
