"""Does an artifact fit a model, and which artifact is it: the checks every loader shares.

The transformers reference (edit_tools/hf_model.py), load_artifact, and the plugin's start-up
and pre-flight (vllm_memoir/validation.py, which turns ArtifactError into the plugin's
MemoirConfigError) all call these, so an artifact is refused with the same message wherever
it is loaded.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from .artifact import ArtifactManifest
from .errors import ArtifactError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOWN_PROJ_PATH = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.mlp\.down_proj$")

# Optional keys (vLLM --hf-overrides) pinning the artifact a deployment expects (see
# deploy/README.md): every replica compares them with the manifest it reads and refuses to
# start on a mismatch, so replicas never serve a mix of artifact versions silently.
EXPECTED_VERSION_KEY = "memoir_expected_version"
EXPECTED_SHA256_KEY = "memoir_expected_sha256"


def check_artifact_fits_model(manifest: ArtifactManifest, config: dict[str, Any], dtype: torch.dtype,
                              tp_size: int = 1, where: object = "artifact") -> None:
    """Layer, shapes, dtype and tensor-parallel split of `manifest` against a model's config dict
    (the fingerprint is check_fingerprint's). Raises ArtifactError naming `where` and the field."""
    match = DOWN_PROJ_PATH.match(manifest.module_path)
    if match is None:
        raise ArtifactError(f"{where}: module_path {manifest.module_path!r} is not a decoder layer's mlp.down_proj")
    if int(match["layer"]) != manifest.layer_index:
        raise ArtifactError(f"{where}: module_path {manifest.module_path!r} disagrees with layer_index {manifest.layer_index}")
    num_layers = config.get("num_hidden_layers")
    if not isinstance(num_layers, int) or not 0 <= manifest.layer_index < num_layers:
        raise ArtifactError(f"{where}: layer_index {manifest.layer_index} is outside the served model's {num_layers} layers")
    for field in ("hidden_size", "intermediate_size"):
        if getattr(manifest, field) != config.get(field):
            raise ArtifactError(f"{where}: {field} {getattr(manifest, field)} != the served model's {config.get(field)}")
    if dtype not in FLOAT_DTYPES:
        raise ArtifactError(f"{where}: the memory cannot be cast to the served dtype {dtype}")
    if manifest.intermediate_size % tp_size:
        raise ArtifactError(
            f"{where}: intermediate_size {manifest.intermediate_size} does not split over {tp_size} tensor-parallel ranks"
        )


def check_fingerprint(manifest: ArtifactManifest, fingerprint: str, where: object) -> None:
    """The artifact was made on the base model whose base_fingerprint is `fingerprint`."""
    if manifest.base_fingerprint != fingerprint:
        raise ArtifactError(
            f"{where}: made for a different base model (fingerprint {manifest.base_fingerprint[:12]}..., "
            f"this model's is {fingerprint[:12]}...; artifact base_model={manifest.base_model!r})"
        )


def artifact_sha256(manifest: ArtifactManifest) -> str:
    """The artifact's content id: the manifest's checksum of its memory .safetensors file."""
    return next((digest for name, digest in sorted(manifest.files.items()) if name.endswith(".safetensors")), "")


def check_expected_artifact(manifest: ArtifactManifest, pins: Any, where: object) -> None:
    """Refuse an artifact whose version or content differs from the deployment's pin, read from
    `pins`' attributes EXPECTED_VERSION_KEY / EXPECTED_SHA256_KEY (absent: not pinned)."""
    expected_version = getattr(pins, EXPECTED_VERSION_KEY, None)
    if expected_version is not None:
        try:
            expected_version = int(expected_version)
        except (TypeError, ValueError):
            raise ArtifactError(f"{EXPECTED_VERSION_KEY} must be an integer artifact version, got {expected_version!r}") from None
        if manifest.version != expected_version:
            raise ArtifactError(
                f"{where}: artifact version {manifest.version} != the deployment's {EXPECTED_VERSION_KEY} "
                f"{expected_version} (this replica sees another artifact version than the deployment pinned; "
                "update the pin or the artifact path)"
            )
    expected_sha = getattr(pins, EXPECTED_SHA256_KEY, None)
    if expected_sha is not None:
        expected_sha = str(expected_sha).strip().lower()
        if len(expected_sha) < 12:
            raise ArtifactError(f"{EXPECTED_SHA256_KEY} must be at least 12 hex digits of the memory file's sha256")
        actual = artifact_sha256(manifest)
        if not actual.startswith(expected_sha):
            raise ArtifactError(
                f"{where}: memory file sha256 {actual[:16]}... does not match the deployment's {EXPECTED_SHA256_KEY} "
                f"{expected_sha[:16]}... (artifact version {manifest.version}; another artifact than the deployment pinned)"
            )
