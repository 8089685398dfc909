"""failed_edits "roll_back" (issue 13 part 3): an edit that did not take leaves W_m exactly as it
was and is stored disabled, with its outcome marked; "keep" (the default, the reference) leaves
its partial update. On the facts model with one SGD step per edit, about half the edits take."""

from __future__ import annotations

import pytest
import torch
from helpers import one_torch_thread  # noqa: F401 (a fixture)

from edit_tools.cli import main as memoir_main
from edit_tools.datasets import load_edit_dataset
from edit_tools.edit_step import EarlierKeys, apply_edit, build_edit_batch
from edit_tools.editor import load_update_keys, new_artifact, run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import HParamsError, MemoirHyperParams
from vllm_memoir.core import read_manifest

from benchmarks import quality

pytestmark = pytest.mark.usefixtures("one_torch_thread")

T10 = quality.DEFAULT_DATA.parent / "zsre-facts-T10.json"


def one_step_hparams(**overrides) -> MemoirHyperParams:
    """The facts config with one reference step per edit (some edits take, some do not), failed
    edits kept unless a test says otherwise (the config rolls them back)."""
    pinned = {"update_projection": "none", "n_iter": 1, "failed_edits": "keep", **overrides}
    return MemoirHyperParams.from_yaml(quality.DEFAULT_HPARAMS, {k: (v, "test") for k, v in pinned.items()})


def test_default_keeps_failed_edits_and_bad_values_are_one_line_errors():
    assert MemoirHyperParams().failed_edits == "keep"  # the reference's behaviour
    with pytest.raises(HParamsError, match="failed_edits: 'drop' is not supported"):
        MemoirHyperParams.from_dict({"failed_edits": "drop"})


def test_a_rolled_back_edit_leaves_the_memory_exactly_as_before():
    hp = one_step_hparams(failed_edits="roll_back", weight_decay=1e-3)  # decay moves every column: undone too
    requests = load_edit_dataset(T10)
    hf = MemoirHFModel.from_pretrained(quality.DEFAULT_MODEL, module_path=hp.module_path)
    artifact = new_artifact(hf, hp, str(quality.DEFAULT_MODEL), requests)
    templates = artifact.manifest.hparams["context_templates"]
    hf.layer.memory.data.zero_()
    outcomes = []
    for request in requests:
        before = hf.layer.memory.data.clone()
        batch = build_edit_batch(hf, request.prompt, request.target, templates, request.loc)
        result = apply_edit(hf, hp, batch, artifact.permutation, artifact.background_mean)
        after = hf.layer.memory.data
        assert result.rolled_back == (not result.took)
        assert torch.equal(after, before) == result.rolled_back  # rolled back: bit for bit; took: changed
        assert ("rolled_back" in result.outcome()) == result.rolled_back
        outcomes.append(result.took)
    assert 0 < sum(outcomes) < len(outcomes)  # both cases were exercised


def test_a_job_stores_failed_edits_disabled_and_protects_only_the_kept_keys(tmp_path, capsys):
    kept = run_edit_job(quality.DEFAULT_MODEL, T10, one_step_hparams(update_projection="null_space"),
                        tmp_path / "keep", progress=False)
    rolled = run_edit_job(quality.DEFAULT_MODEL, T10,
                          one_step_hparams(update_projection="null_space", failed_edits="roll_back"),
                          tmp_path / "roll", progress=False)
    assert all(e.enabled for e in kept.edits)
    took = [e.outcome["took"] for e in rolled.edits]
    assert 0 < sum(took) < len(took)
    assert [e.enabled for e in rolled.edits] == took
    assert [e.outcome.get("rolled_back", False) for e in rolled.edits] == [not t for t in took]
    # The rolled-back job's memory holds only the updates of the edits that took.
    assert rolled.memory.norm() < kept.memory.norm()
    # A rolled-back edit's keys are not protected: fewer keys than the job that kept every edit.
    dim = rolled.manifest.intermediate_size
    keys_rolled = load_update_keys(tmp_path / "roll", read_manifest(tmp_path / "roll").job, 10, dim)
    keys_kept = load_update_keys(tmp_path / "keep", read_manifest(tmp_path / "keep").job, 10, dim)
    assert 0 < keys_rolled.count < keys_kept.count
    assert isinstance(keys_rolled, EarlierKeys)
    # memoir inspect counts them.
    capsys.readouterr()
    assert memoir_main(["inspect", str(tmp_path / "roll")]) == 0
    shown = capsys.readouterr().out
    assert f"({sum(took)} enabled, {10 - sum(took)} rolled back (they did not take))" in shown
