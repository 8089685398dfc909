"""memoir-serve's pre-flight: refuse a start that cannot work within seconds, before vLLM loads.

Without it a refused start (no artifact, another base model, wrong shape, routing flags)
surfaced 35-40 s in, deep in vLLM's log under "Engine core initialization failed". The
checks are the plugin's own start-up checks (vllm_memoir.validation), run against the model
directory's config and the command line instead of vLLM's engine config, which takes longer
to build than the engine takes to fail. The model class runs them again when the engine
starts, so a case this cannot see (flags in a --config file, say) is still refused there.
Imports no vLLM.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from vllm_memoir import cpu_kv_cache
from vllm_memoir.serve_args import ServeArgs, human_int, parse_serve_args

logger = logging.getLogger(__name__)


class ServeRefusal(SystemExit):
    """memoir-serve will not start; the message is the one line that says why.

    A SystemExit: nothing should carry on past it (serve.main prints it and exits 2).
    """

    def __str__(self) -> str:
        return str(self.code)


@dataclass(frozen=True)
class Preflight:
    args: ServeArgs
    model_dir: Path | None  # the model as a local directory, None for a hub id (or no model given)
    memoir_class: str | None  # the MEMOIR class --hf-overrides selects
    artifact: Path | None  # its memoir_path, checked against the model


def check_serve_command(argv: list[str], on_cpu: bool) -> Preflight:
    """Parse and check a `vllm serve` command line; raises ServeRefusal with a one-line reason."""
    from vllm_memoir.validation import MemoirConfigError

    args = parse_serve_args(argv)
    if args.wants_help or not args.complete:
        return Preflight(args, None, None, None)  # vLLM prints the help, or says what is wrong with the line
    try:
        if on_cpu:
            check_kv_cache_env(os.environ.get(cpu_kv_cache.ENV))
        overrides, memoir_class = hf_overrides_args(args.hf_overrides)
        model_dir = local_model_dir(args.model, required=memoir_class is not None)
        artifact = check_memoir_start(args, model_dir, overrides, on_cpu) if memoir_class else None
    except MemoirConfigError as exc:
        raise ServeRefusal(str(exc)) from None
    return Preflight(args, model_dir, memoir_class, artifact)


def check_kv_cache_env(value: str | None) -> None:
    from vllm_memoir.validation import MemoirConfigError

    if value is None or value == "":
        return
    try:
        gib = int(value)
    except ValueError:
        gib = 0
    if gib < 1:
        raise MemoirConfigError(f"{cpu_kv_cache.ENV}={value!r}: must be a whole number of GiB, 1 or more "
                                f"(vLLM reads it as an integer), e.g. {cpu_kv_cache.ENV}=2")


def hf_overrides_args(text: str | None) -> tuple[dict[str, Any], str | None]:
    from vllm_memoir.engine_requirements import memoir_class_in, parse_overrides

    if text is None:
        return {}, None
    overrides = parse_overrides(text)
    return overrides, memoir_class_in(overrides)


def _looks_like_a_path(model: str) -> bool:
    """A hub id is NAME or ORG/NAME; anything else, or ORG/NAME whose ORG is a local directory, is a path."""
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        return True
    return "/" in model and Path(model.split("/")[0]).is_dir()


def local_model_dir(model: str | None, required: bool) -> Path | None:
    """The model as a local directory; None for a hub id. `required`: MEMOIR needs a local directory."""
    from vllm_memoir.validation import MemoirConfigError

    if model is None:
        if required:
            raise MemoirConfigError("MEMOIR serves a local model directory: give it first (memoir-serve MODEL_DIR ...)")
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        if required and not (path / "config.json").is_file():
            raise MemoirConfigError(f"{path / 'config.json'}: missing (not a model directory)")
        return path
    if path.exists():
        raise MemoirConfigError(f"model {model}: is a file, not a model directory")
    if required or _looks_like_a_path(model):
        hint = "MEMOIR serves a local model directory; download it first" if required else "not a local directory"
        raise MemoirConfigError(f"model {model}: no such directory ({hint})")
    return None


def served_dtype(flag: str, hf_config: Any):
    """The dtype vLLM will serve in, as far as the artifact checks care (a float type)."""
    import torch

    names = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
             "bfloat16": torch.bfloat16}
    if flag in names:
        return names[flag]
    declared = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
    if isinstance(declared, torch.dtype):
        return declared if declared in names.values() else torch.float32
    return names.get(str(declared).removeprefix("torch."), torch.float32)


class ModelConfigView(SimpleNamespace):
    """config.json as attributes, like the transformers config vLLM builds from it (to_dict included).

    Read directly: importing transformers costs more than the rest of the pre-flight together.
    """

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))


# What the base-model fingerprint hashes besides the weight (vllm_memoir.core.base_fingerprint).
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "vocab_size")


def load_hf_config(model_dir: Path, overrides: dict[str, Any]) -> ModelConfigView:
    """The model's config.json with --hf-overrides set on it, as vLLM applies them."""
    from vllm_memoir.validation import MemoirConfigError

    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MemoirConfigError(f"{path}: not a readable model config ({exc})") from None
    if not isinstance(config, dict):
        raise MemoirConfigError(f"{path}: not a readable model config (expected a JSON object)")
    for field in ("num_hidden_layers", "hidden_size", "intermediate_size"):
        if not isinstance(config.get(field), int):
            raise MemoirConfigError(f"{path}: {field} must be an integer, got {config.get(field)!r}")
    return ModelConfigView(**{**config, **overrides})


def _speculative(text: str | None) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text) or None
    except json.JSONDecodeError:
        return None  # vLLM's parser refuses it with its own message


def engine_settings(args: ServeArgs, hf_config: Any, model_dir: Path, dtype, on_cpu: bool) -> SimpleNamespace:
    """The fields of vllm.config.VllmConfig the start-up checks read, as vLLM will fill them from these flags."""
    # vLLM turns both on by default for decoder-only generation models (all MEMOIR classes).
    prefix_caching = True if args.enable_prefix_caching is None else args.enable_prefix_caching
    chunked_prefill = True if args.enable_chunked_prefill is None else args.enable_chunked_prefill
    # The CPU platform has no CUDA graphs. Elsewhere the mode follows flags and platform defaults
    # that only vLLM resolves: None here leaves that check to the engine.
    compilation = SimpleNamespace(cudagraph_mode=SimpleNamespace(name="NONE")) if on_cpu else None
    return SimpleNamespace(
        cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=chunked_prefill),
        compilation_config=compilation,
        model_config=SimpleNamespace(enable_prompt_embeds=bool(args.enable_prompt_embeds), hf_config=hf_config,
                                     model=str(model_dir), dtype=dtype),
        speculative_config=_speculative(args.speculative_config),
        parallel_config=SimpleNamespace(pipeline_parallel_size=human_int(args.pipeline_parallel_size) or 1,
                                        tensor_parallel_size=human_int(args.tensor_parallel_size) or 1),
    )


def check_memoir_start(args: ServeArgs, model_dir: Path, overrides: dict[str, Any], on_cpu: bool) -> Path:
    """The plugin's start-up checks on the artifact, the model and the engine flags; returns the artifact path."""
    from vllm_memoir.validation import MemoirConfigError, ServedModel, check_artifact_fits, check_base_fingerprint, check_expected_artifact, load_manifest, memoir_path_from_config
    from vllm_memoir.engine_requirements import check_engine_settings, check_prompt_splitting

    hf_config = load_hf_config(model_dir, overrides)
    path = memoir_path_from_config(hf_config)
    if not path.exists():
        raise MemoirConfigError(f"memoir_path {path}: no such artifact directory (make one with `memoir edit --out "
                                f"{path}`, or fix memoir_path in --hf-overrides)")
    if not path.is_dir():
        raise MemoirConfigError(f"memoir_path {path}: not a directory (an artifact is a directory with manifest.json)")
    manifest = load_manifest(path)
    check_expected_artifact(manifest, hf_config, path)
    dtype = served_dtype(args.dtype, hf_config)
    served = ServedModel(model_dir=model_dir, config=hf_config.to_dict(), dtype=dtype,
                         tp_size=human_int(args.tensor_parallel_size) or 1)
    check_artifact_fits(manifest, served, path)
    for name in manifest.files:
        if not (path / name).is_file():
            raise MemoirConfigError(f"{path / name}: missing (named by {path / 'manifest.json'})")
    if all(key in served.config for key in _FINGERPRINT_KEYS):  # else transformers fills defaults: the engine checks
        check_base_fingerprint(manifest, served, path)
    engine = engine_settings(args, hf_config, model_dir, dtype, on_cpu)
    try:
        check_engine_settings(engine)
        check_prompt_splitting(engine, manifest, path)
    except AttributeError as exc:  # a check reads a field this stand-in lacks: the engine runs it
        logger.debug("engine-settings pre-flight left to the engine (%s)", exc)
    return path
