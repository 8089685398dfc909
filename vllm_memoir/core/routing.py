"""EditRouter: from prompt features to per-request routes, against an artifact's stored masks.

Shared by the transformers reference (edit_tools.hf_model) and the vLLM plugin.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .artifact import MemoirArtifact
from .tophash import NO_ROUTE, match_routes, pack_indices, remove_background_components, tophash_indices


@dataclass
class RouteDecision:
    route: int  # matched edit row, or NO_ROUTE
    best_edit: int  # best-overlapping edit row (NO_ROUTE when no edits are stored)
    overlap: float  # best overlap in [0, 1]

    @property
    def routed(self) -> bool:
        return self.route != NO_ROUTE


class EditRouter:
    """Stored masks plus the settings that turn a prompt feature into a route."""

    def __init__(self, artifact: MemoirArtifact, device: torch.device | str = "cpu"):
        manifest = artifact.manifest
        self.top_k = manifest.top_k
        self.irr_threshold = manifest.irr_threshold
        # The best edit must beat the second best by this much overlap (0: the reference's rule).
        self.route_margin = manifest.route_margin
        self.aggregation = manifest.aggregation
        self.dim = manifest.intermediate_size
        self.permutation = artifact.permutation.to(device)
        self.background_mean = None if artifact.background_mean is None else artifact.background_mean.to(device)
        basis = artifact.background_basis
        self.background_basis = None if basis is None else basis.to(device, torch.float32)
        self.masks = artifact.masks.to(device)
        self.enabled = artifact.enabled.to(device)

    def query_masks(self, features: torch.Tensor) -> torch.Tensor:
        """Packed TopHash masks [B, W] of features [B, D]."""
        indices = tophash_indices(features, self.top_k, self.permutation.to(features.device))
        return pack_indices(indices, self.dim)

    def route_key(self, features: torch.Tensor) -> torch.Tensor:
        """Features [B, D] -> the keys TopHash ranks (the background's components removed, if any)."""
        return remove_background_components(features, self.background_basis)

    def route_tensors(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(route, best edit, overlap) per feature row, as tensors on the masks' device."""
        return self.match_keys(self.route_key(features))

    def match_keys(self, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """route_tensors for keys already made (route_key, or the plugin's sharded equivalent)."""
        query = self.query_masks(keys).to(self.masks.device)
        return match_routes(query, self.masks, self.top_k, self.irr_threshold, self.enabled, self.route_margin)

    def route_features(self, features: torch.Tensor) -> list[RouteDecision]:
        return as_decisions(*self.route_tensors(features))


def as_decisions(route: torch.Tensor, best: torch.Tensor, overlap: torch.Tensor) -> list[RouteDecision]:
    """match_routes' tensors as one RouteDecision per row."""
    return [RouteDecision(int(r), int(b), float(o)) for r, b, o in zip(route.tolist(), best.tolist(), overlap.tolist())]
