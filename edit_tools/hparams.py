"""MEMOIR hyperparameters, read from the reference's YAML keys unchanged plus our own settings.

Every value is checked when the file is read, and every error is one line that names the key,
the value, what is wrong with it, the allowed values and where the value came from (the YAML
file or the command-line flag that set it). Checks that need the model (layer index, top_k
against the layer's width) live in `preflight.py`.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

_INNER_PARAM = re.compile(r"^(?P<prefix>.*layers)\[(?P<layer>\d+)\]\.(?P<rest>.+?)(\.weight)?$")
_CUDA_DEVICE = re.compile(r"^cuda(:(?P<index>\d+))?$")
DTYPES = ("float32", "bfloat16", "float16")


class HParamsError(ValueError):
    pass


@dataclass
class MemoirHyperParams:
    # Keys of the reference's hparams/MEMOIR/*.yaml, same names and defaults.
    alg_name: str = "MEMOIR"
    model_name: str = ""
    device: Any = "cpu"  # the reference's integer GPU index, or "cpu", "cuda", "cuda:N"
    # The reference's fixed step: SGD at edit_lr for n_iter steps (its defaults 1.0 and 30 apply
    # when update_rule is "reference" and they are unset). Setting either asks for that step.
    edit_lr: float | None = None
    n_iter: int | None = None
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
    # How each edit trains its columns (edit_step.py):
    # - "adaptive": scale-free steps (Polyak: step = loss / |grad|^2, halved whenever a step raises
    #   the loss) until the edit's loss is <= edit_loss_target, at most max_steps_per_edit steps;
    #   adapts to any model's activation and gradient scale, so edits take without tuning.
    # - "reference": the reference's SGD at edit_lr, n_iter steps, grad_clip, early stop.
    # - "auto" (default): "reference" when edit_lr or n_iter is set (a hand-tuned or the
    #   reference's own file), else "adaptive". validate() replaces it with the one it picks.
    update_rule: str = "auto"
    # The adaptive step stops once the target's mean cross-entropy over the edit's rows is at
    # most this (0.05: p(target) ~0.95 per token), or when it stops improving (a model whose
    # final norm bounds its logits may not get there). Whether an edit took is judged apart,
    # for both steps: every target token is the top prediction on every edit row; else a warning.
    edit_loss_target: float = 0.05
    max_steps_per_edit: int = 100  # the adaptive step's cap on steps per edit
    # The adaptive step's trust region: one step moves the edited layer's output at any of the
    # edit's tokens by at most this times the residual stream's (median) norm; 0 turns it off.
    adaptive_step_limit: float = 0.2
    # Which prompt tokens the route feature averages: "prompt" (all, the reference) or
    # "last_user_message" (the chat template's last user turn; vllm_memoir/core/route_span.py).
    routing_span: str = "prompt"
    # Updates that leave earlier edits alone (edit_step.EarlierKeys; issue 13 part 3):
    # - "none" (default, the reference): each edit's step uses its columns' gradient as it is.
    # - "null_space": the job keeps the covariance of earlier edits' keys (the masked down_proj
    #   inputs at their target positions, float64, checkpointed beside the artifact) and projects
    #   each step's gradient on this edit's columns away from their dominant directions
    #   (AlphaEdit's null space), so W_m's output on earlier keys changes little. Exact for the
    #   last layer, where the residual reaches the loss only at the target positions; weight
    #   decay (if set) still shrinks earlier columns. Use it with the reference step: the adaptive
    #   step's large steps in a thin null space undo it (benchmarks/RESULTS.md, issue 13 part 3).
    update_projection: str = "none"
    # Which directions of the earlier keys (on this edit's columns) are protected: eigenvectors
    # of their covariance whose eigenvalue is above this share of the largest. Lower protects
    # more of the earlier edits and leaves this edit less room (a low value can keep it from taking).
    null_space_threshold: float = 1e-2
    # The least share of an edit's mask directions left free to change, however many earlier
    # keys cover them: past ~1,000 edits the keys of earlier edits span nearly every direction of
    # a mask and a projected step can no longer make the new edit (benchmarks/RESULTS.md). With
    # a share s, at most (1 - s) x top_k directions are protected, those the earlier keys use
    # most; the new edit then moves earlier outputs only along their weakest directions.
    # 0.0 (default): no floor, only null_space_threshold decides.
    null_space_min_room: float = 0.0
    # An edit that did not take (its target is not the top prediction on every row after
    # training): "keep" (default, the reference) leaves its partial update in W_m and routes to it
    # like any other; "roll_back" restores W_m as it was before the edit, and stores the edit
    # disabled (its prompt gets the base model; the record keeps its outcome, marked
    # rolled_back, so it can be found and retried). A failed edit's update moves earlier
    # edits' outputs without making its own; under update_projection its keys are not protected.
    failed_edits: str = "keep"
    # Routing with a second check (issue 13 part 3): a prompt takes its best edit only when that
    # edit's mask overlap beats the second-best enabled edit's by at least this much (overlap
    # units, as irr_threshold: 0.02 = 2% of top_k bits; with one edit stored the second is 0).
    # Stored in the artifact's manifest, so the server routes the same way. 0.0 (default): no
    # such check, the reference's rule. A prompt whose best edit barely beats another (an
    # unrelated or neighbour prompt near several edits of its template) then stays unrouted.
    route_margin: float = 0.0
    # A routing key with the background's shared directions removed (issue 13 part 2): TopHash
    # ranks each prompt's decentered feature minus its part along the top N principal directions
    # of the background texts' features (stored in the artifact as background_basis [N, D]).
    # Prompts of one phrasing or relation share those directions whoever they ask about, which
    # made their masks overlap as much as a paraphrase's (benchmarks/RESULTS.md). Needs
    # prompt_feature_agg mean_decentered and more than N background texts. 0 (default): the
    # reference's key, the decentered feature itself.
    background_components: int = 0
    # Where the background texts come from when dir_background_features is unset: a .txt file (one
    # text per line) or a dataset file (its locality and edit prompts), at most num_background_texts
    # of them. Unset: the edit set's locality prompts (the reference's choice).
    background_texts: str | None = None

    def __post_init__(self) -> None:
        # Where each value came from, for error messages; not a hyperparameter (asdict skips it).
        self.sources: dict[str, str] = {}

    @property
    def layer_index(self) -> int:
        return self._parsed_inner()[1]

    @property
    def module_path(self) -> str:
        prefix, layer, rest = self._parsed_inner()
        return f"{prefix}.{layer}.{rest}"

    @property
    def resolved_update_rule(self) -> str:
        """update_rule with "auto" decided (also for hyperparameters never validated)."""
        if self.update_rule != "auto":
            return self.update_rule
        return "reference" if self.edit_lr is not None or self.n_iter is not None else "adaptive"

    @property
    def reference_lr(self) -> float:
        return 1.0 if self.edit_lr is None else self.edit_lr  # the reference's default

    @property
    def reference_n_iter(self) -> int:
        return 30 if self.n_iter is None else self.n_iter  # the reference's default

    @property
    def torch_device(self) -> str:
        """The device as torch spells it (the reference's `device: 0` is `cuda:0`)."""
        return parse_device(self.device)

    def _parsed_inner(self) -> tuple[str, int, str]:
        match = _INNER_PARAM.match(self.inner_params[0])
        return match["prefix"], int(match["layer"]), match["rest"]

    # ------------------------------------------------------------------ checks

    def origin(self, key: str) -> str:
        """'; set in FILE' or '; set by --FLAG' for messages ('' for a default value)."""
        source = self.sources.get(key)
        if not source:
            # Loaded from a file that does not set it: say so, or the user hunts for a value they never wrote.
            return "; the default value" if self.sources else ""
        return f"; set by {source}" if source.startswith("-") else f"; set in {source}"

    def bad_value(self, key: str, problem: str, allowed: str, value: Any = dataclasses.MISSING,
                  shown: str | None = None) -> HParamsError:
        """The one-line error for a value: `<key>: <value> <problem> (allowed: <range>)`."""
        shown = shown or _show(getattr(self, key) if value is dataclasses.MISSING else value)
        return HParamsError(f"{key}: {shown} {problem} (allowed: {allowed}){self.origin(key)}")

    def _choice(self, key: str, choices: tuple[str, ...]) -> None:
        value = getattr(self, key)
        if value not in choices:
            raise self.bad_value(key, "is not supported", ", ".join(choices))

    def _integer(self, key: str, minimum: int) -> None:
        value = getattr(self, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.bad_value(key, "is not an integer", f"an integer >= {minimum}")
        if value < minimum:
            raise self.bad_value(key, f"is below {minimum}", f"an integer >= {minimum}")

    def _number(self, key: str, low: float, high: float | None = None, low_open: bool = False) -> None:
        value = getattr(self, key)
        allowed = f"{'>' if low_open else '>='} {low:g}" + ("" if high is None else f" and <= {high:g}")
        if high is not None and not low_open:
            allowed = f"{low:g} to {high:g}"
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.bad_value(key, "is not a number", allowed)
        too_low = value <= low if low_open else value < low
        if too_low or (high is not None and value > high) or value != value:  # value != value: NaN
            raise self.bad_value(key, "is out of range", allowed)

    def _flag(self, key: str) -> None:
        if not isinstance(getattr(self, key), bool):
            raise self.bad_value(key, "is not a boolean", "true, false")

    def validate(self) -> "MemoirHyperParams":
        from vllm_memoir.core import AGGREGATIONS  # here, not at the top: the CLI checks its paths before torch loads

        if self.alg_name != "MEMOIR":
            raise self.bad_value("alg_name", "is another method; this tool runs MEMOIR", "MEMOIR")
        example = "['model.layers[27].mlp.down_proj.weight']"
        inner = self.inner_params
        if not isinstance(inner, list) or len(inner) != 1 or not isinstance(inner[0], str) or not _INNER_PARAM.match(inner[0]):
            raise self.bad_value("inner_params", "does not name one layer's weight", f"one entry like {example}")
        if not _INNER_PARAM.match(inner[0])["rest"].startswith("mlp.down_proj"):
            raise self.bad_value("inner_params", "is not an MLP down_proj: MEMOIR edits a down_proj", f"one entry like {example}")
        parse_device(self.device, self)
        self._choice("objective_optimization", ("only_label",))
        self._choice("prompt_feature_agg", AGGREGATIONS)
        self._choice("weight_decay_scope", ("all", "masked"))
        self._choice("lr_scaling", ("none", "activation"))
        self._choice("update_rule", ("auto", "adaptive", "reference"))
        self._choice("update_projection", ("none", "null_space"))
        self._choice("failed_edits", ("keep", "roll_back"))
        self.update_rule = self.resolved_update_rule
        if self.update_rule == "reference":
            self.edit_lr, self.n_iter = self.reference_lr, self.reference_n_iter
        self._choice("dtype", DTYPES)
        self._choice("routing_span", ("prompt", "last_user_message"))
        if self.routing_span == "last_user_message" and self.prompt_feature_agg == "last":
            raise self.bad_value("routing_span", "needs prompt_feature_agg mean or mean_decentered, not 'last'",
                                 "prompt, last_user_message")
        self._integer("top_k", 1)
        if self.n_iter is not None:
            self._integer("n_iter", 1)
        self._integer("max_steps_per_edit", 1)
        self._integer("num_background_texts", 1)
        self._integer("checkpoint_every", 1)
        self._integer("seed", 0)
        if self.edit_lr is not None:
            self._number("edit_lr", 0, low_open=True)
        self._number("edit_loss_target", 0, low_open=True)
        self._number("adaptive_step_limit", 0)
        self._number("null_space_threshold", 0, 1, low_open=True)
        self._number("null_space_min_room", 0, 1)
        if self.null_space_min_room >= 1:
            raise self.bad_value("null_space_min_room", "leaves nothing protected (use update_projection: none)",
                                 ">= 0 and < 1")
        self._number("irr_threshold", 0, 1)
        self._number("route_margin", 0, 1)
        self._integer("background_components", 0)
        if self.background_components and self.prompt_feature_agg != "mean_decentered":
            raise self.bad_value("background_components", "needs prompt_feature_agg mean_decentered (it removes "
                                 "directions of the background's spread around its mean)", "0")
        if (self.background_components and not self.dir_background_features
                and self.background_components >= self.num_background_texts):
            raise self.bad_value("background_components", f"needs more background texts than components "
                                 f"(num_background_texts is {self.num_background_texts})",
                                 f"below {self.num_background_texts}, or raise num_background_texts")
        self._number("weight_decay", 0)
        self._number("grad_clip", 0, low_open=True)
        self._number("early_stop_delta", 0)
        self._number("early_stop_loss", 0)
        for key in ("RUN_SAVE_BACKGROUND_FEATURES", "fast_loop", "model_parallel", "use_chat_template"):
            self._flag(key)
        # Accepted so the reference's files load, but this tool has no such mode: say so rather than ignore it.
        if self.model_parallel:
            raise self.bad_value("model_parallel", "is not supported: the edit job runs on one device", "false")
        for key in ("dir_background_features", "dir_to_save_background_features", "model_name", "background_texts"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise self.bad_value(key, "is not a path or name", "a string")
        return self

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_dict(
        cls, obj: dict[str, Any], where: str = "hparams", overrides: dict[str, tuple[Any, str]] | None = None
    ) -> "MemoirHyperParams":
        """Build from a mapping of the YAML's keys; `overrides` maps key -> (value, flag that set it)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(obj) - known)
        if unknown:
            hints = "".join(f" ({name}: did you mean {', '.join(close)}?)" for name in unknown if (close := close_keys(name)))
            raise HParamsError(f"{where}: unknown keys {unknown}{hints}; known keys are {sorted(known)}")
        values = dict(obj)
        sources = {key: where for key in obj}
        for key, (value, flag) in (overrides or {}).items():
            if key not in known:
                raise unknown_key_error(key, flag)
            values[key], sources[key] = value, flag
        hp = cls(**{key: _coerce(cls, key, value) for key, value in values.items()})
        hp.sources = sources
        return hp.validate()

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: dict[str, tuple[Any, str]] | None = None) -> "MemoirHyperParams":
        path = Path(path)
        if not path.is_file():
            raise HParamsError(f"{path}: hyperparameter file not found" if not path.exists() else f"{path}: not a file")
        try:
            obj = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise HParamsError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None
        if not isinstance(obj, dict):
            raise HParamsError(f"{path}: expected a YAML mapping of hyperparameters")
        return cls.from_dict(obj, str(path), overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------- helpers


def hyperparameter_names() -> list[str]:
    return [f.name for f in dataclasses.fields(MemoirHyperParams)]


def close_keys(name: str) -> list[str]:
    """Known keys that look like `name` (edit_rate -> edit_lr; top-k -> top_k)."""
    names = hyperparameter_names()
    normalized = name.replace("-", "_")
    exact = [known for known in names if known.lower() == normalized.lower()]
    return exact or difflib.get_close_matches(normalized, names, n=3, cutoff=0.6)


def unknown_key_error(key: str, flag: str) -> HParamsError:
    close = close_keys(key)
    hint = f"did you mean {', '.join(close)}?" if close else f"known keys: {', '.join(hyperparameter_names())}"
    return HParamsError(f"{flag}: unknown hyperparameter {key!r}; {hint}")


def parse_override(text: str, flag: str = "--set") -> tuple[str, Any]:
    """'KEY=VALUE' with VALUE read as a YAML scalar (4096, 0.4, true, null, 1e-5, a path)."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise HParamsError(f"{flag} {text!r}: expected KEY=VALUE, e.g. {flag} top_k=4096")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # e.g. an unbalanced bracket in a path: keep the text as it is
    return key, value


def parse_device(value: Any, hp: MemoirHyperParams | None = None) -> str:
    """The reference's device (an integer GPU index) or a torch device string, as torch spells it."""
    problem = None
    if isinstance(value, bool):
        problem = "is not a device"
    elif isinstance(value, int):
        if value >= 0:
            return f"cuda:{value}"
        problem = "is not a GPU index"
    elif isinstance(value, str):
        text = value.strip().lower()
        if text.isdigit():
            return f"cuda:{int(text)}"
        if text == "cpu" or _CUDA_DEVICE.match(text):
            return text
        problem = "is not a device"
    else:
        problem = "is not a device"
    allowed = "a GPU index like 0, cpu, cuda, cuda:N"
    if hp is not None:
        raise hp.bad_value("device", problem, allowed, value)
    raise HParamsError(f"device: {_show(value)} {problem} (allowed: {allowed})")


def _coerce(cls, key: str, value: Any) -> Any:
    """Accept what YAML and command lines produce for numbers and flags ('1e-5' is a string in YAML 1.1)."""
    kind = {f.name: f.type for f in dataclasses.fields(cls)}[key].removesuffix(" | None")
    if kind == "float" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if kind == "int" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if kind == "bool" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if kind == "list[str]" and isinstance(value, str):
        return [value]  # --set inner_params=model.layers[3].mlp.down_proj.weight
    return value


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."
