"""Start-up checks of the artifact against the served model (engine settings: engine_requirements).

Every failure raises MemoirConfigError with a message naming the flag, field or file at
fault; vLLM then stops with that message instead of serving wrong answers.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vllm_memoir.core import ArtifactError, ArtifactManifest, base_fingerprint, read_manifest
from vllm_memoir.core import compatibility
# The artifact's identity and the deployment's pin keys live in core; re-exported for the plugin's modules.
from vllm_memoir.core.compatibility import EXPECTED_SHA256_KEY, EXPECTED_VERSION_KEY, artifact_sha256  # noqa: F401

logger = logging.getLogger(__name__)


class MemoirConfigError(ValueError):
    """The server cannot serve this artifact with these settings; the message says why."""


def memoir_path_from_config(hf_config: Any) -> Path:
    path = getattr(hf_config, "memoir_path", None)
    if not path:
        raise MemoirConfigError(
            "MEMOIR model classes need the artifact directory: pass "
            "--hf-overrides '{\"architectures\": [\"MemoirLlamaForCausalLM\"], \"memoir_path\": \"/path/to/artifact\"}'"
        )
    return Path(path)


@dataclass(frozen=True)
class ServedModel:
    """What the artifact is checked against."""

    model_dir: Path | None
    config: dict[str, Any]
    dtype: torch.dtype
    tp_size: int


def check_artifact_fits(manifest: ArtifactManifest, model: ServedModel, where: Path) -> None:
    """Shapes, layer, dtype and TP divisibility (core.compatibility); the fingerprint is checked on load."""
    try:
        compatibility.check_artifact_fits_model(manifest, model.config, model.dtype, model.tp_size, where)
    except ArtifactError as exc:
        raise MemoirConfigError(str(exc)) from exc
    if manifest.dtype == "float32" and model.dtype != torch.float32:
        logger.info("MEMOIR: memory stored as float32 is cast to the served dtype %s", model.dtype)


def check_expected_artifact(manifest: ArtifactManifest, hf_config: Any, where: Path) -> None:
    """Refuse an artifact whose version or content differs from the deployment's pin (if any)."""
    try:
        compatibility.check_expected_artifact(manifest, hf_config, where)
    except ArtifactError as exc:
        raise MemoirConfigError(str(exc)) from exc


def read_checkpoint_tensor(model_dir: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors checkpoint directory, found through the index when present."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        files = [model_dir / weight_map[name]] if name in weight_map else []
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            if name in handle.keys():
                return handle.get_tensor(name)
    raise MemoirConfigError(f"{model_dir}: no safetensors tensor {name!r} (needed for the base-model fingerprint)")


def served_fingerprint(manifest: ArtifactManifest, model: ServedModel) -> str:
    if model.model_dir is None or not model.model_dir.is_dir():
        raise MemoirConfigError(
            f"the base-model fingerprint needs the checkpoint as a local directory; got {model.model_dir} "
            "(download it first and serve the directory)"
        )
    weight = read_checkpoint_tensor(model.model_dir, f"{manifest.module_path}.weight")
    return base_fingerprint(weight, model.config)


def load_manifest(path: Path) -> ArtifactManifest:
    try:
        return read_manifest(path)
    except ArtifactError as exc:
        raise MemoirConfigError(str(exc)) from exc


def check_base_fingerprint(manifest: ArtifactManifest, model: ServedModel, where: Path) -> None:
    """The artifact was made on this checkpoint (what load_artifact checks, without reading the memory)."""
    try:
        compatibility.check_fingerprint(manifest, served_fingerprint(manifest, model), where)
    except ArtifactError as exc:
        raise MemoirConfigError(str(exc)) from exc
