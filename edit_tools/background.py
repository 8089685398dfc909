"""Background features: the mean down_proj input at the edited layer over irrelevant texts,
and (with background_components) the top principal directions of the texts' features.

`mean_decentered` subtracts the mean from each prompt feature so masks reflect what is specific
to a prompt rather than what every prompt shares; removing the principal directions as well
drops what prompts of one phrasing share whoever they are about (core remove_background_components).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .hf_model import MemoirHFModel

logger = logging.getLogger(__name__)
BACKGROUND_KEY = "background_mean"
BASIS_KEY = "background_basis"
REFERENCE_ROWS = 100  # the reference averages the first 100 rows of its saved [N, D] features


@torch.no_grad()
def compute_background_mean(hf: MemoirHFModel, texts: list[str], batch_size: int = 16) -> torch.Tensor:
    """Mean over texts of each text's mean down_proj input (padding excluded; over the artifact's routing
    span when it has one). Returns [D] float32."""
    if not texts:
        raise ValueError("background features need at least one text")
    return compute_background(hf, texts, batch_size=batch_size).mean


@dataclass
class Background:
    mean: torch.Tensor  # [D] float32
    basis: torch.Tensor | None = None  # [r, D] float32, orthonormal rows: the top principal directions


def check_enough_texts(components: int, count: int) -> None:
    """Principal directions need more texts than directions (N texts span at most N - 1 around their mean)."""
    if components and components >= count:
        raise ValueError(f"background_components {components} needs more background texts than components; "
                         f"got {count} texts")


def compute_background(hf: MemoirHFModel, texts: list[str], components: int = 0, batch_size: int = 16) -> Background:
    """The background mean and, when components > 0, the top `components` principal directions
    of the texts' features around it (right singular vectors of the centred [N, D] features)."""
    check_enough_texts(components, len(texts))
    features = hf.prompt_features(texts, "mean", batch_size=batch_size)
    mean = features.mean(0)
    if not components:
        return Background(mean)
    _, _, vh = torch.linalg.svd((features - mean).double(), full_matrices=False)
    return Background(mean, vh[:components].float().contiguous())


def save_background(mean: torch.Tensor, path: str | Path, basis: torch.Tensor | None = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tensors = {BACKGROUND_KEY: mean.float().contiguous()}
    if basis is not None:
        tensors[BASIS_KEY] = basis.float().contiguous()
    save_file(tensors, str(tmp))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o666 & ~umask)  # save_file creates 0600; the file is read by jobs and servers of other users
    tmp.replace(path)


def load_background(path: str | Path, dim: int) -> torch.Tensor:
    """Read the background mean from a .safetensors file (see `memoir convert` for .pt files)."""
    return read_background(path, dim).mean


def read_background(path: str | Path, dim: int, components: int = 0) -> Background:
    """Read background features from a .safetensors file: the mean and, when components > 0, the
    first `components` rows of its principal directions (the file must hold at least that many)."""
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
    if not components:
        return Background(mean)
    with safe_open(str(path), framework="pt") as handle:
        basis = handle.get_tensor(BASIS_KEY).float() if BASIS_KEY in handle.keys() else None
    held = 0 if basis is None else basis.shape[0]
    if basis is None or basis.dim() != 2 or basis.shape[1] != dim or held < components:
        raise ValueError(f"{path}: background_components {components} needs a {BASIS_KEY!r} tensor of at least "
                         f"{components} rows of width {dim}, found {None if basis is None else tuple(basis.shape)}; "
                         f"compute one with `memoir background --components {components}`")
    if not bool(torch.isfinite(basis).all()):
        raise ValueError(f"{path}: {BASIS_KEY} contains NaN or Inf")
    return Background(mean, basis[:components].contiguous())


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
                             device: str = "cpu", data_name: str = "the texts", components: int = 0) -> torch.Tensor:
    """Load the model, compute the background mean (and `components` principal directions) at
    `module_path` over `texts` and save them (safetensors); returns the mean."""
    from .datasets import warn_if_mostly_unknown

    hf = MemoirHFModel.from_pretrained(model_dir, module_path=module_path, device=device)
    warn_if_mostly_unknown(hf.tokenizer, texts, data_name, str(model_dir))
    background = compute_background(hf, texts, components)
    save_background(background.mean, out_path, background.basis)
    return background.mean
