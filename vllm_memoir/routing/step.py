"""One forward's routing at the edited layer: decide new prompts, keep prompt sums, add the residual.

Runs inside the routing op (routing.op), after the base down_proj and before the
tensor-parallel all-reduce, in three parts:

1. **Decide** the rows still PENDING whose last prompt token is in this forward: their route
   feature from the summed down_proj inputs over the prompt, or over its routing span (the
   last user message), in this forward plus, when it reached the layer in parts, from
   earlier forwards or the prefix cache; TopHash, matched against the stored masks. All on
   the device: the route is written into the request buffers, for the host to read after
   the forward (requests.settle).
2. **Record** each KV block's input sum, which later forwards and requests sharing the
   block need (block_sums; and tails and heads for span routing, span_sums), when the
   engine may split prompts.
3. **Add** `W_m (m_t * x_t)` to the tokens, `m_t` the mask of its row's edit: one formula
   for prefill and decode, all-zero masks for rows without an edit, so unrouted tokens keep
   the base output bit for bit. Where the routed tokens are known without reading the
   device (the host's view in a decode step; any forward on the CPU) only they are computed.
   Decode steps are a pure tensor function of the buffers (`decode_step`, tested with
   torch.compile(fullgraph=True)).

The host only chooses what to run from what it knows before the forward (pending rows, any
routed row, whether sums are kept), and skips the step when there is nothing to do.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Protocol

import numpy as np
import torch

from vllm_memoir import metrics
from vllm_memoir.core import NO_ROUTE, dense_masked_residual
from vllm_memoir.routing import requests
from vllm_memoir.routing.block_sums import BlockSums
from vllm_memoir.routing.decisions import ShardedPromptRouter
from vllm_memoir.routing.device import capturing, reads_are_free
from vllm_memoir.routing.layout import HostLayout, TokenIndex, TokenLayout, current_layout
from vllm_memoir.routing.requests import PENDING, PendingReport, RequestRoutes
from vllm_memoir.routing.span_marks import SlotBlockMarks
from vllm_memoir.routing.span_sums import SpanBlockSums


class ServedEdits(Protocol):
    """What the routing step reads of the edited layer (routing.layer.MemoirDownProj)."""

    router: ShardedPromptRouter  # the served artifact's masks and routing settings
    memory: torch.Tensor  # this rank's slice of W_m
    edit_ids: list[int]  # by edit row
    tp_rank: int
    local_dim: int
    device: torch.device


logger = logging.getLogger(__name__)


def token_routes(slot_route: torch.Tensor, row_slots: torch.Tensor, tokens: TokenIndex) -> torch.Tensor:
    """[T] each token's edit row: its row's route (negative: none; padding tokens: none)."""
    row_route = slot_route.index_select(0, row_slots[: tokens.num_rows])
    if tokens.decode_only:
        return row_route
    return torch.where(tokens.valid, row_route.index_select(0, tokens.row), NO_ROUTE)


def add_residual(out: torch.Tensor, x: torch.Tensor, memory: torch.Tensor, router: ShardedPromptRouter,
                 routes: torch.Tensor) -> None:
    """Add each token's residual W_m (m_t * x_t), m_t the mask of its edit `routes[t]` (all
    zero without one, so such tokens keep the base output). Every token: fixed shapes."""
    out += dense_masked_residual(x, memory, router.row_masks(routes, x.dtype))


def add_picked_residual(out: torch.Tensor, x: torch.Tensor, memory: torch.Tensor, router: ShardedPromptRouter,
                        picked: torch.Tensor, picked_routes: torch.Tensor) -> None:
    """add_residual's formula on the tokens `picked` only, each with an edit `picked_routes`:
    the other tokens' residual is zero. For forwards where the routed tokens are known
    without waiting on the device (the host's view in a decode step; any forward on the CPU)."""
    masks = router.row_masks(picked_routes, x.dtype, all_routed=True)
    out.index_add_(0, picked, dense_masked_residual(x.index_select(0, picked), memory, masks))


def record_sums(x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex, row_slots: torch.Tensor,
                block_sums: BlockSums | None, span_sums: SpanBlockSums | None = None,
                block_marks: SlotBlockMarks | None = None) -> None:
    """Keep this forward's inputs per KV block: whole-block sums, and tails and heads when a
    span rule is served (or was: blocks computed since then must not keep stale offsets)."""
    if block_sums is None:
        return
    block, offset = block_sums.token_blocks(x, layout, tokens)
    block_sums.record_at(x, block, offset)
    if span_sums is not None:
        span_sums.record_at(x, block, offset, block_marks.of_tokens(tokens, row_slots), layout)


def decode_step(out: torch.Tensor, x: torch.Tensor, layout: TokenLayout, slot_route: torch.Tensor,
                row_slots: torch.Tensor, router: ShardedPromptRouter, memory: torch.Tensor,
                block_sums: BlockSums | None, routed_rows: torch.Tensor | None = None,
                span_sums: SpanBlockSums | None = None, block_marks: SlotBlockMarks | None = None) -> None:
    """A forward with no prompt to decide: record the block sums, add the residual.
    Fixed-shape tensor operations on persistent buffers only, so it can be captured (without
    routed_rows: the rows the host knows to be routed, run eagerly)."""
    tokens = layout.tokens_of(x.shape[0])
    record_sums(x, layout, tokens, row_slots, block_sums, span_sums, block_marks)
    if routed_rows is None:
        add_residual(out, x, memory, router, token_routes(slot_route, row_slots, tokens))
    elif routed_rows.numel():  # numel: a host-made index, no device read
        routes = slot_route.index_select(0, row_slots.index_select(0, routed_rows))
        add_picked_residual(out, x, memory, router, routed_rows, routes)


class RoutingStep:
    """The edited layer's per-forward routing; the served edits are the layer's."""

    def __init__(self, layer: ServedEdits, block_sums: BlockSums | None, block_size: int | None):
        self.layer = layer
        self.block_sums = block_sums  # None: the engine never splits prompts
        self.block_size = block_size
        # Span routing's partial sums at span boundaries, made when such an artifact is served
        # under prompt splitting (kept after: see record_sums).
        self.span_sums: SpanBlockSums | None = None
        self._block_layout_checked = False
        # Routing decisions of new requests since start-up, by edit id (counted on rank 0).
        self.route_counts: Counter[int] = Counter()
        self.unrouted_count = 0

    def serve_span_rule(self, whole_prompt: bool) -> None:
        if whole_prompt or self.block_sums is None or self.span_sums is not None:
            return
        self.span_sums = SpanBlockSums(self.block_sums)

    # --- the op -------------------------------------------------------------------------------

    def run(self, out: torch.Tensor, x: torch.Tensor) -> None:
        routes = requests.active()
        if routes is None:
            return
        self._report(routes)
        if routes.num_rows == 0:
            return  # profiling and warm-up runs carry no requests
        started = time.perf_counter()
        routes.publish_if_changed()
        host_routes = routes.host_row_routes().numpy()  # the host's view, before this forward: no device read
        pending = np.flatnonzero(host_routes == PENDING)
        routed = np.flatnonzero(host_routes >= 0)
        if not (pending.size or routed.size or self.block_sums is not None):
            return  # decode steps of unrouted requests with whole prompts: nothing to do
        layout = current_layout()
        if layout is None:
            return
        if layout.num_rows < routes.num_rows:
            raise RuntimeError(f"MEMOIR: the forward holds {layout.num_rows} requests but the tracker has "
                               f"{routes.num_rows}")
        if self.block_sums is not None and not self._block_layout_checked:
            self._check_block_layout(layout)
        tokens = layout.tokens_of(x.shape[0])
        marks = None
        if self.span_sums is not None:
            marks = routes.track_block_marks(self.block_size, layout.block_table.shape[1])
        if not pending.size and tokens.decode_only:
            picked = None if capturing(x) else torch.from_numpy(routed).to(x.device, non_blocking=True)
            decode_step(out, x, layout, routes.slot_route_dev, routes.row_slots_dev, self.layer.router,
                        self.layer.memory, self.block_sums, picked, self.span_sums, marks)
            self._finish(routes, layout, started)
            return
        if pending.size:
            self._decide(x, layout, tokens, routes, torch.from_numpy(pending))
        # After the decisions, which read the sums from before this forward.
        record_sums(x, layout, tokens, routes.row_slots_dev, self.block_sums, self.span_sums, marks)
        if pending.size or routed.size:
            token_route = token_routes(routes.slot_route_dev, routes.row_slots_dev, tokens)
            if reads_are_free(x):  # finding the routed tokens waits on nothing here
                picked = torch.nonzero(token_route >= 0).flatten()
                if picked.numel():
                    add_picked_residual(out, x, self.layer.memory, self.layer.router, picked,
                                        token_route.index_select(0, picked))
            else:  # on a GPU that would read the device's decisions back
                add_residual(out, x, self.layer.memory, self.layer.router, token_route)
        self._finish(routes, layout, started)

    def _finish(self, routes: RequestRoutes, layout: TokenLayout, started: float) -> None:
        if self.layer.tp_rank != 0:
            return
        if logger.isEnabledFor(logging.DEBUG):
            self._log_recomputes(routes, layout.host)
        metrics.count_routing_step(time.perf_counter() - started)

    # --- decisions: on the device -------------------------------------------------------------

    def _decide(self, x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex, routes: RequestRoutes,
                pending: torch.Tensor) -> None:
        """Route the pending rows whose last prompt token is in this forward, on the device."""
        device = x.device
        rows = pending.to(device, non_blocking=True)
        slots = routes.row_slots_dev.index_select(0, rows)
        prompt_len = routes.slot_prompt_len_dev.index_select(0, slots)
        first = layout.row_first_position.index_select(0, rows)
        last_offset = prompt_len - 1 - first  # the last prompt token, counted from the row's first here
        deciding = (prompt_len > 0) & (last_offset >= 0) & (last_offset < layout.row_tokens.index_select(0, rows))
        last_token = (layout.query_start.long().index_select(0, rows) + last_offset.clamp(min=0))
        last_token = last_token.clamp(max=x.shape[0] - 1)
        span_start, span_end = (routes.slot_span_dev[i].index_select(0, slots) for i in range(2))
        sums, approximate = self._span_sums(x, layout, tokens, routes, rows, first, span_start, span_end)
        features = self.layer.router.features_from_sums(sums, x.index_select(0, last_token), span_end - span_start)
        route, best, overlap = self.layer.router.decide_tensors(features)
        route = route.to(device)
        # A forward that starts after the prompt's end: a resumed request whose decision left the cache.
        lost = (prompt_len > 0) & (last_offset < 0)
        partial = deciding & (first > 0) if self.block_sums is None else torch.zeros_like(deciding)
        pending_value = torch.full_like(route, PENDING)
        new_route = torch.where(deciding, route, torch.where(lost, torch.full_like(route, NO_ROUTE), pending_value))
        routes.slot_route_dev.index_copy_(0, slots, new_route)
        routes.defer(PendingReport(routes.slots_of_rows(pending), deciding, route, best, overlap, lost, partial, first,
                                   approximate, span_start, span_end))

    def _span_sums(self, x: torch.Tensor, layout: TokenLayout, tokens: TokenIndex, routes: RequestRoutes,
                   rows: torch.Tensor, first: torch.Tensor, span_start: torch.Tensor,
                   span_end: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[P, D] float32: each of `rows`' summed input over its routing span (prompt positions
        [span_start, span_end); the whole prompt unless the artifact routes on the last user
        message): this forward's span tokens (never the generated tokens a recomputed request
        carries), plus the blocks its earlier positions went to; and [P] bool, where the
        earlier part is approximate (span_sums)."""
        num_rows = tokens.num_rows
        token_slot = routes.row_slots_dev.index_select(0, tokens.row)
        token_start, token_end = (routes.slot_span_dev[i].index_select(0, token_slot) for i in range(2))
        in_span = tokens.valid & (tokens.position >= token_start) & (tokens.position < token_end)
        target = torch.where(in_span, tokens.row, num_rows)  # row num_rows: the rest
        here = torch.zeros(num_rows + 1, x.shape[1], dtype=torch.float32, device=x.device)
        sums = here.index_add_(0, target, x.float()).index_select(0, rows)
        approximate = torch.zeros_like(first, dtype=torch.bool)
        if self.block_sums is None or (reads_are_free(x) and not bool((first > 0).any())):
            return sums, approximate  # no row has positions before this forward
        if self.span_sums is None:  # whole prompts: every block before this forward
            return sums + self.block_sums.sum_before(layout, rows, first), approximate
        earlier, approximate = self.span_sums.sum_between(layout, rows, span_start, torch.minimum(span_end, first),
                                                          first)
        return sums + earlier, approximate

    # --- checks, reports, logs ----------------------------------------------------------------

    def _check_block_layout(self, layout: TokenLayout) -> None:
        """Once: the KV slots of row 0's first token agree with its block table at our block size."""
        if layout.slot_mapping is None or layout.block_table is None:
            raise RuntimeError("MEMOIR: this attention backend's metadata has no slot_mapping/block_table, "
                               "which routing needs under prefix caching or chunked prefill")
        host = layout.host
        start, _ = host.tokens(0)
        position = host.first_position(0)
        size = self.block_size
        slot = int(layout.slot_mapping[start])
        if slot < 0:
            return  # a padding row; check on a later forward
        expected = int(layout.block_table[0, position // size]) * size + position % size
        if slot != expected:
            raise RuntimeError(f"MEMOIR: KV slot {slot} of position {position} disagrees with block size {size} "
                               f"(expected slot {expected}); the attention backend uses another block layout")
        self._block_layout_checked = True

    def _report(self, routes: RequestRoutes) -> None:
        decisions = routes.take_new_decisions()
        approximate, routes.approximate_features = routes.approximate_features, 0
        if self.layer.tp_rank != 0:
            return
        for _ in range(approximate):
            metrics.count_inexact_span_feature()
            logger.warning(
                "MEMOIR: approximate route feature: the last user message starts or ends inside a KV block that "
                "reached the edited layer before this forward without partial sums for that boundary (computed while "
                "another artifact was served, or holding generated tokens); the whole block was used (counted in "
                "memoir:inexact_span_features_total)")
        edit_ids = self.layer.edit_ids
        for decision, prompt_len in decisions:
            metrics.count_decision(decision.routed)
            if decision.routed:
                self.route_counts[edit_ids[decision.route]] += 1
                logger.debug("MEMOIR route: edit_id=%s (row %d) overlap=%.3f prompt_tokens=%d",
                             edit_ids[decision.route], decision.route, decision.overlap, prompt_len)
            else:
                self.unrouted_count += 1
                logger.debug("MEMOIR no route: best overlap=%.3f prompt_tokens=%d", decision.overlap, prompt_len)

    @staticmethod
    def _log_recomputes(routes: RequestRoutes, host: HostLayout) -> None:
        """Requests recomputed from position 0 with generated tokens: preempted ones, coming back."""
        for row, route in enumerate(routes.host_row_routes().tolist()):
            start, end = host.tokens(row)
            prompt_len = routes.row_prompt_len(row)
            if host.first_position(row) == 0 and end - start > prompt_len:
                logger.debug("MEMOIR: preempted request recomputed (%d prompt + %d generated tokens), route %d kept",
                             prompt_len, end - start - prompt_len, route)
