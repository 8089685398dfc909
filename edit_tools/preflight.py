"""Checks a job's settings against the model before any slow step.

Only the model's config.json is read (no weights, no tokenizer, no data set), so a YAML made
for another model (the reference's `layers[27]` and `top_k: 4096` on a small model), a device
this machine lacks or a background file in the wrong format is refused in a second or two
with one line, instead of after the weights have loaded or at the first edit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from .hparams import HParamsError, MemoirHyperParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelShape:
    """What the checks need from a model's config.json."""

    name: str  # the directory as the user gave it
    num_layers: int
    hidden_size: int
    intermediate_size: int


def check_model_dir(model_dir: str | Path, flag: str = "--model") -> Path:
    """A local Hugging Face model directory; never a hub id (this tool does not download)."""
    path = Path(model_dir)
    if not path.is_dir():
        state = "does not exist" if not path.exists() else "is a file"
        raise HParamsError(f"{flag} {model_dir}: not a directory ({state}; give a local Hugging Face model directory, "
                           "this tool does not download models)")
    if not (path / "config.json").is_file():
        raise HParamsError(f"{flag} {model_dir}: no config.json in this directory (not a Hugging Face model directory)")
    return path


def read_model_shape(model_dir: str | Path, flag: str = "--model") -> ModelShape:
    from transformers import AutoConfig

    path = check_model_dir(model_dir, flag)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise HParamsError(f"{flag} {model_dir}: config.json cannot be read ({first_line})") from None
    config = getattr(config, "text_config", None) or config  # multimodal configs nest the language model's
    needed = ("num_hidden_layers", "hidden_size", "intermediate_size")
    missing = [key for key in needed if not isinstance(getattr(config, key, None), int)]
    if missing:
        raise HParamsError(f"{flag} {model_dir}: config.json has no {', '.join(missing)}: "
                           "not a Llama-style decoder that MEMOIR can edit")
    return ModelShape(str(model_dir), config.num_hidden_layers, config.hidden_size, config.intermediate_size)


def check_against_model(hp: MemoirHyperParams, shape: ModelShape, check_top_k: bool = True) -> None:
    """The values that depend on the model: the edited layer and the width of its down_proj input."""
    last = shape.num_layers - 1
    if hp.layer_index > last:
        raise hp.bad_value("inner_params", f"is outside {shape.name}'s {shape.num_layers} layers", f"0-{last}",
                           shown=f"layer {hp.layer_index}")
    if check_top_k and hp.top_k > shape.intermediate_size:
        raise hp.bad_value("top_k", f"is more than the {shape.intermediate_size} inputs of {shape.name}'s down_proj",
                           f"1-{shape.intermediate_size}")


def job_device(hp: MemoirHyperParams) -> str:
    """hp.device as torch spells it; CUDA on a machine without it falls back to the CPU with one warning."""
    import torch

    device = hp.torch_device
    if not device.startswith("cuda"):
        return device
    if not torch.cuda.is_available():
        logger.warning("device: %r asks for CUDA, which this machine does not have: running on the CPU%s",
                       hp.device, hp.origin("device"))
        return "cpu"
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise hp.bad_value("device", f"is not one of this machine's {torch.cuda.device_count()} GPUs",
                           f"cpu, cuda, cuda:0-{torch.cuda.device_count() - 1}")
    return device


def safetensors_twin(path: str) -> str:
    """The .safetensors path beside a reference .pt file, spelled as the user spelled the .pt path."""
    suffix = Path(path).suffix
    return (path[: -len(suffix)] if suffix else path) + ".safetensors"


def check_background_file(hp: MemoirHyperParams, shape: ModelShape) -> None:
    """dir_background_features must be a .safetensors file of this layer's width; a .pt gets the convert command."""
    from .background import load_background

    path = hp.dir_background_features
    if not path:
        return
    if Path(path).suffix == ".pt":
        twin = safetensors_twin(path)
        raise HParamsError(
            f"dir_background_features: {path!r} is a torch pickle, which this tool does not load (allowed: a .safetensors "
            f"file); run `memoir convert {path} {twin}` and set dir_background_features: {twin}"
            f"{hp.origin('dir_background_features')}"
        )
    try:
        load_background(path, shape.intermediate_size)
    except (ValueError, OSError) as exc:
        raise HParamsError(f"dir_background_features: {exc}{hp.origin('dir_background_features')}") from None


def background_save_path(hp: MemoirHyperParams) -> Path:
    """Where RUN_SAVE_BACKGROUND_FEATURES writes: the reference's dir_to_save_background_features, else
    dir_background_features; a .pt name becomes the .safetensors file beside it."""
    target = hp.dir_to_save_background_features or hp.dir_background_features
    if not target:
        raise HParamsError(
            "RUN_SAVE_BACKGROUND_FEATURES: True needs dir_to_save_background_features (or dir_background_features) "
            "to say where to save the features"
        )
    if Path(target).suffix != ".safetensors":
        twin = safetensors_twin(target)
        logger.warning("saving the background features to %s instead of %s: this tool writes safetensors only", twin, target)
        return Path(twin)
    return Path(target)


def preflight(hp: MemoirHyperParams, model_dir: str | Path, background_job: bool = False) -> tuple[ModelShape, str]:
    """Every check that needs the model's config; returns its shape and the device to load it on.

    background_job: the job computes background features (`memoir background`, or
    RUN_SAVE_BACKGROUND_FEATURES): it needs only the layer, not top_k or a background file.
    """
    shape = read_model_shape(model_dir)
    check_against_model(hp, shape, check_top_k=not background_job)
    device = job_device(hp)
    if not background_job:
        check_background_file(hp, shape)
    return shape, device
