"""Background features: the mean down_proj input at the edited layer over irrelevant texts.

`mean_decentered` subtracts it from each prompt feature so masks reflect what is specific to
a prompt rather than what every prompt shares.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .hf_model import MemoirHFModel

logger = logging.getLogger(__name__)
BACKGROUND_KEY = "background_mean"
REFERENCE_ROWS = 100  # the reference averages the first 100 rows of its saved [N, D] features


@torch.no_grad()
def compute_background_mean(hf: MemoirHFModel, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean over texts of each text's mean down_proj input (padding excluded; over the artifact's routing
    span when it has one). Returns [D] float32."""
    if not texts:
        raise ValueError("background features need at least one text")
    return hf.prompt_features(texts, "mean", batch_size=batch_size).mean(0)


def save_background(mean: torch.Tensor, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({BACKGROUND_KEY: mean.float().contiguous()}, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # save_file creates 0600; the file is read by jobs and servers of other users
    tmp.replace(path)


def load_background(path: str | Path, dim: int) -> torch.Tensor:
    """Read background features from a .safetensors file (see `memoir convert` for .pt files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: background features load from .safetensors only; convert a .pt file with `memoir convert`")
    if not path.exists():
        raise ValueError(f"{path}: background features file not found")
    with safe_open(str(path), framework="pt") as handle:
        if BACKGROUND_KEY not in handle.keys():
            raise ValueError(f"{path}: no tensor named {BACKGROUND_KEY!r} (found {list(handle.keys())})")
        mean = handle.get_tensor(BACKGROUND_KEY).float()
    if tuple(mean.shape) != (dim,):
        raise ValueError(f"{path}: background_mean has shape {tuple(mean.shape)}, the edited layer needs ({dim},)")
    if not bool(torch.isfinite(mean).all()):
        raise ValueError(f"{path}: background_mean contains NaN or Inf")
    return mean


def convert_reference_background(pt_path: str | Path, out_path: str | Path) -> torch.Tensor:
    """Convert the reference's background .pt (a tensor [D] or [N, D], or a dict holding one) to safetensors.

    The only place that reads a .pt file, and it does so with weights_only=True.
    """
    obj = torch.load(str(pt_path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict):
        tensors = [v for v in obj.values() if isinstance(v, torch.Tensor)]
        if len(tensors) != 1:
            raise ValueError(f"{pt_path}: expected one tensor in the dict, found keys {list(obj)}")
        obj = tensors[0]
    if isinstance(obj, (list, tuple)):
        obj = torch.stack([torch.as_tensor(t).float().reshape(-1) for t in obj])
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{pt_path}: expected a tensor, found {type(obj).__name__}")
    mean = obj.float()
    if mean.dim() == 2:
        if mean.shape[0] > REFERENCE_ROWS:
            logger.info("%s: averaging the first %d of %d rows, as the reference does", pt_path, REFERENCE_ROWS, mean.shape[0])
        mean = mean[:REFERENCE_ROWS].mean(0)
    if mean.dim() != 1:
        raise ValueError(f"{pt_path}: expected shape [D] or [N, D], found {tuple(obj.shape)}")
    save_background(mean, out_path)
    return mean


def save_background_features(model_dir: str | Path, module_path: str, texts: list[str], out_path: str | Path,
                             device: str = "cpu", data_name: str = "the texts") -> torch.Tensor:
    """Load the model, compute the background mean at `module_path` over `texts` and save it (safetensors)."""
    from .datasets import warn_if_mostly_unknown

    hf = MemoirHFModel.from_pretrained(model_dir, module_path=module_path, device=device)
    warn_if_mostly_unknown(hf.tokenizer, texts, data_name, str(model_dir))
    mean = compute_background_mean(hf, texts)
    save_background(mean, out_path)
    return mean
