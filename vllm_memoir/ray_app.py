"""Ray Serve application: vLLM's OpenAI-compatible server with MEMOIR, in every replica.

    serve run deploy/ray-serve.yaml     # import_path: vllm_memoir.ray_app:build_app

A thin builder over Ray Serve LLM (`ray.serve.llm.LLMConfig` + `build_openai_app`): it turns
a short MEMOIR deployment spec (model, artifact, replicas, resources) into an LLMConfig whose
engine arguments carry what routing needs -- the MEMOIR class and artifact in hf_overrides
(pinned to the artifact version seen at deploy time), prefix caching and chunked prefill off
when the edit sits below the last decoder layer,
the V1 runner's request tracker as a logits processor -- and nothing else of ours: Ray Serve
LLM starts vLLM's own AsyncLLM and serving classes, and vLLM runs the plugin's
`vllm.general_plugins` entry point in each replica's processes.

Paths are made absolute here, on the machine that deploys; every replica must see the same
paths (a shared filesystem, or the same files copied to each node; see deploy/README.md).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from vllm_memoir.edit_control import EXTENSION
from vllm_memoir.core.compatibility import EXPECTED_SHA256_KEY, EXPECTED_VERSION_KEY
from vllm_memoir.engine_requirements import V1_TRACKER, memoir_hf_overrides, routing_flags, uses_v1_runner
from vllm_memoir.validation import MemoirConfigError

logger = logging.getLogger(__name__)

# Small CPU KV cache (GiB): vLLM's CPU engine otherwise reserves a large share of memory.
CPU_ENV_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "4"}
_ACCELERATORS = ("cpu", "gpu")
_OWN_ENGINE_KEYS = ("hf_overrides", "enable_prefix_caching", "enable_chunked_prefill", "tensor_parallel_size")


def memoir_engine_kwargs(
    model: str | Path, artifact: str | Path, *, accelerator: str, env_vars: dict[str, str],
    tensor_parallel_size: int = 1, dtype: str = "auto", pin_artifact: bool = True,
    engine_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """vLLM engine arguments (AsyncEngineArgs fields) for serving `model` with `artifact`."""
    extra = dict(engine_kwargs or {})
    clashes = sorted(key for key in _OWN_ENGINE_KEYS if key in extra)
    if clashes:
        raise MemoirConfigError(f"engine_kwargs must not set {clashes}: the MEMOIR builder sets them (see its arguments)")
    kwargs: dict[str, Any] = {
        "hf_overrides": memoir_hf_overrides(model, artifact, pin=pin_artifact),
        "tensor_parallel_size": int(tensor_parallel_size),
        "dtype": dtype,
        **extra,
    }
    # vLLM's defaults for an edit at the last decoder layer; both off below it (validation).
    for flag in routing_flags(model, artifact):
        kwargs[flag.removeprefix("--no-").replace("-", "_")] = False
    if uses_v1_runner(accelerator == "gpu", env_vars):  # GPU builds of vLLM ship Triton
        processors = list(kwargs.get("logits_processors") or [])
        kwargs["logits_processors"] = processors if V1_TRACKER in processors else [V1_TRACKER, *processors]
    if accelerator == "gpu":
        # Piecewise CUDA graphs split at the routing op; full graphs are refused
        # (engine_requirements.check_cuda_graph_mode says why).
        kwargs.setdefault("compilation_config", {"cudagraph_mode": "PIECEWISE"})
    return kwargs


def confirm_pin(overrides: dict[str, Any], artifact: str | Path, version: int | None, sha256: str | None) -> None:
    """The config's own pin (artifact_version/artifact_sha256) must match the artifact seen here.

    So a stale path or a half-synced copy fails the deploy at once, before any replica starts.
    """
    if version is None and sha256 is None:
        return
    if EXPECTED_VERSION_KEY not in overrides:
        raise MemoirConfigError("artifact_version/artifact_sha256 pin the artifact: they need pin_artifact: true")
    seen_version, seen_sha = overrides[EXPECTED_VERSION_KEY], overrides[EXPECTED_SHA256_KEY]
    if version is not None and int(version) != seen_version:
        raise MemoirConfigError(f"artifact_version {version} != version {seen_version} of the artifact at {artifact}")
    if sha256 is not None and (len(str(sha256)) < 12 or not seen_sha.startswith(str(sha256).strip().lower())):
        raise MemoirConfigError(f"artifact_sha256 {sha256} (at least 12 hex digits) does not match the memory file "
                                f"sha256 {seen_sha[:16]}... of the artifact at {artifact}")


def memoir_llm_config(
    model: str | Path,
    artifact: str | Path,
    *,
    model_id: str | None = None,
    num_replicas: int = 1,
    accelerator: str = "cpu",
    accelerator_type: str | None = None,
    cpus_per_replica: float = 1,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    pin_artifact: bool | None = None,
    artifact_version: int | None = None,
    artifact_sha256: str | None = None,
    engine_kwargs: dict[str, Any] | None = None,
    env_vars: dict[str, str] | None = None,
    deployment_config: dict[str, Any] | None = None,
    admin: bool = False,
):
    """A Ray Serve LLM config serving `model` (a local directory) with the MEMOIR `artifact`.

    With pin_artifact (default: on, off with admin) every replica refuses an artifact other than the one seen here;
    artifact_version/artifact_sha256, when given, must name that artifact (see confirm_pin).
    deployment_config, when given, replaces num_replicas (e.g. an autoscaling_config).
    admin: replicas that take live edits (ray_live_edits; build_app adds the routes).
    """
    from ray.serve.llm import LLMConfig

    if accelerator not in _ACCELERATORS:
        raise MemoirConfigError(f"accelerator must be one of {_ACCELERATORS}, got {accelerator!r}")
    if pin_artifact is None:
        pin_artifact = not admin
    if admin and pin_artifact:
        # A replica Serve restarts after a live swap reads the artifact path anew; a pin to
        # the deploy-time version would refuse it once an edit job has moved the artifact on.
        raise MemoirConfigError("admin (live edits) needs pin_artifact: false: the served version changes "
                                "after deploy, so replicas cannot be pinned to the deploy-time one")
    if admin:
        engine_kwargs = {**(engine_kwargs or {})}
        engine_kwargs.setdefault("worker_extension_cls", EXTENSION)
    model_dir = Path(model).resolve()
    env = {**(CPU_ENV_DEFAULTS if accelerator == "cpu" else {}), **(env_vars or {})}
    kwargs = memoir_engine_kwargs(model_dir, artifact, accelerator=accelerator, env_vars=env,
                                  tensor_parallel_size=tensor_parallel_size, dtype=dtype,
                                  pin_artifact=pin_artifact, engine_kwargs=engine_kwargs)
    confirm_pin(kwargs["hf_overrides"], artifact, artifact_version, artifact_sha256)
    deployment = dict(deployment_config) if deployment_config else {"num_replicas": int(num_replicas)}
    deployment.setdefault("ray_actor_options", {}).setdefault("num_cpus", cpus_per_replica)
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id or model_dir.name, "model_source": str(model_dir)},
        "engine_kwargs": kwargs,
        "accelerator_config": {"kind": accelerator},
        "deployment_config": deployment,
        "runtime_env": {"env_vars": env},
    }
    if accelerator_type:
        config["accelerator_type"] = accelerator_type
    if admin:
        from vllm_memoir.ray_live_edits import MemoirLLMServer

        config["server_cls"] = MemoirLLMServer
    overrides = kwargs["hf_overrides"]
    logger.info("MEMOIR on Ray Serve: %s with %s (%s), %s", model_dir, overrides["memoir_path"],
                overrides["architectures"][0],
                f"pinned to version {overrides['memoir_expected_version']}" if pin_artifact else "not pinned")
    return LLMConfig(**config)


def build_app(args: dict[str, Any]):
    """Ray Serve application builder (`import_path: vllm_memoir.ray_app:build_app`).

    `args` are memoir_llm_config's arguments; Ray Serve LLM adds its OpenAI-compatible
    ingress (/v1/completions, /v1/chat/completions, /v1/models) in front of the replicas,
    with `admin: true` also the /memoir/... live-edit routes (ray_live_edits).
    """
    from ray.serve.llm import build_openai_app

    args = dict(args)
    try:
        model, artifact = args.pop("model"), args.pop("artifact")
    except KeyError as missing:
        raise MemoirConfigError(f"the MEMOIR Ray Serve app needs args.{missing.args[0]}") from None
    llm_config = memoir_llm_config(model, artifact, **args)
    if args.get("admin"):
        from vllm_memoir.ray_live_edits import build_admin_app

        return build_admin_app(llm_config)
    return build_openai_app({"llm_configs": [llm_config]})
