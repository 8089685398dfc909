"""The edited layer's down_proj: vLLM's loaded projection, wrapped, plus the routed residual memory.

out = W0 x + W_m (m * x), where m is the mask of the edit the request was routed to, and
nothing is added (bit-identical base output) for requests that matched no edit. Like vLLM's
LoRA layers (BaseLinearLayerWithLoRA), this wraps the base layer instead of re-creating it:
the base RowParallelLinear keeps its weights, kernel and tensor-parallel settings, and its
checkpoint names gain a `base_layer.` segment (models.py maps them while loading). The
memory and the served edits sit beside it; routing.step does the per-forward work.
"""

from __future__ import annotations

import atexit
import gc
import logging
from collections import Counter
from dataclasses import dataclass

import torch

from vllm.distributed import get_tp_group, tensor_model_parallel_all_reduce
from vllm.model_executor.layers.linear import RowParallelLinear

from vllm_memoir.core import ArtifactManifest, MemoirArtifact
from vllm_memoir.core.edit_records import EditIdsByRow, EditRecords, EditRowsById
from vllm_memoir.routing import op, requests
from vllm_memoir.routing.decisions import MaskTables, ShardedPromptRouter
from vllm_memoir.routing.block_sums import BlockSums
from vllm_memoir.routing.step import RoutingStep

logger = logging.getLogger(__name__)
# serve() freezes the heap; thaw it at exit so interpreter shutdown still collects it.
atexit.register(gc.unfreeze)


@dataclass
class StagedEdits:
    """One artifact version prepared for this rank (memory slice, router), not yet served."""

    manifest: ArtifactManifest
    records: EditRecords  # columnar: ids and flags as arrays, each record parsed when read
    memory: torch.Tensor
    router: ShardedPromptRouter
    edit_ids: EditIdsByRow  # by row
    rows: EditRowsById  # edit id -> row (its lookup prepared here, off the swap's pause)


class MemoirDownProj(torch.nn.Module):
    """A loaded RowParallelLinear down_proj with this rank's slice of W_m, routed per request."""

    def __init__(self, base_layer: RowParallelLinear, artifact: MemoirArtifact):
        super().__init__()
        if base_layer.quant_config is not None:
            raise ValueError("MEMOIR does not support a quantized edited layer")
        if not base_layer.input_is_parallel:
            raise ValueError("MEMOIR expects the down_proj input to be tensor-parallel already")
        self.base_layer = base_layer
        self.layer_name = base_layer.prefix
        # Allocated once; a live swap copies the new memory in (same shape: it is W0's). Kept
        # column-major, [D_local, H], so the residual's product reads it row by row (`memory` is
        # the [H, D_local] view): its product ran 13-17% faster here for 8-32 routed rows.
        self.register_buffer("memory_by_column", torch.zeros(self.local_dim, base_layer.output_size,
                                                             dtype=base_layer.params_dtype, device=self.device),
                             persistent=False)
        # Read on every forward: a plain attribute, not a lookup through Module.__getattr__.
        self._memory = self.memory_by_column.t()
        self.step = RoutingStep(self, *_block_sums_for_engine(self.local_dim, self.device))
        self.mask_tables = MaskTables(self.device)
        self.serve(self.stage(artifact))
        op.register_layer(self.layer_name, self)

    @property
    def tp_rank(self) -> int:
        return self.base_layer.tp_rank

    @property
    def tp_size(self) -> int:
        return self.base_layer.tp_size

    @property
    def local_dim(self) -> int:
        return self.base_layer.input_size_per_partition

    @property
    def device(self) -> torch.device:
        return self.base_layer.weight.device

    @property
    def memory(self) -> torch.Tensor:
        """[H, D_local] this rank's slice of W_m (a view of the column-major buffer)."""
        return self._memory

    @property
    def route_counts(self) -> Counter[int]:
        """Routing decisions of new requests since start-up, by edit id (counted on rank 0)."""
        return self.step.route_counts

    @property
    def unrouted_count(self) -> int:
        return self.step.unrouted_count

    # --- the served edits (start-up and live swaps) -------------------------------------------

    def stage(self, artifact: MemoirArtifact) -> StagedEdits:
        """This rank's share of `artifact`, built beside the served one (serving is untouched)."""
        start = self.tp_rank * self.local_dim
        memory = artifact.memory[:, start:start + self.local_dim].to(self.device, self.base_layer.params_dtype)
        all_gather = (lambda t: get_tp_group().all_gather(t, dim=-1)) if self.tp_size > 1 else None
        router = ShardedPromptRouter(artifact, self.tp_rank, self.tp_size, self.device, all_gather)
        records = EditRecords.of(artifact.edits)
        return StagedEdits(artifact.manifest, records, memory.contiguous(), router, records.ids_by_row(),
                           records.rows_by_id())

    def serve(self, staged: StagedEdits) -> None:
        """Serve `staged` from the next forward on (called between engine steps)."""
        self.memory.copy_(staged.memory)
        self.router = self.mask_tables.adopt(staged.router)
        self.manifest = staged.manifest
        self.records = staged.records
        self.edit_ids = staged.edit_ids
        self.edit_rows = staged.rows
        span = staged.manifest.route_span()
        requests.serve_route_span(span)
        self.step.serve_span_rule(span.whole_prompt)
        # What a swap leaves behind lives as long as it is served; freezing moves it out of
        # the collector's reach, as vLLM's engine core does with its own start-up objects.
        # (The records are columnar arrays now; when they were an EditRecord per edit, full
        # collections walking them profiled as a 0.7x throughput at 100k edits.)
        gc.freeze()

    def relabel(self, manifest: ArtifactManifest) -> None:
        """Serve the same rows under `manifest`: a version that changed only the records' enabled
        flags (a persisted disable/enable; live_edits checks that before calling this)."""
        self.manifest = manifest

    def set_enabled(self, row: int, enabled: bool) -> None:
        """Let edit row `row` match prompts again, or stop it from matching any."""
        self.router.router.enabled[row] = enabled
        self.records.set_enabled(row, enabled)

    # --- the forward --------------------------------------------------------------------------

    def forward(self, input_):
        # RowParallelLinear.forward with the routed residual added to this rank's partial
        # output before the all-reduce, so routing adds no collective on decode steps.
        base = self.base_layer
        bias = None if (base.tp_rank > 0 or base.skip_bias_add) else base.bias
        output = base.quant_method.apply(base, input_, bias)
        torch.ops.memoir.add_routed_residual_(output, input_, self.layer_name)
        if base.reduce_results and base.tp_size > 1:
            output = tensor_model_parallel_all_reduce(output)
        if not base.return_bias:
            return output
        return output, (base.bias if base.skip_bias_add else None)

    def add_routed_residual(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """The routing op's body (routing.op)."""
        self.step.run(out, x)


def _block_sums_for_engine(local_dim: int, device: torch.device) -> tuple[BlockSums | None, int]:
    """Per-block input sums when the engine may show a prompt to the layer in parts, else None; and the block size."""
    from vllm.config import get_current_vllm_config

    config = get_current_vllm_config()
    cache = config.cache_config
    block_size = cache.block_size
    if not (cache.enable_prefix_caching or config.scheduler_config.enable_chunked_prefill):
        return None, block_size
    # The KV cache's block count is known once the engine has sized it (before any request).
    return BlockSums(block_size, local_dim, device, num_blocks=lambda: cache.num_gpu_blocks), block_size


def base_layer_weight_name(name: str, layer_index: int) -> str:
    """A checkpoint weight name as the wrapped model names it (`down_proj.` -> `down_proj.base_layer.`)."""
    marker = f"layers.{layer_index}.mlp.down_proj."
    at = name.find(marker)
    if at < 0 or (at > 0 and name[at - 1] != "."):
        return name
    head = at + len(marker)
    return name[:head] + "base_layer." + name[head:]


def install_memoir_down_proj(model: torch.nn.Module, layer_index: int, artifact: MemoirArtifact) -> MemoirDownProj | None:
    """Wrap layer `layer_index`'s mlp.down_proj of a vLLM decoder stack in a MemoirDownProj.

    Returns None when the layer is not on this pipeline rank (PPMissingLayer).
    """
    layer = model.layers[layer_index]
    mlp = getattr(layer, "mlp", None)
    base = getattr(mlp, "down_proj", None)
    if base is None:
        return None
    if not isinstance(base, RowParallelLinear):
        raise ValueError(f"layer {layer_index}'s mlp.down_proj is a {type(base).__name__}, expected RowParallelLinear")
    mlp.down_proj = MemoirDownProj(base, artifact)
    logger.info("MEMOIR: layer %d down_proj carries %d edits (top_k=%d, threshold=%.2f, aggregation=%s)",
                layer_index, artifact.manifest.num_edits, artifact.manifest.top_k,
                artifact.manifest.irr_threshold, artifact.manifest.aggregation)
    return mlp.down_proj
