"""A transformers model with a MEMOIR layer: the reference for training, evaluation and parity.

Unlike the research code (batch size 1), every row of a batch routes on its own: the first
forward of a batch (the prompt) decides each row's route from its prompt positions, and
later forwards (generated tokens) reuse it.

An artifact may route on part of the prompt (its routing span: the last user message of a chat
template, vllm_memoir/core/route_span.py) and may have been edited on prompts wrapped in the
model's chat template (`use_chat_template`); both are read from the artifact and applied to
every prompt this model edits, scores, routes or generates from.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from vllm_memoir.core import NO_ROUTE, MemoirArtifact, aggregate_prompt_feature, load_artifact, masked_residual, residual_by_route
from vllm_memoir.core.artifact import ArtifactManifest, base_fingerprint
from vllm_memoir.core.compatibility import check_artifact_fits_model, check_fingerprint
from vllm_memoir.core.route_span import RouteSpan
from vllm_memoir.core.routing import EditRouter, RouteDecision

logger = logging.getLogger(__name__)


@dataclass
class RoutingCall:
    """The routing state of one call (MemoirHFModel.routing): what the prompt forward decides
    and the later forwards of the same call (generated tokens) reuse."""

    prompt_mask: torch.Tensor | None  # [B, T]; None once the prompt forward has decided
    input_ids: torch.Tensor | None = None  # the deciding forward's token ids (for the routing span)
    routes: torch.Tensor | None = None  # [B] route per row
    decisions: list[RouteDecision] = field(default_factory=list)


class ReferenceMemoirDownProj(nn.Module):
    """down_proj plus the residual memory: out = W0 x + W_m (m * x).

    Three states: training (one fixed mask for every row), routed inference (per-row
    routes decided on the prompt forward of a MemoirHFModel.routing call) and off (exactly
    the base layer; also outside any routing call). vLLM's counterpart is
    vllm_memoir.routing.layer.MemoirDownProj.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        self.memory = nn.Parameter(
            torch.zeros_like(base.weight, dtype=torch.float32), requires_grad=False
        )
        self.train_indices: torch.Tensor | None = None
        self.router: EditRouter | None = None
        self.route_span = RouteSpan()
        self.call: RoutingCall | None = None  # set only inside MemoirHFModel.routing()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.train_indices is not None:
            return out + masked_residual(x, self.memory.to(x.dtype), self.train_indices)
        call = self.call
        if self.router is None or call is None:
            return out
        if call.prompt_mask is not None:
            self._decide_routes(x, call)
        if call.routes is None or bool((call.routes == NO_ROUTE).all()):
            return out
        token_routes = call.routes.to(x.device).unsqueeze(1).expand(x.shape[0], x.shape[1]).reshape(-1)
        flat_x = x.reshape(-1, x.shape[-1])
        residual = residual_by_route(flat_x, self.memory, token_routes, self.router.masks)
        out = out.clone()
        flat_out = out.view(-1, out.shape[-1])
        routed = (token_routes != NO_ROUTE).nonzero().flatten()
        flat_out[routed] = flat_out[routed] + residual[routed]
        return out

    def _decide_routes(self, x: torch.Tensor, call: RoutingCall) -> None:
        mask, ids = call.prompt_mask, call.input_ids
        call.prompt_mask = call.input_ids = None
        if not self.route_span.whole_prompt:
            if ids is None:
                raise ValueError("routing on the last user message needs the forward's input_ids (not inputs_embeds)")
            mask = self.route_span.mask(ids, mask)
        features = aggregate_prompt_feature(x, mask, self.router.aggregation, self.router.background_mean)
        call.decisions = self.router.route_features(features)
        call.routes = torch.tensor([d.route for d in call.decisions], dtype=torch.int64)


@dataclass
class ScoredRow:
    target_ids: list[int]
    predicted_ids: list[int]  # argmax at each target position (teacher forcing)
    target_logprobs: list[float]

    @property
    def accuracy(self) -> float:
        hits = sum(p == t for p, t in zip(self.predicted_ids, self.target_ids))
        return hits / max(len(self.target_ids), 1)


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as exc:
        raise ValueError(f"the model has no module {path!r} ({exc})") from exc


class MemoirHFModel:
    """A causal LM whose down_proj at `module_path` carries a MEMOIR memory."""

    def __init__(self, model: nn.Module, tokenizer, module_path: str, name: str = ""):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.module_path = module_path
        self.name = name
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        target = get_submodule(model, module_path)
        if isinstance(target, ReferenceMemoirDownProj):
            self.layer = target
        else:
            if not isinstance(target, nn.Linear):
                raise ValueError(f"{module_path} is a {type(target).__name__}, expected a Linear down_proj")
            self.layer = ReferenceMemoirDownProj(target)
            parent_path, _, child = module_path.rpartition(".")
            setattr(get_submodule(model, parent_path), child, self.layer)
        for param in model.parameters():
            param.requires_grad_(False)
        self.artifact: MemoirArtifact | None = None
        self.use_chat_template = False

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        artifact: str | Path | MemoirArtifact | None = None,
        module_path: str | None = None,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> "MemoirHFModel":
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        if artifact is not None and not isinstance(artifact, MemoirArtifact):
            artifact = load_artifact(artifact)
        if module_path is None:
            if artifact is None:
                raise ValueError("give module_path or an artifact")
            module_path = artifact.manifest.module_path
        wrapped = cls(model, tokenizer, module_path, name=str(model_dir))
        if artifact is not None:
            wrapped.load(artifact)
        return wrapped

    # --- artifact -------------------------------------------------------------------------

    def fingerprint(self) -> str:
        return base_fingerprint(self.layer.base.weight, self.model.config.to_dict())

    def load(self, artifact: MemoirArtifact) -> None:
        """Put an artifact's memory and masks in place, after checking it fits this model
        (core.compatibility: the checks the server runs at start-up, TP 1)."""
        manifest = artifact.manifest
        if manifest.module_path != self.module_path:
            raise ValueError(f"artifact edits {manifest.module_path}, this model wraps {self.module_path}")
        where = f"artifact for {manifest.base_model}"
        check_artifact_fits_model(manifest, self.model.config.to_dict(), self.layer.base.weight.dtype, where=where)
        check_fingerprint(manifest, self.fingerprint(), where)
        if tuple(artifact.memory.shape) != tuple(self.layer.base.weight.shape):  # an artifact built in memory
            raise ValueError(
                f"artifact memory shape {tuple(artifact.memory.shape)} != down_proj weight {tuple(self.layer.base.weight.shape)}"
            )
        device = self.layer.base.weight.device
        self.layer.memory.data = artifact.memory.to(device, torch.float32).clone()
        self.layer.router = EditRouter(artifact, device)
        self.artifact = artifact
        self.use_prompt_format(manifest)

    def use_prompt_format(self, manifest: ArtifactManifest) -> None:
        """Wrap prompts in the chat template and route on the span as `manifest` says."""
        use_chat = bool(manifest.hparams.get("memoir", {}).get("use_chat_template", False))
        self.set_prompt_format(use_chat, manifest.route_span())

    def set_prompt_format(self, use_chat_template: bool, route_span: RouteSpan) -> None:
        if use_chat_template and not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"use_chat_template: the tokenizer of {self.name or 'this model'} has no chat template")
        self.use_chat_template = use_chat_template
        self.layer.route_span = route_span

    @property
    def route_span(self) -> RouteSpan:
        return self.layer.route_span

    def route_mask(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        """prompt_mask [B, T] narrowed to each row's routing span (unchanged for span 'prompt')."""
        return self.layer.route_span.mask(input_ids, prompt_mask)

    @contextmanager
    def routing_off(self):
        router, self.layer.router = self.layer.router, None
        try:
            yield self
        finally:
            self.layer.router = router

    @contextmanager
    def routing(self, prompt_mask: torch.Tensor):
        """Route the forwards of `self.model` inside: the first decides each row's route from its
        positions in `prompt_mask` [B, T] (narrowed to the routing span), later ones (generated
        tokens) reuse it. Yields the RoutingCall, whose `decisions` hold the routes once the
        first forward has run; outside the block the layer is the base layer again.
        """
        if self.layer.call is not None:
            raise RuntimeError("MemoirHFModel.routing() calls do not nest")
        call = RoutingCall(prompt_mask)
        # The routing span needs the deciding forward's token ids: the input embedding sees
        # them whoever calls the model (forward or generate).
        hook = self.model.get_input_embeddings().register_forward_pre_hook(partial(_see_input_ids, call))
        self.layer.call = call
        try:
            yield call
        finally:
            self.layer.call = None
            hook.remove()

    # --- tokenization ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.layer.base.weight.device

    def chat_text(self, messages: list[dict[str, str]]) -> str:
        """The chat template's text for `messages`, ending with the assistant's header (what
        vLLM's /v1/chat/completions renders)."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation as vLLM's chat endpoint builds them: the template's text,
        tokenized without adding special tokens (the template holds them)."""
        return self.tokenizer(self.chat_text(messages), add_special_tokens=False)["input_ids"]

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.use_chat_template:
            return self.chat_ids([{"role": "user", "content": prompt}])
        return self.tokenizer(prompt)["input_ids"]

    def prompt_target_ids(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        """Token ids of prompt and of target as it continues `prompt + ' ' + target` (with the
        chat template: as the assistant's answer, right after its header)."""
        prompt_ids = self.prompt_ids(prompt)
        if self.use_chat_template:
            full = self.tokenizer(self.chat_text([{"role": "user", "content": prompt}]) + target,
                                  add_special_tokens=False)["input_ids"]
        else:
            full = self.tokenizer(f"{prompt} {target}")["input_ids"]
        if full[: len(prompt_ids)] != prompt_ids or len(full) == len(prompt_ids):
            raise ValueError(f"cannot split {prompt!r} + {target!r} into prompt and target tokens")
        return prompt_ids, full[len(prompt_ids):]

    def pad(self, rows: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) [B, T] of token-id rows, padded on the left (for
        generation) or right, on this model's device."""
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(width - len(row), width) if left else slice(0, len(row))
            ids[i, span] = torch.tensor(row)
            attention[i, span] = 1
        return ids.to(self.device), attention.to(self.device)

    # --- inference ------------------------------------------------------------------------

    @torch.no_grad()
    def route(self, prompts: list[str]) -> list[RouteDecision]:
        """Each prompt's routing decision (what serving would decide)."""
        return self.route_ids([self.prompt_ids(p) for p in prompts])

    @torch.no_grad()
    def route_ids(self, prompts: list[list[int]]) -> list[RouteDecision]:
        """route() for prompts given as token ids (e.g. a whole conversation, templated)."""
        if self.layer.router is None:
            return [RouteDecision(NO_ROUTE, NO_ROUTE, 0.0) for _ in prompts]
        ids, attention = self.pad(prompts, left=False)
        with self.routing(attention.bool()) as call:
            self.model(input_ids=ids, attention_mask=attention, use_cache=False)
        return list(call.decisions)

    @torch.no_grad()
    def prompt_features(self, prompts: list[str], aggregation: str = "mean", background: torch.Tensor | None = None,
                        batch_size: int = 16) -> torch.Tensor:
        """[N, D] float32 prompt features (on the CPU) at the edited layer, routing off: each
        prompt's base down_proj inputs over its routing span, aggregated as `aggregation` says
        (core.aggregate_prompt_feature; `background` for 'mean_decentered')."""
        if not prompts:
            raise ValueError("prompt features need at least one prompt")
        captured: list[torch.Tensor] = []
        handle = self.layer.base.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
        features = []
        try:
            with self.routing_off():
                for start in range(0, len(prompts), batch_size):
                    ids, attention = self.pad([self.prompt_ids(p) for p in prompts[start:start + batch_size]])
                    captured.clear()
                    self.model(input_ids=ids, attention_mask=attention, use_cache=False)
                    mask = self.route_mask(ids, attention.bool())
                    features.append(aggregate_prompt_feature(captured[0], mask, aggregation, background).cpu())
        finally:
            handle.remove()
        return torch.cat(features)

    @torch.no_grad()
    def score(self, prompts: list[str], targets: list[str]) -> list[ScoredRow]:
        """Teacher-forced predictions of each target given its prompt (routed on the prompt)."""
        return self.score_ids([self.prompt_target_ids(p, t) for p, t in zip(prompts, targets)])

    @torch.no_grad()
    def score_ids(self, split: list[tuple[list[int], list[int]]]) -> list[ScoredRow]:
        """score() for (prompt ids, target ids) pairs."""
        ids, attention = self.pad([p + t for p, t in split], left=False)
        prompt_mask = torch.zeros_like(attention, dtype=torch.bool)
        for i, (p, _) in enumerate(split):
            prompt_mask[i, : len(p)] = True
        with self.routing(prompt_mask):
            logits = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()
        logprobs = torch.log_softmax(logits, dim=-1)
        rows = []
        for i, (p, t) in enumerate(split):
            positions = torch.arange(len(p) - 1, len(p) - 1 + len(t), device=logits.device)
            target = torch.tensor(t, device=logits.device)
            rows.append(
                ScoredRow(
                    target_ids=list(t),
                    predicted_ids=logits[i, positions].argmax(-1).tolist(),
                    target_logprobs=logprobs[i, positions, target].tolist(),
                )
            )
        return rows

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 16, stop_at_eos: bool = True) -> list[list[int]]:
        """Greedy continuation token ids per prompt (left-padded batch, per-row routes)."""
        ids, attention = self.pad([self.prompt_ids(p) for p in prompts], left=True)
        with self.routing(attention.bool()):
            out = self.model.generate(
                input_ids=ids,
                attention_mask=attention,
                max_new_tokens=max_new_tokens,
                min_new_tokens=0 if stop_at_eos else max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id if stop_at_eos else None,
            )
        new = out[:, ids.shape[1]:].tolist()
        eos = self.tokenizer.eos_token_id
        result = []
        for row in new:
            if stop_at_eos and eos in row:
                row = row[: row.index(eos) + 1]
            result.append(row)
        return result

    @torch.no_grad()
    def not_greedy(self, rows: list[tuple[list[int], list[int]]], chunk: int = 64) -> list[int]:
        """Indices of (prompt ids, completion ids) rows whose completion is not this model's greedy one.

        One teacher-forced forward per chunk, routed on the prompt: a completion is the greedy
        continuation exactly when each of its tokens is the argmax after the tokens before it.
        Far cheaper than generating, so servers' long answers can be checked in bulk.
        """
        bad = []
        for first in range(0, len(rows), chunk):
            part = rows[first:first + chunk]
            ids, attention = self.pad([p + c for p, c in part], left=False)
            prompt_mask = torch.zeros_like(attention, dtype=torch.bool)
            for i, (p, _) in enumerate(part):
                prompt_mask[i, : len(p)] = True
            with self.routing(prompt_mask):
                predicted = self.model(input_ids=ids, attention_mask=attention, use_cache=False).logits.argmax(-1)
            bad += [first + i for i, (p, c) in enumerate(part)
                    if predicted[i, len(p) - 1: len(p) - 1 + len(c)].tolist() != c]
        return bad

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def _see_input_ids(call: RoutingCall, _module, args) -> None:
    if call.prompt_mask is not None and args:
        call.input_ids = args[0]
