"""The custom op `torch.ops.memoir.add_routed_residual_(out, x, layer_name)`.

LlamaModel is compiled with fullgraph=True: Python routing inside the compiled region is
traced once and frozen (requests silently come out unrouted). As a registered custom op the
routing step stays opaque to the compiler and runs on every forward, compiled or eager. It
mutates the down_proj output in place and reads its per-request inputs from state filled
before the forward (request_routes) and the forward context's attention metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch.library import Library

from vllm.forward_context import get_forward_context, is_forward_context_available
from vllm.utils.torch_utils import direct_register_custom_op

_LIBRARY = Library("memoir", "FRAGMENT")  # must outlive the op
_LAYERS: dict[str, "RoutedLayer"] = {}


class RoutedLayer(Protocol):
    def add_routed_residual(self, out: torch.Tensor, x: torch.Tensor) -> None: ...


def register_layer(name: str, layer: RoutedLayer) -> None:
    _LAYERS[name] = layer


@dataclass
class TokenLayout:
    """Where each batch row's tokens sit in this forward: row r owns tokens
    query_start[r]:query_start[r+1], at positions seq_len[r] - (its token count) onwards."""

    query_start: list[int]
    seq_lens: list[int]
    # Where each token's KV goes and each row's KV blocks (prefix features; see block_feature_sums).
    slot_mapping: torch.Tensor | None = None
    block_table: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return len(self.seq_lens)

    def tokens(self, row: int) -> tuple[int, int]:
        return self.query_start[row], self.query_start[row + 1]

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    def first_position(self, row: int) -> int:
        start, end = self.tokens(row)
        return self.seq_lens[row] - (end - start)


def current_layout() -> TokenLayout | None:
    """This forward's token layout, or None for runs without requests (profiling, warm-up)."""
    if not is_forward_context_available():
        return None
    metadata = get_forward_context().attn_metadata
    if not metadata:
        return None
    if isinstance(metadata, list):
        raise RuntimeError("MEMOIR does not support micro-batching (dual batch overlap)")
    for layer_metadata in metadata.values():
        query_start = getattr(layer_metadata, "query_start_loc", None)
        seq_lens = getattr(layer_metadata, "seq_lens", None)
        if query_start is not None and seq_lens is not None:
            num_rows = seq_lens.shape[0]
            return TokenLayout(query_start[: num_rows + 1].tolist(), seq_lens.tolist(),
                               getattr(layer_metadata, "slot_mapping", None),
                               getattr(layer_metadata, "block_table", None))
    return None


def _add_routed_residual(out: torch.Tensor, x: torch.Tensor, layer_name: str) -> None:
    _LAYERS[layer_name].add_routed_residual(out, x)


def _add_routed_residual_fake(out: torch.Tensor, x: torch.Tensor, layer_name: str) -> None:
    return None


direct_register_custom_op(
    op_name="add_routed_residual_",
    op_func=_add_routed_residual,
    mutates_args=["out"],
    fake_impl=_add_routed_residual_fake,
    target_lib=_LIBRARY,
)
