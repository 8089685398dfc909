"""Start-up checks: engine settings MEMOIR needs, and the artifact against the served model.

Every failure raises MemoirConfigError with a message naming the flag, field or file at
fault; vLLM then stops with that message instead of serving wrong answers.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vllm_memoir.core import ArtifactManifest, base_fingerprint, read_manifest

logger = logging.getLogger(__name__)

REQUIRED_FLAGS = "--no-enable-prefix-caching --no-enable-chunked-prefill"
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_DOWN_PROJ_PATH = re.compile(r"^(?:model\.)?layers\.(?P<layer>\d+)\.mlp\.down_proj$")


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


def check_engine_settings(vllm_config: Any) -> None:
    """Refuse settings under which routes cannot be exact (see design notes)."""
    problems = []
    if vllm_config.cache_config.enable_prefix_caching:
        problems.append("prefix caching is on (cached prompt tokens skip the edited layer and reuse another route's KV)")
    if vllm_config.scheduler_config.enable_chunked_prefill:
        problems.append("chunked prefill is on (prompt chunks before the routing decision would miss the residual)")
    if problems:
        raise MemoirConfigError(f"MEMOIR routing needs {REQUIRED_FLAGS}: " + "; ".join(problems))
    compilation = getattr(vllm_config, "compilation_config", None)
    cudagraph_mode = getattr(getattr(compilation, "cudagraph_mode", None), "name", "NONE")
    if cudagraph_mode != "NONE":
        # Untested on GPU: graph replay skips the routing op's Python, freezing routes.
        raise MemoirConfigError(
            f"MEMOIR's routing op runs Python on every step, which CUDA graph replay skips (cudagraph_mode="
            f"{cudagraph_mode}): pass -cc.cudagraph_mode=NONE (torch.compile stays on) or --enforce-eager"
        )
    if vllm_config.model_config.enable_prompt_embeds:
        raise MemoirConfigError("MEMOIR routes on prompt token ids: --enable-prompt-embeds is not supported")
    if vllm_config.speculative_config is not None:
        raise MemoirConfigError("MEMOIR does not support speculative decoding (--speculative-config)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise MemoirConfigError("MEMOIR supports tensor parallelism only: --pipeline-parallel-size must be 1")


@dataclass(frozen=True)
class ServedModel:
    """What the artifact is checked against."""

    model_dir: Path | None
    config: dict[str, Any]
    dtype: torch.dtype
    tp_size: int


def check_artifact_fits(manifest: ArtifactManifest, model: ServedModel, where: Path) -> None:
    """Shapes, layer, dtype and TP divisibility; the fingerprint is checked on load."""
    cfg = model.config
    match = _DOWN_PROJ_PATH.match(manifest.module_path)
    if match is None:
        raise MemoirConfigError(f"{where}: module_path {manifest.module_path!r} is not a decoder layer's mlp.down_proj")
    if int(match["layer"]) != manifest.layer_index:
        raise MemoirConfigError(f"{where}: module_path {manifest.module_path!r} disagrees with layer_index {manifest.layer_index}")
    num_layers = cfg.get("num_hidden_layers")
    if not 0 <= manifest.layer_index < num_layers:
        raise MemoirConfigError(f"{where}: layer_index {manifest.layer_index} is outside the served model's {num_layers} layers")
    for field in ("hidden_size", "intermediate_size"):
        if getattr(manifest, field) != cfg.get(field):
            raise MemoirConfigError(f"{where}: {field} {getattr(manifest, field)} != the served model's {cfg.get(field)}")
    if model.dtype not in _FLOAT_DTYPES:
        raise MemoirConfigError(f"{where}: the memory cannot be cast to the served dtype {model.dtype}")
    if manifest.dtype == "float32" and model.dtype != torch.float32:
        logger.info("MEMOIR: memory stored as float32 is cast to the served dtype %s", model.dtype)
    if manifest.intermediate_size % model.tp_size:
        raise MemoirConfigError(
            f"{where}: intermediate_size {manifest.intermediate_size} does not split over {model.tp_size} tensor-parallel ranks"
        )


# Optional --hf-overrides keys pinning the artifact a deployment expects (see deploy/README.md):
# every replica compares them with the manifest it reads and refuses to start on a mismatch,
# so replicas never serve a mix of artifact versions silently.
EXPECTED_VERSION_KEY = "memoir_expected_version"
EXPECTED_SHA256_KEY = "memoir_expected_sha256"


def artifact_sha256(manifest: ArtifactManifest) -> str:
    """The artifact's content id: the manifest's checksum of its memory .safetensors file."""
    return next((digest for name, digest in sorted(manifest.files.items()) if name.endswith(".safetensors")), "")


def check_expected_artifact(manifest: ArtifactManifest, hf_config: Any, where: Path) -> None:
    """Refuse an artifact whose version or content differs from the deployment's pin (if any)."""
    expected_version = getattr(hf_config, EXPECTED_VERSION_KEY, None)
    if expected_version is not None:
        try:
            expected_version = int(expected_version)
        except (TypeError, ValueError):
            raise MemoirConfigError(f"{EXPECTED_VERSION_KEY} must be an integer artifact version, got {expected_version!r}") from None
        if manifest.version != expected_version:
            raise MemoirConfigError(
                f"{where}: artifact version {manifest.version} != the deployment's {EXPECTED_VERSION_KEY} "
                f"{expected_version} (this replica sees another artifact version than the deployment pinned; "
                "update the pin or the artifact path)"
            )
    expected_sha = getattr(hf_config, EXPECTED_SHA256_KEY, None)
    if expected_sha is not None:
        expected_sha = str(expected_sha).strip().lower()
        if len(expected_sha) < 12:
            raise MemoirConfigError(f"{EXPECTED_SHA256_KEY} must be at least 12 hex digits of the memory file's sha256")
        actual = artifact_sha256(manifest)
        if not actual.startswith(expected_sha):
            raise MemoirConfigError(
                f"{where}: memory file sha256 {actual[:16]}... does not match the deployment's {EXPECTED_SHA256_KEY} "
                f"{expected_sha[:16]}... (artifact version {manifest.version}; another artifact than the deployment pinned)"
            )


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
    from vllm_memoir.core import ArtifactError

    try:
        return read_manifest(path)
    except ArtifactError as exc:
        raise MemoirConfigError(str(exc)) from exc
