"""The transformers reference's public API (edit_tools/hf_model.py): scoped routing, prompt
features, and the artifact checks it shares with the server's start-up (core.compatibility)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import synthetic_artifact

from edit_tools.hf_model import MemoirHFModel
from vllm_memoir.core import ArtifactError

MODULE = "model.layers.1.mlp.down_proj"
PROMPTS = ["the river of w300 is w301 .", "Q : what is the capital of w9 ?"]


@pytest.fixture(scope="module")
def reference(tiny_model_dir):
    """The tiny model with a random artifact whose threshold 0 routes every prompt to its best edit."""
    hf = MemoirHFModel.from_pretrained(tiny_model_dir, module_path=MODULE)
    config = hf.model.config
    artifact, _ = synthetic_artifact(edits=3, hidden=config.hidden_size, dim=config.intermediate_size, top_k=32)
    artifact.manifest = dataclasses.replace(artifact.manifest, base_fingerprint=hf.fingerprint(), irr_threshold=0.0)
    artifact.memory = artifact.memory * 0.5  # large enough to move the logits
    hf.load(artifact)
    return hf


def test_routing_is_scoped_to_its_block(reference):
    ids, attention = reference.pad([reference.prompt_ids(p) for p in PROMPTS])
    with reference.routing_off():
        base = reference.model(input_ids=ids, attention_mask=attention).logits
    with reference.routing(attention.bool()) as call:
        routed = reference.model(input_ids=ids, attention_mask=attention).logits
        with pytest.raises(RuntimeError, match="do not nest"):
            with reference.routing(attention.bool()):
                pass
    assert all(d.routed for d in call.decisions) and len(call.decisions) == 2
    assert not torch.equal(routed, base)
    # Outside the block the layer is the base layer again: no route carries over to a later call.
    after = reference.model(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(after, base)
    assert reference.layer.call is None


def test_prompt_features_route_like_the_forward(reference):
    router = reference.layer.router
    features = reference.prompt_features(PROMPTS, router.aggregation, router.background_mean, batch_size=1)
    assert features.shape == (2, reference.model.config.intermediate_size) and features.dtype == torch.float32
    expected = router.route_features(features)
    decisions = reference.route(PROMPTS)
    assert [(d.route, d.best_edit) for d in decisions] == [(d.route, d.best_edit) for d in expected]
    assert all(abs(d.overlap - e.overlap) <= 1 / 32 for d, e in zip(decisions, expected))


def test_load_refuses_what_the_server_refuses(reference):
    from vllm_memoir.validation import MemoirConfigError, ServedModel, check_artifact_fits

    good = reference.artifact
    config = reference.model.config.to_dict()
    wider = dataclasses.replace(good.manifest, hidden_size=good.manifest.hidden_size + 1)
    with pytest.raises(ArtifactError, match=r"hidden_size \d+ != the served model's \d+") as from_reference:
        reference.load(dataclasses.replace(good, manifest=wider))
    with pytest.raises(MemoirConfigError) as from_server:
        check_artifact_fits(wider, ServedModel(None, config, torch.float32, 1), Path("art"))
    assert str(from_server.value).split(": ", 1)[1] == str(from_reference.value).split(": ", 1)[1]
    foreign = dataclasses.replace(good.manifest, base_fingerprint="0" * 64)
    with pytest.raises(ArtifactError, match="made for a different base model"):
        reference.load(dataclasses.replace(good, manifest=foreign))
    assert reference.artifact is good  # a refused load changes nothing
