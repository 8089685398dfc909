"""Prompt features -> routing decisions on one tensor-parallel rank.

Each rank holds a contiguous 1/tp slice of the intermediate dimension (like the
RowParallelLinear down_proj), so it sees only its slice of the prompt feature. TopHash
needs the global top-k of |feature|: every rank takes its local top-k candidates, all ranks
all-gather them, and the union's top-k is the global top-k -- identical on every rank, and
only computed on steps where a prompt is prefilled. The stored masks are global bitsets,
replicated on every rank, so matching is exactly the single-device computation.
"""

from __future__ import annotations

from typing import Callable

import torch

from vllm_memoir.core import MemoirArtifact, aggregate_prompt_feature, finish_feature, remove_background_components
from vllm_memoir.core.tophash import unpack_as
from vllm_memoir.core.routing import EditRouter, RouteDecision, as_decisions

AllGather = Callable[[torch.Tensor], torch.Tensor]  # concatenates ranks' tensors along the last dim


class ShardedPromptRouter:
    def __init__(self, artifact: MemoirArtifact, tp_rank: int, tp_size: int, device: torch.device,
                 all_gather: AllGather | None = None):
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
        basis = self.router.background_basis
        self.local_basis = None if basis is None else basis[:, self.offset:self.offset + self.local_dim].contiguous()
        self.all_gather = all_gather
        self._byte_aligned = self.offset % 8 == 0 and self.local_dim % 8 == 0

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

    def features_from_sums(self, sums: torch.Tensor, last_inputs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """[P, D_local] features of P prompts from their summed inputs `sums`, their last prompt
        token's input `last_inputs` (aggregation "last") and token counts `counts` [P]."""
        if self.aggregation == "last":
            return last_inputs.float()
        return finish_feature(sums, counts.clamp(min=1), self.aggregation, self.local_background)

    def decide(self, local_features: torch.Tensor) -> list[RouteDecision]:
        """[B, D_local] feature slices -> one decision per prompt (the same on every rank)."""
        return as_decisions(*self.decide_tensors(local_features))

    def decide_tensors(self, local_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """decide() kept on the device: (route, best edit, overlap), [B] each."""
        return self.router.match_keys(self._global_keys(local_features))

    def row_masks(self, routes: torch.Tensor, dtype: torch.dtype, all_routed: bool = False) -> torch.Tensor:
        """[R] edit rows (negative: no edit) -> [R, D_local] 0/1 masks of this rank's columns.

        A pure tensor function of the stored masks: rows without an edit get an all-zero mask
        (`all_routed`: the caller knows every row has one, and skips that step).
        """
        packed = self.router.masks.index_select(0, routes if all_routed else routes.clamp(min=0))  # [R, W] uint8
        if self._byte_aligned:
            packed = packed[:, self.offset // 8:(self.offset + self.local_dim) // 8]
        bits = unpack_as(packed, dtype)
        local = bits if self._byte_aligned else bits[:, self.offset:self.offset + self.local_dim]
        return local if all_routed else local * (routes >= 0).unsqueeze(1).to(dtype)

    def _sum_over_ranks(self, part: torch.Tensor) -> torch.Tensor:
        """[B, r] this rank's share of each coefficient -> the sums over all ranks."""
        gathered = self.all_gather(part.contiguous())  # [B, r * tp]
        return gathered.view(part.shape[0], self.tp_size, -1).sum(dim=1)

    def _global_keys(self, local_features: torch.Tensor) -> torch.Tensor:
        # This rank's slice of the routing key (features are float32 from finish_feature).
        local = remove_background_components(local_features, self.local_basis,
                                             self._sum_over_ranks if self.tp_size > 1 else None)
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


class MaskTables:
    """The served edits' packed masks and enabled flags, in tables allocated with spare rows
    and kept across live swaps: a swap copies the new edits in (the routers it serves read
    views of the tables), so what reads them keeps its addresses, as CUDA graphs need.
    Only a swap to more edits than the tables hold allocates them anew, with room to grow."""

    SPARE = 0.25  # room for appended edits, as a share of the edits served
    MIN_ROWS = 1024

    def __init__(self, device: torch.device):
        self.device = device
        self.masks: torch.Tensor | None = None
        self.enabled: torch.Tensor | None = None

    def adopt(self, router: ShardedPromptRouter) -> ShardedPromptRouter:
        """Copy `router`'s masks and flags into the tables and point it at them; returns it."""
        edits = router.router
        count, width = edits.masks.shape
        if self.masks is None or count > self.masks.shape[0] or width != self.masks.shape[1]:
            rows = max(count + int(count * self.SPARE), self.MIN_ROWS)
            self.masks = torch.zeros(rows, width, dtype=edits.masks.dtype, device=self.device)
            self.enabled = torch.zeros(rows, dtype=torch.bool, device=self.device)
        self.masks[:count].copy_(edits.masks)
        self.enabled[:count].copy_(edits.enabled)
        edits.masks, edits.enabled = self.masks[:count], self.enabled[:count]
        return router
