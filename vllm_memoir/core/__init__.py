"""Pure-torch MEMOIR core: the math and the artifact format. Imports without vLLM."""

from .artifact import (
    FORMAT_VERSION,
    ArtifactError,
    ArtifactManifest,
    EditRecord,
    MemoirArtifact,
    base_fingerprint,
    load_artifact,
    read_manifest,
    save_artifact,
)
from .tophash import (
    AGGREGATIONS,
    NO_ROUTE,
    aggregate_prompt_feature,
    dense_masked_residual,
    finish_feature,
    masked_residual,
    match_routes,
    overlap_counts,
    pack_indices,
    packed_width,
    popcount64,
    remove_background_components,
    residual_by_route,
    tophash_indices,
    unpack_bits,
    unpack_indices,
)

__all__ = [name for name in dir() if not name.startswith("_")]
