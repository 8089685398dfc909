"""MEMOIR model classes: vLLM's own CausalLM classes with layer L's down_proj swapped.

Select one with --hf-overrides '{"architectures": ["MemoirLlamaForCausalLM"],
"memoir_path": "/path/to/artifact"}'. Everything but the edited layer's down_proj is the
stock vLLM model; that one is wrapped (routing.layer), and the base checkpoint loads
unchanged: its weights for the wrapped projection are renamed on the way in.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import torch

from vllm.config import VllmConfig
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from vllm_memoir.core import ArtifactError, MemoirArtifact, load_artifact
from vllm_memoir.engine_requirements import (V1_TRACKER, check_engine_settings, check_prompt_splitting,
                                             warn_if_untested_vllm)
from vllm_memoir.routing import requests as request_routes
from vllm_memoir.routing.layer import base_layer_weight_name, install_memoir_down_proj
from vllm_memoir.validation import (MemoirConfigError, ServedModel, artifact_sha256, check_artifact_fits,
                                    check_expected_artifact, load_manifest, memoir_path_from_config,
                                    served_fingerprint)

logger = logging.getLogger(__name__)


def load_artifact_for(vllm_config: VllmConfig, path: Path | None = None) -> MemoirArtifact:
    """Check the engine settings and the artifact against the served model, then load it.

    `path` defaults to the start-up artifact (memoir_path); live swaps pass a newer one.
    """
    check_engine_settings(vllm_config)
    if path is None:
        import vllm

        warn_if_untested_vllm(vllm.__version__)
    if not vllm_config.use_v2_model_runner and request_routes.active() is None:
        raise MemoirConfigError(f"MEMOIR on vLLM's V1 model runner needs --logits-processors {V1_TRACKER}")
    model_config = vllm_config.model_config
    at_start_up = path is None
    path = memoir_path_from_config(model_config.hf_config) if at_start_up else Path(path)
    manifest = load_manifest(path)
    if at_start_up:
        # The deployment's version pin guards start-up; a live swap (admin route) moves past it on purpose.
        check_expected_artifact(manifest, model_config.hf_config, path)
    served = ServedModel(
        model_dir=Path(model_config.model),
        config=model_config.hf_config.to_dict(),
        dtype=model_config.dtype,
        tp_size=vllm_config.parallel_config.tensor_parallel_size,
    )
    check_artifact_fits(manifest, served, path)
    check_prompt_splitting(vllm_config, manifest, path)
    try:
        artifact = load_artifact(path, expected_fingerprint=served_fingerprint(manifest, served))
    except ArtifactError as exc:
        raise MemoirConfigError(str(exc)) from exc
    logger.info("MEMOIR: artifact %s (version %d, memory sha256 %s, %d edits) matches %s", path, manifest.version,
                artifact_sha256(manifest)[:16], manifest.num_edits, model_config.model)
    return artifact


class MemoirModelMixin:
    """Mixed in before a vLLM CausalLM class whose decoder stack is `self.model.layers`."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        artifact = load_artifact_for(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._memoir_layer_index = artifact.manifest.layer_index
        install_memoir_down_proj(self.model, self._memoir_layer_index, artifact)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        index = self._memoir_layer_index
        return super().load_weights((base_layer_weight_name(name, index), tensor) for name, tensor in weights)

    @staticmethod
    def get_model_state_cls():
        # Consulted by Model Runner V2 only.
        from vllm_memoir.runner_v2 import MemoirModelState

        return MemoirModelState


class MemoirLlamaForCausalLM(MemoirModelMixin, LlamaForCausalLM):
    pass


class MemoirQwen2ForCausalLM(MemoirModelMixin, Qwen2ForCausalLM):
    pass


class MemoirMistralForCausalLM(MemoirModelMixin, MistralForCausalLM):
    pass

