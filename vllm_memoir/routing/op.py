"""The custom op `torch.ops.memoir.add_routed_residual_(out, x, layer_name)`.

LlamaModel is compiled with fullgraph=True: Python routing inside the compiled region is
traced once and frozen (requests silently come out unrouted). As a registered custom op the
routing step stays opaque to the compiler and runs on every forward, compiled or eager; it
is one of vLLM's graph-splitting ops (plugin.register), so under piecewise CUDA graphs it
runs between the captured pieces. It mutates the down_proj output in place and reads its
per-request inputs from the device buffers filled before the forward (routing.requests)
and the forward context's attention metadata (routing.layout).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch.library import Library

from vllm.utils.torch_utils import direct_register_custom_op

_LIBRARY = Library("memoir", "FRAGMENT")  # must outlive the op
_LAYERS: dict[str, "RoutedLayer"] = {}


class RoutedLayer(Protocol):
    def add_routed_residual(self, out: torch.Tensor, x: torch.Tensor) -> None: ...


def register_layer(name: str, layer: RoutedLayer) -> None:
    _LAYERS[name] = layer


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
