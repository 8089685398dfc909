"""MEMOIR hyperparameters, read from the reference's YAML keys unchanged plus our own settings."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vllm_memoir.core import AGGREGATIONS

_INNER_PARAM = re.compile(r"^(?P<prefix>.*layers)\[(?P<layer>\d+)\]\.(?P<rest>.+?)(\.weight)?$")


class HParamsError(ValueError):
    pass


@dataclass
class MemoirHyperParams:
    # Keys of the reference's hparams/MEMOIR/*.yaml, same names and defaults.
    alg_name: str = "MEMOIR"
    model_name: str = ""
    device: Any = "cpu"
    edit_lr: float = 1.0
    n_iter: int = 30
    objective_optimization: str = "only_label"
    inner_params: list[str] = field(default_factory=lambda: ["model.layers[27].mlp.down_proj.weight"])
    model_parallel: bool = False
    use_chat_template: bool = False
    top_k: int = 4096
    irr_threshold: float = 0.4
    prompt_feature_agg: str = "mean_decentered"
    dir_background_features: str | None = None
    RUN_SAVE_BACKGROUND_FEATURES: bool = False
    dir_to_save_background_features: str | None = None
    # Our settings (the reference hard-codes these values).
    weight_decay: float = 1e-5
    weight_decay_scope: str = "all"  # "all": shrink every column of W_m each step, as the reference does; "masked": only this edit's columns
    grad_clip: float = 1.0
    early_stop_delta: float = 1e-4
    early_stop_loss: float = 0.02
    lr_scaling: str = "none"  # "activation": divide edit_lr by the mean squared norm of the masked inputs
    num_background_texts: int = 100
    seed: int = 0
    dtype: str = "float32"
    checkpoint_every: int = 10
    fast_loop: bool = True

    @property
    def layer_index(self) -> int:
        return self._parsed_inner()[1]

    @property
    def module_path(self) -> str:
        prefix, layer, rest = self._parsed_inner()
        return f"{prefix}.{layer}.{rest}"

    def _parsed_inner(self) -> tuple[str, int, str]:
        match = _INNER_PARAM.match(self.inner_params[0])
        return match["prefix"], int(match["layer"]), match["rest"]

    def validate(self) -> "MemoirHyperParams":
        if self.alg_name != "MEMOIR":
            raise HParamsError(f"alg_name is {self.alg_name!r}; this tool runs MEMOIR")
        if len(self.inner_params) != 1 or not _INNER_PARAM.match(self.inner_params[0]):
            raise HParamsError(
                f"inner_params must name one down_proj weight like 'model.layers[27].mlp.down_proj.weight', got {self.inner_params}"
            )
        if not self.inner_params[0].split("[")[1].split(".", 1)[1].startswith("mlp.down_proj"):
            raise HParamsError(f"inner_params {self.inner_params[0]!r}: MEMOIR edits an MLP down_proj")
        if self.objective_optimization != "only_label":
            raise HParamsError(f"objective_optimization {self.objective_optimization!r} is not supported (only 'only_label')")
        if self.prompt_feature_agg not in AGGREGATIONS:
            raise HParamsError(f"prompt_feature_agg {self.prompt_feature_agg!r} not in {AGGREGATIONS}")
        if self.weight_decay_scope not in ("all", "masked"):
            raise HParamsError(f"weight_decay_scope {self.weight_decay_scope!r} not in ('all', 'masked')")
        if self.lr_scaling not in ("none", "activation"):
            raise HParamsError(f"lr_scaling {self.lr_scaling!r} not in ('none', 'activation')")
        if self.top_k <= 0 or self.n_iter <= 0 or self.edit_lr <= 0:
            raise HParamsError("top_k, n_iter and edit_lr must be positive")
        if not 0.0 <= self.irr_threshold <= 1.0:
            raise HParamsError(f"irr_threshold {self.irr_threshold} must be in [0, 1]")
        return self

    @classmethod
    def from_dict(cls, obj: dict[str, Any], where: str = "hparams") -> "MemoirHyperParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            raise HParamsError(f"{where}: unknown keys {unknown}; known keys are {sorted(known)}")
        try:
            return cls(**obj).validate()
        except (TypeError, ValueError, IndexError) as exc:
            if isinstance(exc, HParamsError):
                raise HParamsError(f"{where}: {exc}") from exc
            raise HParamsError(f"{where}: {exc}") from exc

    @classmethod
    def from_yaml(cls, path: str | Path) -> "MemoirHyperParams":
        path = Path(path)
        if not path.exists():
            raise HParamsError(f"{path}: hyperparameter file not found")
        obj = yaml.safe_load(path.read_text()) or {}
        if not isinstance(obj, dict):
            raise HParamsError(f"{path}: expected a YAML mapping of hyperparameters")
        return cls.from_dict(obj, str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
