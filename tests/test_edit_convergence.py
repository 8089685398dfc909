"""The adaptive edit step: its math, that each edit takes with default settings on models of other
shapes and scales, and that each of its settings changes what it should (issue 13)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from edit_tools.datasets import load_edit_dataset
from edit_tools.edit_step import adaptive_descent, polyak_step_size
from edit_tools.editor import run_edit_job
from edit_tools.evaluate import evaluate_edits, score_requests, summarize_scores
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from edit_tools.tiny_models import build_tiny_llama

# ---------------------------------------------------------------- the step's math


def softmax_problem(scale: float, seed: int = 0):
    """Cross-entropy of a fixed class through logits = W (scale * x): W's loss and gradient."""
    gen = torch.Generator().manual_seed(seed)
    x = scale * torch.randn(8, 16, generator=gen)  # 8 rows, 16 inputs
    base = torch.randn(8, 5, generator=gen)  # the base logits: the edit must overturn them
    target = torch.full((8,), 3)

    def loss_and_grad(weight: torch.Tensor):
        weight = weight.detach().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(base + x @ weight.T, target)
        loss.backward()
        return loss.item(), weight.grad

    return loss_and_grad


def test_polyak_step_is_loss_over_squared_gradient_norm():
    assert polyak_step_size(loss=2.0, grad_sq_norm=4.0, scale=1.0) == 0.5
    assert polyak_step_size(loss=2.0, grad_sq_norm=4.0, scale=0.25) == 0.125
    assert polyak_step_size(loss=1.0, grad_sq_norm=0.0, scale=1.0) > 1e20  # finite, no division error


def test_adaptive_descent_does_the_same_at_any_activation_scale():
    # Inputs 1000x apart: the reference's fixed learning rate either barely moves or diverges,
    # the adaptive step takes the same path in output space and meets the target both times.
    runs = {}
    for scale in (0.01, 10.0):
        weight = torch.zeros(5, 16)
        runs[scale] = adaptive_descent(softmax_problem(scale), weight, target=0.05, max_iter=100)
    small, large = runs[0.01], runs[10.0]
    assert small[-1] <= 0.05 and large[-1] <= 0.05
    assert len(small) == len(large)
    assert small == pytest.approx(large, rel=1e-3)
    # The reference's SGD at lr 1 on the small scale: 100 steps and the loss has hardly moved.
    weight = torch.zeros(5, 16)
    loss_and_grad = softmax_problem(0.01)
    first, _ = loss_and_grad(weight)
    for _ in range(100):
        loss, grad = loss_and_grad(weight)
        weight -= 1.0 * grad
    assert loss > 0.9 * first


def test_adaptive_descent_never_keeps_a_step_that_raised_the_loss():
    calls = []

    def cusp(params: torch.Tensor):
        # sqrt(|1 - v|), 10x steeper past 1: the full Polyak step from 0 lands at 2 (loss 3.16 > 1).
        value = float(params[0])
        calls.append(value)
        side = 10.0 if value > 1 else 1.0
        distance = max(abs(value - 1), 1e-12)
        slope = 0.5 * side ** 0.5 / distance ** 0.5 * (1 if value > 1 else -1)
        return (side * distance) ** 0.5, torch.tensor([slope])

    params = torch.zeros(1)
    losses = adaptive_descent(cusp, params, target=1e-3, max_iter=40)
    assert calls[:2] == pytest.approx([0.0, 2.0]), "the first step overshoots"
    assert all(b <= a for a, b in zip(losses, losses[1:])), "accepted losses only go down"
    assert losses[-1] <= 1e-3 and float(params[0]) == pytest.approx(1.0, abs=1e-5)
    assert cusp(params)[0] == pytest.approx(losses[-1], abs=1e-6)  # params are left at the loss reported last


def test_adaptive_descent_stops_at_the_cap_and_says_so():
    weight = torch.zeros(5, 16)
    losses = adaptive_descent(softmax_problem(1.0), weight, target=1e-9, max_iter=3)
    assert len(losses) == 4 and losses[-1] > 1e-9


# ---------------------------------------------------------------- settings


def test_update_rule_auto_keeps_the_reference_for_reference_settings():
    assert MemoirHyperParams().validate().update_rule == "adaptive"
    reference = MemoirHyperParams(edit_lr=1.0, n_iter=30).validate()  # what the reference's YAML sets
    assert (reference.update_rule, reference.edit_lr, reference.n_iter) == ("reference", 1.0, 30)
    assert MemoirHyperParams(n_iter=8).validate().update_rule == "reference"
    chosen = MemoirHyperParams(update_rule="reference").validate()
    assert (chosen.edit_lr, chosen.n_iter) == (1.0, 30)  # the reference's own defaults
    # A resolved setting reloads as itself (the manifest stores the resolved one).
    assert MemoirHyperParams.from_dict(MemoirHyperParams().validate().to_dict()).update_rule == "adaptive"
    with pytest.raises(ValueError, match="update_rule: 'fast' is not supported"):
        MemoirHyperParams(update_rule="fast").validate()
    with pytest.raises(ValueError, match="edit_loss_target: 0 is out of range"):
        MemoirHyperParams(edit_loss_target=0).validate()


# ---------------------------------------------------------------- on models


@pytest.fixture(scope="module")
def small_init_model(tmp_path_factory):
    """Another shape and a 10x smaller weight scale than tiny_model_dir: other activations and gradients."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-wide"), hidden_size=256, intermediate_size=1024,
                            num_layers=2, num_heads=8, seed=3, init_std=0.02)


def default_hparams(layer: int, **overrides) -> MemoirHyperParams:
    """Defaults everywhere but the layer, the mask size and the threshold (the model's shape)."""
    return MemoirHyperParams(inner_params=[f"model.layers[{layer}].mlp.down_proj.weight"], top_k=128,
                             irr_threshold=0.6, **overrides).validate()


def edit_and_score(model_dir, words_dataset, hp, out, count: int, score: bool = True):
    requests = load_edit_dataset(words_dataset, limit=count)
    artifact = run_edit_job(model_dir, requests, hp, out, progress=False)
    if not score:
        return artifact, None
    hf = MemoirHFModel.from_pretrained(model_dir, artifact=artifact)
    return artifact, evaluate_edits(hf, requests)


@pytest.mark.parametrize("shape", ["tiny_model_dir", "small_init_model"])
def test_one_edit_takes_with_default_settings(shape, request, words_dataset, tmp_path):
    model_dir = request.getfixturevalue(shape)
    layer = {"tiny_model_dir": 3, "small_init_model": 1}[shape]
    artifact, metrics = edit_and_score(model_dir, words_dataset, default_hparams(layer), tmp_path, 1)
    assert metrics["pre"]["rel"] < 1.0 and metrics["post"]["rel"] == 1.0
    outcome = artifact.edits[0].outcome
    assert outcome["took"] and 1 <= outcome["steps"] <= 100
    # The outcome is stored with the edit and read back.
    stored = [json.loads(line) for line in next(tmp_path.glob("edits-v*.jsonl")).read_text().splitlines()]
    assert stored[0]["outcome"] == outcome


def test_t10_reference_step_vs_adaptive_step_on_real_text(tiny_bpe_model_dir, shared_data, tmp_path, caplog):
    # ZsRE's multi-token answers on a small real-text model: with the reference's settings most
    # edits do not take and a warning names each; with the defaults every edit takes.
    data = shared_data / "zsre_mend_eval_head.json"
    with caplog.at_level(logging.WARNING, logger="edit_tools.editor"):
        reference, ref_metrics = edit_and_score(tiny_bpe_model_dir, data, default_hparams(3, edit_lr=1.0, n_iter=30),
                                                tmp_path / "ref", 10)
    missed = [e for e in reference.edits if not e.outcome["took"]]
    assert len(missed) >= 5 and ref_metrics["post"]["rel"] <= 0.8
    for edit in missed:
        assert any(f"edit {edit.edit_id} ({edit.prompt!r}" in message for message in caplog.messages)
    adaptive, ada_metrics = edit_and_score(tiny_bpe_model_dir, data, default_hparams(3), tmp_path / "ada", 10)
    assert all(e.outcome["took"] for e in adaptive.edits) and ada_metrics["post"]["rel"] >= 0.9
    assert ada_metrics["post"]["loc"] >= 0.9


def test_t10_step_limit_keeps_edits_that_cannot_reach_the_loss_target(small_init_model, words_dataset, tmp_path):
    # This model's final norm and small head bound its logits: no edit gets near loss 0.05.
    # Unlimited steps grow the memory until later edits drown the earlier ones; the trust
    # region (adaptive_step_limit, default) and the stall stop keep them.
    limited, limited_metrics = edit_and_score(small_init_model, words_dataset, default_hparams(1), tmp_path / "on", 10)
    free, free_metrics = edit_and_score(small_init_model, words_dataset, default_hparams(1, adaptive_step_limit=0),
                                        tmp_path / "off", 10)
    assert all(e.outcome["loss"] > 0.5 for e in limited.edits + free.edits)  # the floor
    assert limited_metrics["post"]["rel"] >= free_metrics["post"]["rel"] + 0.3
    assert limited.memory.norm() < free.memory.norm()


def test_t10_loss_target_and_cap_change_the_final_losses(tiny_model_dir, words_dataset, tmp_path):
    tight, _ = edit_and_score(tiny_model_dir, words_dataset, default_hparams(3, edit_loss_target=0.005), tmp_path / "t", 10,
                              score=False)
    loose, _ = edit_and_score(tiny_model_dir, words_dataset, default_hparams(3, edit_loss_target=0.2), tmp_path / "l", 10,
                              score=False)
    assert all(e.outcome["loss"] <= 0.005 for e in tight.edits) and all(e.outcome["loss"] <= 0.2 for e in loose.edits)
    assert sum(e.outcome["steps"] for e in tight.edits) > sum(e.outcome["steps"] for e in loose.edits)
    capped, _ = edit_and_score(tiny_model_dir, words_dataset, default_hparams(3, max_steps_per_edit=1, edit_loss_target=0.005),
                               tmp_path / "c", 10, score=False)
    assert all(e.outcome["steps"] <= 1 for e in capped.edits)
    assert sum(e.outcome["loss"] for e in capped.edits) > sum(e.outcome["loss"] for e in tight.edits)


def test_loc_neighbour_is_reported_only_where_the_data_has_it(tiny_model_dir, words_dataset, tmp_path):
    records = [json.loads(line) for line in words_dataset.read_text().splitlines()[:4]]
    for record in records[:2]:
        record["loc_neighbour"] = record["prompt"].replace(record["subject"], "w1 w2")
        record["loc_neighbour_ans"] = "w3"
    data = tmp_path / "with-neighbours.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    requests = load_edit_dataset(data)
    assert requests[0].loc_neighbour == "where does w1 w2 live ?" and requests[3].loc_neighbour is None
    artifact = run_edit_job(tiny_model_dir, requests, default_hparams(3), tmp_path / "a", progress=False)
    hf = MemoirHFModel.from_pretrained(tiny_model_dir, artifact=artifact)
    metrics = evaluate_edits(hf, requests)
    assert 0.0 <= metrics["post"]["loc_neighbour"] <= 1.0 and metrics["pre"]["loc_neighbour"] == 1.0
    assert metrics["routing"]["loc_neighbour_routed"] is not None
    without = summarize_scores(requests[2:], score_requests(hf, requests[2:]))
    assert "loc_neighbour" not in without["post"] and without["routing"]["loc_neighbour_routed"] is None
