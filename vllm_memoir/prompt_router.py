"""Prompt features -> routing decisions on one tensor-parallel rank.

Each rank holds a contiguous 1/tp slice of the intermediate dimension (like the
RowParallelLinear down_proj), so it sees only its slice of the prompt feature. TopHash
needs the global top-k of |feature|: every rank takes its local top-k candidates, all ranks
all-gather them, and the union's top-k is the global top-k -- identical on every rank, and
only computed on steps where a prompt is prefilled. The stored masks are global bitsets,
replicated on every rank, so matching is exactly the single-device computation.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch

from vllm_memoir.core import MemoirArtifact, aggregate_prompt_feature, finish_feature, unpack_bits
from vllm_memoir.core.routing import EditRouter, RouteDecision

AllGather = Callable[[torch.Tensor], torch.Tensor]  # concatenates ranks' tensors along the last dim


class ShardedPromptRouter:
    def __init__(self, artifact: MemoirArtifact, tp_rank: int, tp_size: int, device: torch.device,
                 all_gather: AllGather | None = None, column_cache_size: int = 4096,
                 memory_cache_bytes: int = 256 << 20, mask_cache_bytes: int = 64 << 20):
        manifest = artifact.manifest
        self.dim = manifest.intermediate_size
        self.local_dim = self.dim // tp_size
        if tp_size > 1 and self.dim >= 1 << 24:
            raise ValueError(f"intermediate_size {self.dim} is too large for float32-exact index exchange")
        self.offset = tp_rank * self.local_dim
        self.tp_size = tp_size
        self.top_k = manifest.top_k
        self.aggregation = manifest.aggregation
        self.router = EditRouter(artifact, device)
        bg = self.router.background_mean
        self.local_background = None if bg is None else bg[self.offset:self.offset + self.local_dim]
        self.all_gather = all_gather
        self._columns: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._column_cache_size = column_cache_size
        # W_m[:, columns] per recently routed edit, so decode steps do not re-gather them;
        # tied to one memory tensor (a live swap serves a new one) and bounded in bytes.
        self._gathered: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._gathered_of: torch.Tensor | None = None
        self._gathered_bytes = 0
        self._gathered_budget = memory_cache_bytes
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._mask_cache_bytes = mask_cache_bytes

    def prompt_feature(self, x_prompt: torch.Tensor) -> torch.Tensor:
        """[T, D_local] down_proj inputs of one prompt -> [D_local] (this rank's slice)."""
        mask = torch.ones(1, x_prompt.shape[0], dtype=torch.bool, device=x_prompt.device)
        return aggregate_prompt_feature(x_prompt.unsqueeze(0), mask, self.aggregation, self.local_background)[0]

    def prompt_feature_from_parts(self, earlier_sum: torch.Tensor, x_rest: torch.Tensor,
                                  num_tokens: int) -> torch.Tensor:
        """The feature of a prompt (or of its routing span) whose first tokens reached the layer in
        earlier forwards (or came from the prefix cache): `earlier_sum` is their summed inputs,
        `x_rest` [T, D_local] the inputs of the remaining ones, in this forward (T may be 0 when a
        span ends before this forward), `num_tokens` how many there are in all."""
        if self.aggregation == "last":
            return x_rest[-1].float()  # whole prompts only: artifacts with a routing span refuse "last"
        summed = (earlier_sum.float() + x_rest.float().sum(dim=0)).unsqueeze(0)
        count = torch.tensor([num_tokens], device=summed.device)
        return finish_feature(summed, count, self.aggregation, self.local_background)[0]

    def decide(self, local_features: torch.Tensor) -> list[RouteDecision]:
        """[B, D_local] feature slices -> one decision per prompt (the same on every rank)."""
        return self.router.route_features(self._global_features(local_features))

    def _global_features(self, local: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return local
        # Only the global top-k matters to TopHash: gather each rank's top-k candidates and
        # place them in an otherwise-zero global vector, whose top-k is then exactly theirs.
        k = min(self.top_k, self.local_dim)
        values, indices = torch.topk(local.float().abs(), k, dim=-1)
        # One float32 collective for (value, global index) pairs: vLLM's CPU shared-memory
        # all-gather has no int64 kernel, and indices < 2**24 are exact in float32.
        pairs = torch.stack([values, (indices + self.offset).float()], dim=1)  # [B, 2, k]
        gathered = self.all_gather(pairs.contiguous())  # [B, 2, k * tp]
        dense = torch.zeros(local.shape[0], self.dim, dtype=torch.float32, device=local.device)
        return dense.scatter_(1, gathered[:, 1].long(), gathered[:, 0])

    def local_columns(self, edit: int) -> torch.Tensor:
        """This rank's active columns of a stored edit's mask (indices into its D_local slice)."""
        cols = self._columns.get(edit)
        if cols is None:
            active = unpack_bits(self.router.masks[edit:edit + 1], self.dim)[0].nonzero().flatten()
            local = active[(active >= self.offset) & (active < self.offset + self.local_dim)]
            cols = local - self.offset
            self._columns[edit] = cols
            if len(self._columns) > self._column_cache_size:
                self._columns.popitem(last=False)
        else:
            self._columns.move_to_end(edit)
        return cols

    def local_mask(self, edit: int) -> torch.Tensor:
        """local_columns(edit) as a [D_local] bool mask, cached per edit (bounded in bytes)."""
        mask = self._masks.get(edit)
        if mask is not None:
            self._masks.move_to_end(edit)
            return mask
        mask = torch.zeros(self.local_dim, dtype=torch.bool, device=self.router.masks.device)
        mask[self.local_columns(edit)] = True
        self._masks[edit] = mask
        if len(self._masks) * self.local_dim > self._mask_cache_bytes:
            self._masks.popitem(last=False)
        return mask

    def local_memory_columns(self, edit: int, memory: torch.Tensor) -> torch.Tensor:
        """memory[:, local_columns(edit)] (this rank's memory slice), cached per edit."""
        if memory is not self._gathered_of:
            self._gathered.clear()
            self._gathered_of, self._gathered_bytes = memory, 0
        gathered = self._gathered.get(edit)
        if gathered is not None:
            self._gathered.move_to_end(edit)
            return gathered
        gathered = memory.index_select(1, self.local_columns(edit))
        size = gathered.numel() * gathered.element_size()
        if size <= self._gathered_budget:
            self._gathered[edit] = gathered
            self._gathered_bytes += size
            while self._gathered_bytes > self._gathered_budget:
                _, old = self._gathered.popitem(last=False)
                self._gathered_bytes -= old.numel() * old.element_size()
        return gathered
