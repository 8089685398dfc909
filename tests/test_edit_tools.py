"""The offline edit tools on a tiny random Llama: edits take, the base stays exact, jobs resume."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import wait_until

from edit_tools.background import compute_background_mean, save_background
from edit_tools.datasets import load_edit_dataset
from edit_tools.editor import EditJobError, run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import HParamsError, MemoirHyperParams
from vllm_memoir.core import ArtifactError, load_artifact, read_manifest

LAYER = 2


def hparams(**overrides) -> MemoirHyperParams:
    # Reference defaults except the step: lr 1.0 barely moves a tiny model's edits (see README).
    settings = dict(
        inner_params=[f"model.layers[{LAYER}].mlp.down_proj.weight"], top_k=128, edit_lr=20.0, n_iter=8,
        irr_threshold=0.6, checkpoint_every=2,
    )
    settings.update(overrides)
    return MemoirHyperParams(**settings).validate()


@pytest.fixture(scope="module")
def edited(tiny_model_dir, words_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifact")
    artifact = run_edit_job(tiny_model_dir, words_dataset, hparams(), out, limit=6, progress=False)
    return out, artifact


def test_one_edit_gives_rel_one(tiny_model_dir, words_dataset, tmp_path):
    request = load_edit_dataset(words_dataset)[0]
    run_edit_job(tiny_model_dir, [request], hparams(), tmp_path, progress=False)
    hf = MemoirHFModel.from_pretrained(tiny_model_dir, artifact=tmp_path)
    with hf.routing_off():
        assert hf.score([request.prompt], [request.target])[0].accuracy < 1.0  # the random model did not know it
    assert hf.route([request.prompt])[0].route == 0
    assert hf.score([request.prompt], [request.target])[0].accuracy == 1.0
    generated = hf.generate([request.prompt], max_new_tokens=1)[0]
    assert hf.decode(generated) == request.target


def test_manifest_stores_each_setting_once_and_the_job_apart(edited, tiny_model_dir, words_dataset):
    out, _ = edited
    stored = json.loads((out / "manifest.json").read_text())
    memoir = stored["hparams"]["memoir"]
    assert not {"inner_params", "top_k", "irr_threshold", "prompt_feature_agg", "routing_span"} & set(memoir)
    assert stored["top_k"] == 128 and stored["irr_threshold"] == 0.6 and memoir["n_iter"] == 8
    assert stored["job"]["done"] == stored["job"]["total"] == 6 and "job" not in stored["hparams"]
    # Appending checks the top-level fields (the only copy) against the hyperparameters, changing nothing.
    before = (out / "manifest.json").read_bytes()
    with pytest.raises(EditJobError, match="artifact has top_k=128, the hyperparameters say 64"):
        run_edit_job(tiny_model_dir, words_dataset, hparams(top_k=64), out, append=True, limit=1, progress=False)
    assert (out / "manifest.json").read_bytes() == before


def test_unrouted_prompt_logits_are_bit_identical_to_base(edited, tiny_model_dir):
    out, _ = edited
    hf = MemoirHFModel.from_pretrained(tiny_model_dir, artifact=out)
    unrelated = ["the river of w300 is w301 .", "Q : what is the capital of w9 ?"]
    decisions = hf.route(unrelated)
    assert not any(d.routed for d in decisions), decisions
    ids, attention = hf.pad([hf.prompt_ids(p) for p in unrelated], left=False)
    with hf.routing(attention.bool()) as call:
        routed_logits = hf.model(input_ids=ids, attention_mask=attention).logits
    assert [d.route for d in call.decisions] == [-1, -1]  # the forward did route (and routed nowhere)
    base = MemoirHFModel.from_pretrained(tiny_model_dir, module_path=out and hf.module_path)
    base_logits = base.model(input_ids=ids, attention_mask=attention).logits
    assert torch.equal(routed_logits, base_logits)


def test_batched_rows_route_independently(edited, tiny_model_dir, words_dataset):
    out, _ = edited
    hf = MemoirHFModel.from_pretrained(tiny_model_dir, artifact=out)
    requests = load_edit_dataset(words_dataset, limit=6)
    prompts = [requests[3].prompt, "the river of w300 is w301 .", requests[0].prompt]
    batched = hf.generate(prompts, max_new_tokens=4)
    alone = [hf.generate([p], max_new_tokens=4)[0] for p in prompts]
    assert batched == alone
    assert [d.route for d in hf.route(prompts)] == [3, -1, 0]


def test_fast_loop_equals_full_loop(tiny_model_dir, words_dataset, tmp_path):
    fast = run_edit_job(tiny_model_dir, words_dataset, hparams(fast_loop=True), tmp_path / "fast", limit=3, progress=False)
    full = run_edit_job(tiny_model_dir, words_dataset, hparams(fast_loop=False), tmp_path / "full", limit=3, progress=False)
    assert torch.equal(fast.masks, full.masks)
    assert torch.allclose(fast.memory, full.memory, rtol=1e-4, atol=1e-5)
    assert fast.memory.abs().max() > 0


def test_killed_job_resumes_and_append_equals_one_run(tiny_model_dir, words_dataset, tmp_path):
    requests = load_edit_dataset(words_dataset, limit=6)
    # One background file for every run: by default a job computes it from its own locality prompts.
    background = tmp_path / "background.safetensors"
    hf = MemoirHFModel.from_pretrained(tiny_model_dir, module_path=f"model.layers.{LAYER}.mlp.down_proj")
    save_background(compute_background_mean(hf, [r.loc for r in requests]), background)
    hp = hparams(dir_background_features=str(background))
    one_run = run_edit_job(tiny_model_dir, requests, hp, tmp_path / "one", progress=False)
    # Stage 1: the first 4 edits, stopped after 3 of them (as if killed after a checkpoint).
    staged = tmp_path / "staged"
    partial = run_edit_job(tiny_model_dir, requests[:4], hp, staged, progress=False, stop_after=3)
    assert partial.manifest.num_edits == 3
    run_edit_job(tiny_model_dir, requests[:4], hp, staged, progress=False)  # resumes at edit 3
    with pytest.raises(EditJobError, match="--append"):
        run_edit_job(tiny_model_dir, requests[4:], hp, staged, progress=False)
    final = run_edit_job(tiny_model_dir, requests[4:], hp, staged, append=True, progress=False)
    assert torch.equal(final.masks, one_run.masks)
    assert torch.equal(final.memory, one_run.memory)
    assert [e.prompt for e in load_artifact(staged).edits] == [r.prompt for r in requests]


def test_extending_with_different_routing_settings_is_refused(edited, tiny_model_dir, words_dataset):
    out, _ = edited
    with pytest.raises(EditJobError, match="top_k"):
        run_edit_job(tiny_model_dir, words_dataset, hparams(top_k=64), out, append=True, progress=False)


def test_reference_yaml_keys_are_accepted(tmp_path):
    yaml_text = """
alg_name: "MEMOIR"
model_name: "meta-llama/Meta-Llama-3-8B-instruct"
device: 0
edit_lr: 1.0
n_iter: 30
objective_optimization: 'only_label'
inner_params:
- model.layers[27].mlp.down_proj.weight
model_parallel: False
use_chat_template: False
top_k: 4096
irr_threshold: 0.4
prompt_feature_agg: mean_decentered
dir_background_features: "./background_features/llama3_background_features.pt"
RUN_SAVE_BACKGROUND_FEATURES: False
dir_to_save_background_features: "./background_features/llama3_background_features_new.pt"
"""
    path = tmp_path / "llama3-8b.yaml"
    path.write_text(yaml_text)
    hp = MemoirHyperParams.from_yaml(path)
    assert hp.layer_index == 27 and hp.module_path == "model.layers.27.mlp.down_proj" and hp.top_k == 4096
    path.write_text(yaml_text + "edit_rate: 3\n")
    with pytest.raises(HParamsError, match="unknown keys \\['edit_rate'\\]"):
        MemoirHyperParams.from_yaml(path)


def test_cli_edit_and_evaluate_on_shared_zsre(tiny_bpe_model_dir, shared_data, tmp_path):
    tiny_model_dir = tiny_bpe_model_dir
    hp = tmp_path / "hp.yaml"
    hp.write_text(
        f"alg_name: MEMOIR\ninner_params: ['model.layers[{LAYER}].mlp.down_proj.weight']\ntop_k: 128\n"
        "edit_lr: 20.0\nn_iter: 5\nirr_threshold: 0.6\nprompt_feature_agg: mean_decentered\n"
    )
    art, metrics = tmp_path / "art", tmp_path / "metrics.json"
    data = shared_data / "zsre_mend_eval_head.json"
    cmd = [sys.executable, "-m", "edit_tools.cli"]
    edit = subprocess.run(cmd + ["edit", "--model", str(tiny_model_dir), "--data", str(data), "--hparams", str(hp),
                                 "--out", str(art), "--limit", "4", "--no-progress"], capture_output=True, text=True)
    assert edit.returncode == 0, edit.stderr
    ev = subprocess.run(cmd + ["evaluate", "--model", str(tiny_model_dir), "--artifact", str(art), "--data", str(data),
                               "--limit", "4", "--json", str(metrics), "--plot", str(tmp_path / "m.png")],
                        capture_output=True, text=True)
    assert ev.returncode == 0, ev.stderr
    assert "post" in ev.stdout and "rel" in ev.stdout
    result = json.loads(metrics.read_text())
    assert result["post"]["rel"] > result["pre"]["rel"]
    assert (tmp_path / "m.png").stat().st_size > 1000
    inspect = subprocess.run(cmd + ["inspect", str(art)], capture_output=True, text=True)
    assert "4 edits" in inspect.stdout.replace("edits          4", "4 edits")
    bad = subprocess.run(cmd + ["inspect", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "manifest.json: missing" in bad.stderr


def checkpointed_edits(directory) -> int:
    """Edits in the artifact's newest checkpoint on disk (0 before the first)."""
    try:
        return read_manifest(directory).num_edits
    except ArtifactError:  # no manifest yet
        return 0


def test_sigkilled_cli_job_resumes_to_the_uninterrupted_result(tiny_model_dir, words_dataset, tmp_path):
    import os
    import signal

    hp = tmp_path / "hp.yaml"
    hp.write_text(
        f"inner_params: ['model.layers[{LAYER}].mlp.down_proj.weight']\ntop_k: 128\nedit_lr: 20.0\nn_iter: 8\n"
        "irr_threshold: 0.6\ncheckpoint_every: 1\n"
    )
    cmd = [sys.executable, "-m", "edit_tools.cli", "edit", "--model", str(tiny_model_dir), "--data", str(words_dataset),
           "--hparams", str(hp), "--limit", "8", "--no-progress", "--out"]
    assert subprocess.run(cmd + [str(tmp_path / "one")], capture_output=True).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(cmd + [str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed as soon as its second checkpoint is on disk: inside the third edit or the
        # second checkpoint's last steps, with two edits to keep and six to redo.
        wait_until(lambda: checkpointed_edits(killed) >= 2 or proc.poll() is not None, 120,
                   f"a second checkpoint in {killed}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    done_before = load_artifact(killed).manifest.num_edits
    assert 2 <= done_before < 8, "the job finished before it was killed: nothing was tested"
    resumed = subprocess.run(cmd + [str(killed)], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    final, reference = load_artifact(killed), load_artifact(tmp_path / "one")
    assert torch.equal(final.masks, reference.masks) and torch.equal(final.memory, reference.memory)
    assert [e.edit_id for e in final.edits] == list(range(8))
