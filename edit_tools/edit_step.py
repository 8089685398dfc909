"""One MEMOIR edit: build its batch, pick its mask, train its columns of W_m.

Two equivalent loops:
- `full`: every step runs the whole model on all rows (the reference's way).
- `fast`: layers below the edited one, the edited layer's attention and its base MLP do not
  depend on W_m, so they run once; each step only adds the masked residual and runs the
  layers above, producing logits at target positions alone. The irrelevant row is outside
  the loss and rows do not interact, so it is not run at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vllm_memoir.core import aggregate_prompt_feature, masked_residual, tophash_indices
from vllm_memoir.core.route_span import RouteSpan

from .chat_markers import route_span_for
from .hf_model import MemoirHFModel, get_submodule
from .hparams import MemoirHyperParams


class _StopForward(Exception):
    """Raised by a hook once everything the fast loop needs has been captured."""


@dataclass
class EditBatch:
    input_ids: torch.Tensor  # [R, T], right-padded; edit rows first, then the irrelevant row (if any)
    attention_mask: torch.Tensor  # [R, T]
    prompt_mask: torch.Tensor  # [R, T] True on prompt tokens
    target_rows: torch.Tensor  # [N] row of each target token (edit rows only)
    target_positions: torch.Tensor  # [N] position whose logits predict that token
    target_ids: torch.Tensor  # [N]
    num_edit_rows: int


@dataclass
class EditResult:
    mask_indices: torch.Tensor  # [k] active columns of W_m
    losses: list[float] = field(default_factory=list)
    lr: float = 0.0


def apply_prompt_format(hf: MemoirHFModel, hp: MemoirHyperParams) -> RouteSpan:
    """Make `hf` edit prompts as `hp` says (chat template or plain text, routing span); returns
    the span, with the chat template's marker ids, for the artifact to record."""
    span = route_span_for(hp.routing_span, hf.tokenizer)
    hf.set_prompt_format(hp.use_chat_template, span)
    return span


def build_edit_batch(hf: MemoirHFModel, prompt: str, target: str, templates: list[str], irrelevant: str | None) -> EditBatch:
    """The edit under each context template (bare template first), plus the irrelevant text.

    With the chat template, each templated prompt is the user message and the target the answer.
    """
    rows, prompt_lens = [], []
    for template in templates:
        prompt_ids, target_ids = hf.prompt_target_ids(template.format(prompt), target)
        rows.append(prompt_ids + target_ids)
        prompt_lens.append(len(prompt_ids))
    num_edit_rows = len(rows)
    if irrelevant:
        ids = hf.prompt_ids(irrelevant)
        rows.append(ids)
        prompt_lens.append(len(ids))
    input_ids, attention = hf.pad(rows, left=False)
    prompt_mask = torch.zeros_like(attention, dtype=torch.bool)
    target_rows, target_positions, target_tokens = [], [], []
    for r, (row, plen) in enumerate(zip(rows, prompt_lens)):
        prompt_mask[r, :plen] = True
        if r < num_edit_rows:
            for pos in range(plen, len(row)):
                target_rows.append(r)
                target_positions.append(pos - 1)
                target_tokens.append(row[pos])
    device = input_ids.device
    return EditBatch(
        input_ids=input_ids,
        attention_mask=attention,
        prompt_mask=prompt_mask,
        target_rows=torch.tensor(target_rows, device=device),
        target_positions=torch.tensor(target_positions, device=device),
        target_ids=torch.tensor(target_tokens, device=device),
        num_edit_rows=num_edit_rows,
    )


def target_loss(logits: torch.Tensor, batch: EditBatch) -> torch.Tensor:
    """Per-row mean cross-entropy over target tokens, averaged over the edit rows.

    logits: [N, V] at the target positions, in the order of batch.target_ids.
    """
    token_loss = nn.functional.cross_entropy(logits.float(), batch.target_ids, reduction="none")
    rows = batch.target_rows
    per_row = torch.zeros(batch.num_edit_rows, device=logits.device).index_add(0, rows, token_loss)
    counts = torch.zeros(batch.num_edit_rows, device=logits.device).index_add(0, rows, torch.ones_like(token_loss))
    return (per_row / counts).mean()


class _LayerStack:
    """Handles on the decoder stack around the edited layer."""

    def __init__(self, hf: MemoirHFModel, layer_index: int):
        container_path = hf.module_path.split(f".{layer_index}.")[0]
        self.layers = get_submodule(hf.model, container_path)
        self.body = get_submodule(hf.model, container_path.rpartition(".")[0])
        self.edited = self.layers[layer_index]
        self.above = list(self.layers[layer_index + 1:])
        self.lm_head = hf.model.get_output_embeddings()


@dataclass
class _Captured:
    h_attn: torch.Tensor  # residual stream entering the edited layer's MLP
    x: torch.Tensor  # down_proj input
    base_out: torch.Tensor  # down_proj base output (no residual)
    layer_kwargs: dict  # what the layers above are called with (mask, rotary embeddings, ...)


@torch.no_grad()
def _capture(hf: MemoirHFModel, stack: _LayerStack, batch: EditBatch, rows: slice) -> _Captured:
    seen: dict = {}

    def on_mlp_norm(_module, args):
        seen["h_attn"] = args[0]

    def on_down_proj(_module, args, out):
        seen["x"], seen["base_out"] = args[0], out
        if not stack.above:
            raise _StopForward

    def on_next_layer(_module, args, kwargs):
        seen["layer_kwargs"] = dict(kwargs)
        raise _StopForward

    handles = [
        stack.edited.post_attention_layernorm.register_forward_pre_hook(on_mlp_norm),
        hf.layer.base.register_forward_hook(on_down_proj),
    ]
    if stack.above:
        handles.append(stack.above[0].register_forward_pre_hook(on_next_layer, with_kwargs=True))
    try:
        with hf.routing_off():
            stack.body(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows], use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return _Captured(seen["h_attn"], seen["x"], seen["base_out"], seen.get("layer_kwargs", {}))


def _fast_logits(stack: _LayerStack, cap: _Captured, memory: torch.Tensor, indices: torch.Tensor, batch: EditBatch):
    mlp_out = cap.base_out + masked_residual(cap.x, memory.to(cap.x.dtype), indices)
    hidden = cap.h_attn + mlp_out
    for layer in stack.above:
        hidden = layer(hidden, **cap.layer_kwargs)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    picked = hidden[batch.target_rows, batch.target_positions]
    return stack.lm_head(stack.body.norm(picked))


def _full_logits(hf: MemoirHFModel, batch: EditBatch):
    logits = hf.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
    return logits[batch.target_rows, batch.target_positions]


def apply_edit(
    hf: MemoirHFModel,
    hp: MemoirHyperParams,
    batch: EditBatch,
    permutation: torch.Tensor,
    background_mean: torch.Tensor | None,
    fast: bool = True,
) -> EditResult:
    """Train this edit's columns of hf.layer.memory in place; return its mask and losses."""
    stack = _LayerStack(hf, hp.layer_index)
    edit_rows = slice(0, batch.num_edit_rows)
    cap = _capture(hf, stack, batch, edit_rows)
    # The mask comes from the bare edit row's prompt tokens (its routing span of them).
    route_mask = hf.route_mask(batch.input_ids[:1], batch.prompt_mask[:1])
    feature = aggregate_prompt_feature(cap.x[:1], route_mask, hp.prompt_feature_agg, background_mean)
    indices = tophash_indices(feature, hp.top_k, permutation)[0].to(cap.x.device)

    lr = hp.edit_lr
    if hp.lr_scaling == "activation":
        # A step on W_m moves the output by about lr * |x_masked|^2 per unit gradient:
        # dividing by it makes the step size independent of the activation scale.
        live = batch.attention_mask[edit_rows].bool()
        lr = hp.edit_lr / float(cap.x[live][:, indices].float().pow(2).sum(-1).mean().clamp(min=1e-12))

    memory = hf.layer.memory
    memory.requires_grad_(True)
    decay_all = hp.weight_decay_scope == "all"
    optimizer = torch.optim.SGD([memory], lr=lr, weight_decay=hp.weight_decay if decay_all else 0.0)
    hf.layer.train_indices = indices
    losses: list[float] = []
    try:
        for _ in range(hp.n_iter):
            optimizer.zero_grad(set_to_none=True)
            logits = _fast_logits(stack, cap, memory, indices, batch) if fast else _full_logits(hf, batch)
            loss = target_loss(logits, batch)
            losses.append(loss.item())
            if len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= hp.early_stop_delta and losses[-1] <= hp.early_stop_loss:
                break
            loss.backward()
            torch.nn.utils.clip_grad_norm_([memory], hp.grad_clip)
            optimizer.step()
            if not decay_all and hp.weight_decay:
                with torch.no_grad():
                    memory[:, indices] *= 1.0 - lr * hp.weight_decay
    finally:
        hf.layer.train_indices = None
        memory.requires_grad_(False)
        memory.grad = None
    return EditResult(mask_indices=indices.cpu(), losses=losses, lr=lr)
