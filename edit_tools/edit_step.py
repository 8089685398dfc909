"""One MEMOIR edit: build its batch, pick its mask, train its columns of W_m.

Two steps (hparams.update_rule): the reference's SGD at a fixed learning rate for a fixed number
of steps, or the adaptive step (`adaptive_descent`), which sizes each step from the loss and
the gradient so that it works at any activation scale, and stops once the edit's loss target
is met. Either way the result says whether the edit took: every target token is the model's top
prediction on every row of the edit once it is trained (its own teacher-forced Rel is 1.0).

With update_projection "null_space", each step's gradient on the edit's columns is first
projected away from the dominant directions of earlier edits' keys (`EarlierKeys`), so that the
memory's output on them stays as it was.

Two equivalent loops:
- `full`: every step runs the whole model on all rows (the reference's way).
- `fast`: layers below the edited one, the edited layer's attention and its base MLP do not
  depend on W_m, so they run once; each step only adds the masked residual and runs the
  layers above, producing logits at target positions alone. The irrelevant row is outside
  the loss and rows do not interact, so it is not run at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from vllm_memoir.core import aggregate_prompt_feature, masked_residual, remove_background_components, tophash_indices
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
    losses: list[float] = field(default_factory=list)  # the loss before each step
    lr: float = 0.0  # the reference step's learning rate (0 for the adaptive step)
    final_loss: float = float("nan")  # the loss with the memory as the edit leaves it
    took: bool = False  # every target token is the argmax on every edit row, after training
    steps: int = 0  # updates of the memory (the adaptive step's undone ones included)
    keys: torch.Tensor | None = None  # [n, k] down_proj inputs at the target positions, on the mask's columns
    rolled_back: bool = False  # hparams failed_edits "roll_back": it did not take and W_m is as before it

    def outcome(self) -> dict:
        """What the edit record stores about the training of this edit."""
        outcome = {"loss": round(self.final_loss, 6), "steps": self.steps, "took": self.took}
        if self.rolled_back:
            outcome["rolled_back"] = True
        return outcome


def polyak_step_size(loss: float, grad_sq_norm: float, scale: float) -> float:
    """scale * loss / |grad|^2: the step that, to first order, brings the loss to zero.

    Scaling the activations by c scales the gradient by c and the curvature by c^2, so this
    step scales by 1/c^2 and moves the output by the same amount at any scale (tested).
    """
    return scale * loss / max(grad_sq_norm, 1e-30)


MIN_SCALE = 2.0 ** -10
STALL_STEPS, STALL_GAIN = 3, 0.01  # stop after 3 steps that each lowered the loss by < 1%


def _stalled(losses: list[float]) -> bool:
    """The loss has a floor above the target (e.g. a final norm bounds the logits): stop there."""
    recent = losses[-STALL_STEPS - 1:]
    return len(recent) > STALL_STEPS and all(b > a * (1 - STALL_GAIN) for a, b in zip(recent, recent[1:]))


class EarlierKeys:
    """The covariance K^T K of earlier edits' keys (float64, [D, D]): what update_projection
    "null_space" protects. A key is an edit's down_proj input at a target position, zero
    outside its mask; W_m's output there is W_m @ key, so an update dW of this edit's columns
    leaves it alone when dW's rows are orthogonal to the key's part on those columns."""

    def __init__(self, dim: int, covariance: torch.Tensor | None = None, count: int = 0):
        self.covariance = torch.zeros(dim, dim, dtype=torch.float64) if covariance is None else covariance
        self.count = count  # keys added (recorded with the checkpoint)

    def add(self, indices: torch.Tensor, keys: torch.Tensor) -> None:
        """Add an edit's keys: [n, k] inputs on its mask's columns `indices` ([k])."""
        cols = indices.cpu()
        block = keys.detach().to("cpu", torch.float64)
        self.covariance[cols.unsqueeze(1), cols.unsqueeze(0)] += block.T @ block
        self.count += block.shape[0]

    def projector(self, indices: torch.Tensor, threshold: float, min_room: float = 0.0) -> torch.Tensor | None:
        """[k, k] projection onto the directions of the columns `indices` that earlier keys do
        not dominate (eigenvalue <= threshold x the largest), and at least min_room x k of them:
        the ones earlier keys use least; None when no key touches them."""
        cols = indices.cpu()
        block = self.covariance[cols.unsqueeze(1), cols.unsqueeze(0)]
        values, vectors = torch.linalg.eigh(block)  # ascending
        if values[-1] <= 0:
            return None
        first_protected = max(int((values <= threshold * values[-1]).sum()), math.ceil(min_room * len(cols)))
        protected = vectors[:, first_protected:]
        eye = torch.eye(len(cols), dtype=torch.float64)
        return (eye - protected @ protected.T).float()


def project_update(grad_columns: torch.Tensor, projector: torch.Tensor | None) -> torch.Tensor:
    """A [hidden, k] update of this edit's columns with each row projected by `projector`
    (symmetric): its output on the protected directions is zero. None: unchanged."""
    if projector is None:
        return grad_columns
    return grad_columns @ projector.to(grad_columns.device, grad_columns.dtype)


def adaptive_descent(loss_and_grad, params: torch.Tensor, target: float, max_iter: int, decay: float = 0.0,
                     step_limit=None) -> list[float]:
    """Polyak steps on `params` (in place) until loss_and_grad(params) <= target, at most max_iter steps.

    loss_and_grad: params -> (loss float, grad tensor like params). A step that raises the loss
    (or makes it non-finite) is undone and retried at half the size; the scale stays halved,
    since the loss was less linear there than the step assumed. It also stops when the loss
    stalls (`_stalled`; undone steps count as no gain) or the scale falls below MIN_SCALE.
    step_limit: grad -> the largest step allowed (a trust region), scaled like the step.
    decay: a decoupled factor (1 - decay) on params per accepted step (the reference's weight
    decay without its learning rate).
    Returns the loss before each step and, last, the loss of the params it leaves.
    """
    losses: list[float] = []
    scale = 1.0
    best_loss, best_params, best_grad = float("inf"), params.detach().clone(), None
    for step in range(max_iter + 1):
        loss, grad = loss_and_grad(params)
        if not loss < best_loss:  # worse, or NaN: back to the last accepted params, smaller step
            with torch.no_grad():
                params.copy_(best_params)
            scale *= 0.5
            loss, grad = best_loss, best_grad
        else:
            best_loss, best_grad = loss, grad
            best_params.copy_(params.detach())
        losses.append(loss)
        if loss <= target or step == max_iter or scale < MIN_SCALE or _stalled(losses):
            break
        grad_sq = float(grad.pow(2).sum())
        if grad_sq == 0.0:
            break  # nothing in the masked columns moves the loss: this edit cannot take
        eta = polyak_step_size(loss, grad_sq, scale)
        if step_limit is not None:
            eta = min(eta, scale * step_limit(grad))
        with torch.no_grad():
            params.sub_(eta * grad)
            if decay:
                params.mul_(1.0 - decay)
    return losses


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
    earlier_keys: EarlierKeys | None = None,
    background_basis: torch.Tensor | None = None,
) -> EditResult:
    """Train this edit's columns of hf.layer.memory in place; return its mask, losses and keys.

    earlier_keys: with hp.update_projection "null_space", each step's gradient is projected away
    from their dominant directions on this edit's columns (the caller adds result.keys after)."""
    stack = _LayerStack(hf, hp.layer_index)
    edit_rows = slice(0, batch.num_edit_rows)
    cap = _capture(hf, stack, batch, edit_rows)
    # The mask comes from the bare edit row's prompt tokens (its routing span of them).
    route_mask = hf.route_mask(batch.input_ids[:1], batch.prompt_mask[:1])
    feature = aggregate_prompt_feature(cap.x[:1], route_mask, hp.prompt_feature_agg, background_mean)
    feature = remove_background_components(feature, background_basis)  # the routing key, as served
    indices = tophash_indices(feature, hp.top_k, permutation)[0].to(cap.x.device)

    def logits_now() -> torch.Tensor:
        return _fast_logits(stack, cap, memory, indices, batch) if fast else _full_logits(hf, batch)

    def loss_now() -> torch.Tensor:
        return target_loss(logits_now(), batch)

    memory = hf.layer.memory
    # All of W_m, not only the edit's columns: the reference's weight decay moves every column.
    before = memory.data.clone() if hp.failed_edits == "roll_back" else None
    projector = None
    if hp.update_projection == "null_space" and earlier_keys is not None:
        projector = earlier_keys.projector(indices, hp.null_space_threshold, hp.null_space_min_room)
    hf.layer.train_indices = indices
    try:
        if hp.resolved_update_rule == "adaptive":
            live = batch.attention_mask[edit_rows].bool()
            stream = (cap.h_attn + cap.base_out)[live].float().norm(dim=-1).median().item()
            result = _adaptive_edit(hp, memory, indices, loss_now, cap.x[live], stream, projector)
        else:
            lr = _reference_lr(hp, cap, batch, indices, edit_rows)
            result = _reference_edit(hp, memory, indices, loss_now, lr, projector)
        with torch.no_grad():  # one more forward: the memory as the edit leaves it
            logits = logits_now()
        result.final_loss = target_loss(logits, batch).item()
        result.took = bool((logits.argmax(-1) == batch.target_ids).all())
        if before is not None and not result.took:
            memory.data.copy_(before)
            result.rolled_back = True
    finally:
        hf.layer.train_indices = None
        memory.requires_grad_(False)
        memory.grad = None
    result.mask_indices = indices.cpu()
    result.keys = edit_keys(cap, batch, indices)
    return result


def edit_keys(cap: _Captured, batch: EditBatch, indices: torch.Tensor) -> torch.Tensor:
    """[n, k] the down_proj inputs on the mask's columns at the edit's target positions: where,
    at the last layer, the residual reaches the loss (at a lower layer, also through attention)."""
    return cap.x[batch.target_rows, batch.target_positions][:, indices].detach().cpu()


def _reference_lr(hp: MemoirHyperParams, cap: _Captured, batch: EditBatch, indices: torch.Tensor, edit_rows: slice) -> float:
    if hp.lr_scaling != "activation":
        return hp.reference_lr
    # A step on W_m moves the output by about lr * |x_masked|^2 per unit gradient:
    # dividing by it makes the step size independent of the activation scale.
    live = batch.attention_mask[edit_rows].bool()
    return hp.reference_lr / float(cap.x[live][:, indices].float().pow(2).sum(-1).mean().clamp(min=1e-12))


def _reference_edit(hp: MemoirHyperParams, memory: torch.Tensor, indices: torch.Tensor, loss_now, lr: float,
                    projector: torch.Tensor | None = None) -> EditResult:
    """The reference's loop: SGD (weight decay, grad clip) for n_iter steps or until early stop;
    the gradient of the edit's columns projected first when a projector is given."""
    memory.requires_grad_(True)
    decay_all = hp.weight_decay_scope == "all"
    optimizer = torch.optim.SGD([memory], lr=lr, weight_decay=hp.weight_decay if decay_all else 0.0)
    losses: list[float] = []
    steps = 0
    for _ in range(hp.reference_n_iter):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_now()
        losses.append(loss.item())
        if len(losses) >= 2 and abs(losses[-1] - losses[-2]) <= hp.early_stop_delta and losses[-1] <= hp.early_stop_loss:
            break
        loss.backward()
        if projector is not None:
            memory.grad[:, indices] = project_update(memory.grad[:, indices], projector)
        torch.nn.utils.clip_grad_norm_([memory], hp.grad_clip)
        optimizer.step()
        steps += 1
        if not decay_all and hp.weight_decay:
            with torch.no_grad():
                memory[:, indices] *= 1.0 - lr * hp.weight_decay
    return EditResult(mask_indices=indices, losses=losses, lr=lr, steps=steps)


def _adaptive_edit(hp: MemoirHyperParams, memory: torch.Tensor, indices: torch.Tensor, loss_now,
                   x_live: torch.Tensor, stream_norm: float, projector: torch.Tensor | None = None) -> EditResult:
    """adaptive_descent on this edit's columns of W_m (the only ones the loss depends on)."""
    columns = memory.data[:, indices].clone()
    x_masked = x_live[:, indices].float()

    def step_limit(grad: torch.Tensor) -> float:
        # The largest step moving the residual at any of the edit's tokens by at most
        # adaptive_step_limit x the residual stream's norm: a big step would swamp what the
        # model computes for every later prompt that shares these columns.
        moved = (x_masked @ grad.T).norm(dim=-1).max().item()
        return hp.adaptive_step_limit * stream_norm / max(moved, 1e-30)

    def loss_and_grad(params: torch.Tensor):
        memory.data[:, indices] = params
        memory.requires_grad_(True)
        memory.grad = None
        loss = loss_now()
        loss.backward()
        return loss.item(), project_update(memory.grad[:, indices].clone(), projector)

    # The reference's decay acts on all of W_m; here it shrinks only this edit's columns, since
    # without a learning rate in front of it, decaying every column would erase earlier edits.
    limit = step_limit if hp.adaptive_step_limit > 0 else None
    losses = adaptive_descent(loss_and_grad, columns, hp.edit_loss_target, hp.max_steps_per_edit, decay=hp.weight_decay,
                              step_limit=limit)
    with torch.no_grad():
        memory.data[:, indices] = columns
    return EditResult(mask_indices=indices, losses=losses, steps=len(losses) - 1)
