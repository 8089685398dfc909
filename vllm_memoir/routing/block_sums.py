"""Sums of the edited layer's down_proj input per KV-cache block, for routing spans seen in parts.

Routing on a span of the prompt (the last user message; span_sums) needs each block's own
sum, where whole-prompt routing needs only running sums (prefix_sums): a request's tokens
before its first position in this forward are exactly the blocks of its block table,
whether this request computed them in an earlier chunk or another request computed them
and the prefix cache handed them over.

Exact only when the down_proj input at a position does not depend on any route, i.e. the
edit sits at the last decoder layer (validation refuses the other cases): then the sums of
a block depend on its tokens alone, like the KV vLLM shares.

A block's sum is reset when a token is written at the block's first slot: vLLM fills a
block from its first slot whenever it (re)computes it, and never rewrites a cached block.
"""

from __future__ import annotations

import torch


class BlockFeatureSums:
    """[num_blocks, D_local] float32 sums, grown on demand, indexed like the KV cache."""

    def __init__(self, block_size: int, local_dim: int, device: torch.device | str):
        if block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.sums = torch.zeros(0, local_dim, dtype=torch.float32, device=device)

    def _ensure_blocks(self, num_blocks: int) -> None:
        if num_blocks <= self.sums.shape[0]:
            return
        # Grow geometrically: the KV cache's block count is fixed, so this settles quickly.
        grown = torch.zeros(max(num_blocks, 2 * self.sums.shape[0]), self.sums.shape[1],
                            dtype=self.sums.dtype, device=self.sums.device)
        grown[: self.sums.shape[0]] = self.sums
        self.sums = grown

    def record(self, x: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Add this forward's tokens x[t] (down_proj inputs) to the blocks their KV went to.

        slot_mapping: [T] KV slot of each token (negative for padding tokens, skipped).
        """
        slots = slot_mapping[: x.shape[0]].to(torch.int64)
        valid = slots >= 0
        if not bool(valid.all()):
            slots, x = slots[valid], x[valid]
        if slots.numel() == 0:
            return
        blocks = torch.div(slots, self.block_size, rounding_mode="floor")
        self._ensure_blocks(int(blocks.max()) + 1)
        starts = blocks[slots % self.block_size == 0]
        if starts.numel():
            self.sums.index_fill_(0, starts, 0.0)  # (re)computed from its first slot: new content
        self.sums.index_add_(0, blocks, x.float())
