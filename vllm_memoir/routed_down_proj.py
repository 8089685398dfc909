"""The edited layer's down_proj: the base projection plus the routed residual memory.

out = W0 x + W_m (m * x), where m is the mask of the edit the request was routed to, and
nothing is added (bit-identical base output) for requests that matched no edit. The base
weight loads from the checkpoint unchanged; the memory sits beside it as a buffer.

A request's route feature averages the inputs of its routing span: the whole prompt, or the
last user message when the artifact says so (request_routes finds the span on the host).
"""

from __future__ import annotations

import atexit
import gc
import logging
import time
from collections import Counter
from dataclasses import dataclass

import torch

from vllm.distributed import get_tp_group, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import RowParallelLinear

from vllm_memoir import metrics, request_routes, routing_op
from vllm_memoir.block_feature_sums import BlockFeatureSums
from vllm_memoir.core import (NO_ROUTE, ArtifactManifest, EditRecord, MemoirArtifact, dense_masked_residual,
                               gathered_residual)
from vllm_memoir.core.routing import RouteDecision
from vllm_memoir.prompt_router import ShardedPromptRouter
from vllm_memoir.request_routes import PENDING, RequestRoutes
from vllm_memoir.routing_op import TokenLayout
from vllm_memoir.span_block_sums import SpanBlockSums

logger = logging.getLogger(__name__)
# serve() freezes the heap; thaw it at exit so interpreter shutdown still collects it.
atexit.register(gc.unfreeze)


@dataclass
class StagedEdits:
    """One artifact version prepared for this rank (memory slice, router), not yet served."""

    manifest: ArtifactManifest
    records: list[EditRecord]
    memory: torch.Tensor
    router: ShardedPromptRouter
    edit_ids: list[int]  # by row
    rows: dict[int, int]  # edit id -> row (built here, off the swap's pause)


class MemoirDownProj(RowParallelLinear):
    """RowParallelLinear with this rank's slice of W_m, routed per request by a custom op."""

    @classmethod
    def replacing(cls, base: RowParallelLinear, artifact: MemoirArtifact) -> "MemoirDownProj":
        """A MemoirDownProj built with `base`'s settings (its weights are loaded afterwards)."""
        if base.quant_config is not None:
            raise ValueError("MEMOIR does not support a quantized edited layer")
        return cls(
            input_size=base.input_size,
            output_size=base.output_size,
            bias=base.bias is not None,
            input_is_parallel=base.input_is_parallel,
            skip_bias_add=base.skip_bias_add,
            params_dtype=base.params_dtype,
            reduce_results=base.reduce_results,
            quant_config=None,
            prefix=base.prefix,
            return_bias=base.return_bias,
            disable_tp=base.disable_tp,
            artifact=artifact,
        )

    def __init__(self, *args, artifact: MemoirArtifact, **kwargs):
        super().__init__(*args, **kwargs)
        if not self.input_is_parallel:
            raise ValueError("MEMOIR expects the down_proj input to be tensor-parallel already")
        self.register_buffer("memory", torch.empty(0), persistent=False)
        # Per-KV-block input sums, for prompts that reach this layer in parts (chunked
        # prefill) or partly from the prefix cache; None when the engine does neither.
        self.block_sums = _block_sums_for_engine(self.input_size_per_partition, self.weight.device)
        # Partial block sums at routing-span boundaries; made when an artifact that routes on
        # part of the prompt is served with block sums on.
        self.span_sums: SpanBlockSums | None = None
        self._block_layout_checked = False
        # Routing decisions of new requests since start-up, by edit id (counted on rank 0).
        self.route_counts: Counter[int] = Counter()
        self.unrouted_count = 0
        self.serve(self.stage(artifact))
        self.layer_name = self.prefix
        routing_op.register_layer(self.layer_name, self)

    # --- the served edits (start-up and live swaps) -------------------------------------------

    def stage(self, artifact: MemoirArtifact) -> StagedEdits:
        """This rank's share of `artifact`, built beside the served one (serving is untouched)."""
        local = self.input_size_per_partition
        start = self.tp_rank * local
        memory = artifact.memory[:, start:start + local].to(self.weight.device, self.params_dtype).contiguous()
        all_gather = (lambda t: get_tp_group().all_gather(t, dim=-1)) if self.tp_size > 1 else None
        router = ShardedPromptRouter(artifact, self.tp_rank, self.tp_size, self.weight.device, all_gather)
        edit_ids = [e.edit_id for e in artifact.edits]
        rows = {edit_id: row for row, edit_id in enumerate(edit_ids)}
        return StagedEdits(artifact.manifest, list(artifact.edits), memory, router, edit_ids, rows)

    def serve(self, staged: StagedEdits) -> None:
        """Serve `staged` from the next forward on (called between engine steps)."""
        self.memory = staged.memory
        self.router = staged.router
        self.manifest = staged.manifest
        self.records = staged.records
        self.edit_ids = staged.edit_ids
        self.edit_rows = staged.rows
        span = staged.manifest.route_span()
        request_routes.serve_route_span(span)
        if not span.whole_prompt and self.block_sums is not None and self.span_sums is None:
            self.span_sums = SpanBlockSums(self.block_sums.block_size, self.input_size_per_partition, self.weight.device)
        # The served edits' Python objects (an EditRecord per edit: 200k+ objects at 100k
        # edits) live as long as they are served; left to the collector, every full garbage
        # collection walks them (tens of ms, stalls that profiled as a 0.7x throughput at
        # 100k edits). Freezing moves them out of its reach, as vLLM's engine core does.
        gc.freeze()

    def set_enabled(self, row: int, enabled: bool) -> None:
        """Let edit row `row` match prompts again, or stop it from matching any."""
        self.router.router.enabled[row] = enabled
        self.records[row].enabled = enabled

    def forward(self, input_):
        # RowParallelLinear.forward with the routed residual added to this rank's partial
        # output before the all-reduce, so routing adds no collective on decode steps.
        bias = None if (self.tp_rank > 0 or self.skip_bias_add) else self.bias
        output = self.quant_method.apply(self, input_, bias)
        torch.ops.memoir.add_routed_residual_(output, input_, self.layer_name)
        if self.reduce_results and self.tp_size > 1:
            output = tensor_model_parallel_all_reduce(output)
        if not self.return_bias:
            return output
        return output, (self.bias if self.skip_bias_add else None)

    # --- the routing step (runs inside the custom op) -----------------------------------------

    def add_routed_residual(self, out: torch.Tensor, x: torch.Tensor) -> None:
        routes = request_routes.active()
        if routes is None or routes.num_rows == 0:
            return  # profiling and warm-up runs carry no requests
        started = time.perf_counter()
        self._route_and_add(out, x, routes)
        if self.tp_rank == 0:
            metrics.count_routing_step(time.perf_counter() - started)

    def _route_and_add(self, out: torch.Tensor, x: torch.Tensor, routes: RequestRoutes) -> None:
        row_routes = routes.row_routes()
        pending = [row for row, route in enumerate(row_routes) if route == PENDING]
        debug = self.tp_rank == 0 and logger.isEnabledFor(logging.DEBUG)
        tracking = self.block_sums is not None
        if not (pending or routes.new_decisions or debug or tracking) and all(route == NO_ROUTE for route in row_routes):
            return  # the common decode step of unrouted requests: nothing to read or add
        layout = routing_op.current_layout()
        if layout is None:
            return
        if layout.num_rows < routes.num_rows:
            raise RuntimeError(
                f"MEMOIR: the forward holds {layout.num_rows} requests but the tracker has {routes.num_rows}"
            )
        if pending:
            self._decide(pending, x, layout, routes, row_routes)
        if tracking:
            # After the decisions: they read the sums of earlier tokens only.
            self._record_block_sums(x, layout)
        if routes.new_decisions:
            self._report(routes)
        if debug:
            self._log_recomputes(routes, row_routes, layout)
        by_edit: dict[int, list[int]] = {}
        for row, route in enumerate(row_routes):
            if route >= 0:  # not NO_ROUTE, nor PENDING (a prompt whose last token is still to come)
                by_edit.setdefault(route, []).append(row)
        if len(by_edit) >= DENSE_MIN_EDITS:
            self._add_residuals_dense(out, x, by_edit, layout)
            return
        for edit, rows in by_edit.items():
            self._add_edit_residual(out, x, edit, rows, layout)

    def _decide(self, pending: list[int], x: torch.Tensor, layout: TokenLayout, routes: RequestRoutes,
                row_routes: list[int]) -> None:
        """Route each pending row whose prompt's last token is in this forward.

        Its earlier prompt tokens are in this forward too, or (chunked prefill, prefix
        caching) summed per KV block when they reached this layer before.
        """
        deciding, features, earlier_rows, earlier_positions = [], [], [], []
        for row in pending:
            start, end = layout.tokens(row)
            first = layout.first_position(row)
            prompt_len = routes.row_prompt_len(row)
            if self.block_sums is None and (first > 0 or first + (end - start) < prompt_len):
                # The start-up checks turn prompt splitting on only with block sums; a part of
                # a prompt here would be routed on what it holds, silently wrong.
                raise RuntimeError(
                    f"MEMOIR: a request's prefill holds positions {first}..{first + end - start - 1} of a "
                    f"{prompt_len}-token prompt; routing needs whole prompts unless the edit sits at the last layer "
                    "(is prefix caching or chunked prefill on?)"
                )
            if first + (end - start) < prompt_len:
                continue  # a chunk of a longer prompt: decided with its last chunk
            if first >= prompt_len:
                # Only a request resumed after preemption whose decision left the cache
                # (2**18 newer prompts): its prompt's inputs were never summed here.
                logger.error("MEMOIR: a request's prompt (%d tokens) starts at position %d in this forward and "
                             "its route is unknown; serving it unrouted", prompt_len, first)
                routes.record(row, RouteDecision(NO_ROUTE, NO_ROUTE, 0.0))
                row_routes[row] = NO_ROUTE
                continue
            deciding.append(row)
            if first > 0:
                earlier_rows.append(row)
                earlier_positions.append(first)
                if self.tp_rank == 0:
                    logger.debug("MEMOIR: route of a prompt seen in parts: %d of its %d tokens reached the layer "
                                 "earlier (chunked prefill or prefix cache)", first, prompt_len)
        if not deciding:
            return
        spans = {row: routes.row_span(row) for row in deciding}
        # Rows routed on their whole prompt take the earlier tokens' sum in one batched read.
        whole = [i for i, row in enumerate(earlier_rows) if spans[row] == (0, routes.row_prompt_len(row))]
        earlier: dict[int, torch.Tensor] = {}
        if whole:
            rows = [earlier_rows[i] for i in whole]
            tables = layout.block_table[torch.tensor(rows, device=layout.block_table.device)]
            earlier = dict(zip(rows, self.block_sums.prefix_sums(tables, [earlier_positions[i] for i in whole])))
        for row in deciding:
            start, _ = layout.tokens(row)
            first = layout.first_position(row)
            span_start, span_end = spans[row]
            if spans[row] != (0, routes.row_prompt_len(row)):
                features.append(self._span_feature(row, x, layout, span_start, span_end, routes.row_prompt_len(row)))
                continue
            rest = routes.row_prompt_len(row) - first
            if row in earlier:
                features.append(self.router.prompt_feature_from_parts(earlier[row], x[start:start + rest],
                                                                      routes.row_prompt_len(row)))
            else:
                features.append(self.router.prompt_feature(x[start:start + rest]))
        decisions = self.router.decide(torch.stack(features))
        for row, decision in zip(deciding, decisions):
            routes.record(row, decision)
            row_routes[row] = decision.route

    def _span_feature(self, row: int, x: torch.Tensor, layout: TokenLayout, span_start: int, span_end: int,
                      prompt_len: int) -> torch.Tensor:
        """The feature over prompt positions [span_start, span_end) of a row whose last prompt
        token is in this forward: the span's tokens here, plus (chunked prefill, prefix cache)
        the sums of its tokens that reached the layer before."""
        start, _ = layout.tokens(row)
        first = layout.first_position(row)
        here = x[start + max(span_start - first, 0): start + max(span_end - first, 0)]
        if span_start >= first:
            return self.router.prompt_feature(here)
        earlier, exact = self.span_sums.span_sum(self.block_sums, layout.block_table[row], span_start,
                                                 min(span_end, first), first)
        if self.tp_rank == 0 and logger.isEnabledFor(logging.DEBUG):
            size = self.block_sums.block_size
            logger.debug("MEMOIR: last user message at prompt positions %d-%d of %d: %d of its tokens reached the "
                         "layer earlier; it starts %s and ends %s (%s)", span_start, span_end, prompt_len,
                         min(span_end, first) - span_start, "mid-block" if span_start % size else "at a block start",
                         "in this forward" if span_end > first else "earlier", "exact" if exact else "approximate")
        if not exact and self.tp_rank == 0:
            metrics.count_inexact_span_feature()
            logger.warning(
                "MEMOIR: approximate route feature: the last user message (prompt positions %d-%d of %d) starts or "
                "ends inside a KV block that reached the edited layer before this forward without sums for that "
                "boundary (computed while another artifact was served, or holding generated tokens); the whole "
                "block was used (counted in memoir:inexact_span_features_total)", span_start, span_end, prompt_len)
        return self.router.prompt_feature_from_parts(earlier, here, span_end - span_start)

    def _record_block_sums(self, x: torch.Tensor, layout: TokenLayout) -> None:
        if layout.slot_mapping is None or layout.block_table is None:
            raise RuntimeError("MEMOIR: this attention backend's metadata has no slot_mapping/block_table, "
                               "which routing needs under prefix caching or chunked prefill")
        num_tokens = layout.num_tokens
        if not self._block_layout_checked and num_tokens:
            self._check_block_layout(layout)
        self.block_sums.record(x[:num_tokens], layout.slot_mapping[:num_tokens])
        if self.span_sums is not None:
            routes = request_routes.active()
            spans = [layout.tokens(row) for row in range(layout.num_rows)]
            rows = [(start, end - start, layout.first_position(row),
                     routes.row_boundaries(row) if row < routes.num_rows else None)
                    for row, (start, end) in enumerate(spans)]
            self.span_sums.record(x[:num_tokens], layout.slot_mapping[:num_tokens], rows)

    def _check_block_layout(self, layout: TokenLayout) -> None:
        """Once: the KV slots of row 0's first token agree with its block table at our block size."""
        start, _ = layout.tokens(0)
        position = layout.first_position(0)
        size = self.block_sums.block_size
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
        if self.tp_rank != 0:
            return
        for decision, prompt_len in decisions:
            metrics.count_decision(decision.routed)
            if decision.routed:
                self.route_counts[self.edit_ids[decision.route]] += 1
                logger.debug("MEMOIR route: edit_id=%s (row %d) overlap=%.3f prompt_tokens=%d",
                             self.edit_ids[decision.route], decision.route, decision.overlap, prompt_len)
            else:
                self.unrouted_count += 1
                logger.debug("MEMOIR no route: best overlap=%.3f prompt_tokens=%d", decision.overlap, prompt_len)

    @staticmethod
    def _log_recomputes(routes: RequestRoutes, row_routes: list[int], layout: TokenLayout) -> None:
        """Requests recomputed from position 0 with generated tokens: preempted ones, coming back."""
        for row, route in enumerate(row_routes):
            start, end = layout.tokens(row)
            prompt_len = routes.row_prompt_len(row)
            if layout.first_position(row) == 0 and end - start > prompt_len:
                logger.debug("MEMOIR: preempted request recomputed (%d prompt + %d generated tokens), route %d kept",
                             prompt_len, end - start - prompt_len, route)

    def _add_edit_residual(self, out: torch.Tensor, x: torch.Tensor, edit: int, rows: list[int],
                           layout: TokenLayout) -> None:
        columns = self.router.local_columns(edit)
        if columns.numel() == 0:
            return  # none of this edit's columns live on this rank
        memory_columns = self.router.local_memory_columns(edit, self.memory)  # gathered once per edit
        spans = [layout.tokens(row) for row in rows]
        if len(spans) == 1:
            start, end = spans[0]
            out[start:end] += gathered_residual(x[start:end], memory_columns, columns)
            return
        tokens = torch.tensor([t for start, end in spans for t in range(start, end)], dtype=torch.int64, device=x.device)
        out.index_add_(0, tokens, gathered_residual(x.index_select(0, tokens), memory_columns, columns))

    def _add_residuals_dense(self, out: torch.Tensor, x: torch.Tensor, by_edit: dict[int, list[int]],
                             layout: TokenLayout) -> None:
        """Every routed token's residual in one matmul: each token's input masked by its edit's mask."""
        tokens: list[int] = []
        masks: list[torch.Tensor] = []
        for edit, rows in by_edit.items():
            mask = self.router.local_mask(edit)
            for row in rows:
                start, end = layout.tokens(row)
                tokens.extend(range(start, end))
                masks.append(mask.expand(end - start, -1))
        index = torch.tensor(tokens, dtype=torch.int64, device=x.device)
        out.index_add_(0, index, dense_masked_residual(x.index_select(0, index), self.memory, torch.cat(masks)))


# From this many distinct edits in one forward, one dense matmul over the routed tokens beats
# a gather-and-matmul per edit (a few small operations, ~17 us, each; kernel launches on GPU).
# Measured on CPU at the facts model's shape (intermediate 1024, top_k 384, 14 routed of 32
# decode rows): per edit 66 us at 2 edits, 139 us at 8, 366 us at 32; dense 100-165 us.
DENSE_MIN_EDITS = 5


def _block_sums_for_engine(local_dim: int, device: torch.device) -> BlockFeatureSums | None:
    """Block sums when the engine may show a prompt to the layer in parts, else None."""
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    if not (config.cache_config.enable_prefix_caching or config.scheduler_config.enable_chunked_prefill):
        return None
    return BlockFeatureSums(config.cache_config.block_size, local_dim, device)


def install_memoir_down_proj(model: torch.nn.Module, layer_index: int, artifact: MemoirArtifact) -> MemoirDownProj | None:
    """Swap layer `layer_index`'s mlp.down_proj of a vLLM decoder stack for a MemoirDownProj.

    Returns None when the layer is not on this pipeline rank (PPMissingLayer).
    """
    layer = model.layers[layer_index]
    mlp = getattr(layer, "mlp", None)
    base = getattr(mlp, "down_proj", None)
    if base is None:
        return None
    if not isinstance(base, RowParallelLinear):
        raise ValueError(f"layer {layer_index}'s mlp.down_proj is a {type(base).__name__}, expected RowParallelLinear")
    mlp.down_proj = MemoirDownProj.replacing(base, artifact)
    logger.info("MEMOIR: layer %d down_proj carries %d edits (top_k=%d, threshold=%.2f, aggregation=%s)",
                layer_index, artifact.manifest.num_edits, artifact.manifest.top_k,
                artifact.manifest.irr_threshold, artifact.manifest.aggregation)
    return mlp.down_proj
