"""Bad artifacts are refused at server start-up, each with a message naming the file and the fault.

The whole list goes through the plugin's start-up check (`load_artifact_for`, what each MEMOIR
model class runs before building the model) with a stand-in for vLLM's config: seconds, not
a server start-up per case. One real `memoir-serve` start-up proves that path end to end
(test_plugin_server.py's refusal test covers the foreign-model and engine-settings ones).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from served_edits import COMMON

from edit_tools.editor import run_edit_job
from edit_tools.hparams import MemoirHyperParams
from edit_tools.tiny_models import build_tiny_llama
from vllm_memoir.core import artifact as artifact_module
from vllm_memoir.server_process import VllmServer
from vllm_memoir.engine_requirements import hf_overrides_args

LAYER = 1
INTER = 500  # not a multiple of 8: the masks' last byte has bits beyond intermediate_size


def make_artifact(model_dir: Path, out: Path, words_dataset: Path) -> Path:
    hp = MemoirHyperParams(inner_params=[f"model.layers[{LAYER}].mlp.down_proj.weight"], top_k=64, edit_lr=20.0,
                           n_iter=2, irr_threshold=0.6).validate()
    run_edit_job(model_dir, words_dataset, hp, out, limit=3, progress=False)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("llama-500"), intermediate_size=INTER, num_layers=2)


@pytest.fixture(scope="module")
def good_artifact(model_dir, words_dataset, tmp_path_factory) -> Path:
    return make_artifact(model_dir, tmp_path_factory.mktemp("good-artifact"), words_dataset)


def vllm_config(model_dir: Path, artifact: Path, dtype=torch.float32):
    """The fields of vllm.config.VllmConfig that the start-up check reads, as vLLM fills them."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(model_dir)
    hf_config.memoir_path = str(artifact)
    return SimpleNamespace(
        use_v2_model_runner=True,
        compilation_config=SimpleNamespace(cudagraph_mode=SimpleNamespace(name="NONE")),
        cache_config=SimpleNamespace(enable_prefix_caching=False),
        scheduler_config=SimpleNamespace(enable_chunked_prefill=False),
        model_config=SimpleNamespace(enable_prompt_embeds=False, hf_config=hf_config, model=str(model_dir), dtype=dtype),
        speculative_config=None,
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1),
    )


# --- ways to break an artifact (each on its own copy) ----------------------------------------------

def tensor_file(path: Path) -> Path:
    return next(path.glob("memoir-v*.safetensors"))


def edits_file(path: Path) -> Path:
    return next(path.glob("edits-v*.jsonl"))


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(tensor_file(path)), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


def edit_manifest(path: Path, **changes) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def refresh_checksum(path: Path, target: Path) -> None:
    """Make the manifest agree with a modified file, so only its content is wrong."""
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][target.name] = artifact_module._sha256(target)
    (path / "manifest.json").write_text(json.dumps(manifest))


def rewrite_tensors(path: Path, drop: tuple[str, ...] = (), **changes) -> None:
    tensors = {k: v for k, v in read_tensors(path).items() if k not in drop}
    tensors.update(changes)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tensor_file(path)))
    refresh_checksum(path, tensor_file(path))


def truncate(path: Path, refresh: bool) -> None:
    target = tensor_file(path)
    target.write_bytes(target.read_bytes()[:-1000])
    if refresh:
        refresh_checksum(path, target)


def with_memory(path: Path, fn) -> None:
    memory = read_tensors(path)["memory"].clone()
    fn(memory)
    rewrite_tensors(path, memory=memory)


def mask_bit_beyond_intermediate_size(path: Path) -> None:
    masks = read_tensors(path)["masks"].clone()
    row = masks[0]
    first = int((row != 0).nonzero()[0])
    row[first] = int(row[first]) & (int(row[first]) - 1)  # clear one set bit: the count stays top_k
    row[INTER // 8] = int(row[INTER // 8]) | (1 << (INTER % 8))  # bit INTER: a padding bit past the last column
    rewrite_tensors(path, masks=masks)


def rewrite_edits(path: Path, transform) -> None:
    target = edits_file(path)
    target.write_text(transform(target.read_text()))
    refresh_checksum(path, target)


def set_nan(memory):
    memory[3, 7] = float("nan")


def set_inf(memory):
    memory[0, 0] = float("inf")


BAD_ARTIFACTS = {
    "truncated-safetensors": (lambda p: truncate(p, refresh=False), r"memoir-v1\.safetensors: checksum mismatch"),
    "truncated-safetensors-checksum-refreshed": (lambda p: truncate(p, refresh=True),
                                                 r"memoir-v1\.safetensors: not a readable safetensors file"),
    "missing-safetensors": (lambda p: tensor_file(p).unlink(), r"memoir-v1\.safetensors: missing"),
    "missing-edits": (lambda p: edits_file(p).unlink(), r"edits-v1\.jsonl: missing"),
    "missing-manifest": (lambda p: (p / "manifest.json").unlink(), r"manifest\.json: missing"),
    "manifest-is-a-directory": (lambda p: ((p / "manifest.json").unlink(), (p / "manifest.json").mkdir()),
                                r"manifest\.json: is a directory, not a regular file"),
    # Not waited on: the reader checks the file type before it opens (and opens non-blocking).
    "edits-file-is-a-fifo": (lambda p: (edits_file(p).unlink(), os.mkfifo(p / "edits-v1.jsonl")),
                             r"edits-v1\.jsonl: is a FIFO, not a regular file"),
    "manifest-not-json": (lambda p: (p / "manifest.json").write_text('{"format_version": 1,'), r"manifest\.json: not valid JSON"),
    "unknown-format-version": (lambda p: edit_manifest(p, format_version=2), r"unknown format_version 2 \(this build reads 1\)"),
    "manifest-field-wrong-type": (lambda p: edit_manifest(p, top_k="64"), r"manifest\.json: field 'top_k' must be an integer"),
    "manifest-files-escape-directory": (lambda p: edit_manifest(p, files={"../memoir-v1.safetensors": "0" * 64,
                                                                        "edits-v1.jsonl": "0" * 64}),
                                        r"'\.\./memoir-v1\.safetensors' is not a file name in the artifact directory"),
    "wrong-hidden-size": (lambda p: edit_manifest(p, hidden_size=64), r"hidden_size 64 != the served model's 128"),
    "wrong-layer": (lambda p: edit_manifest(p, layer_index=5, module_path="model.layers.5.mlp.down_proj"),
                    r"layer_index 5 is outside the served model's 2 layers"),
    "wrong-memory-shape": (lambda p: rewrite_tensors(p, memory=torch.zeros(128, INTER - 1)),
                           r"tensor 'memory' has shape \(128, 499\), manifest implies \(128, 500\)"),
    "wrong-memory-dtype": (lambda p: rewrite_tensors(p, memory=torch.zeros(128, INTER, dtype=torch.float16)),
                           r"memory dtype torch.float16 differs from manifest dtype float32"),
    "unknown-manifest-dtype": (lambda p: edit_manifest(p, dtype="int8"), r"dtype 'int8' is not one of"),
    "masks-not-uint8": (lambda p: rewrite_tensors(p, masks=read_tensors(p)["masks"].to(torch.int16)),
                        r"masks must be uint8 bitsets"),
    "tensor-missing": (lambda p: rewrite_tensors(p, drop=("masks",)), r"memoir-v1\.safetensors: no tensor 'masks'"),
    "nan-memory": (lambda p: with_memory(p, set_nan), r"memory contains NaN or Inf"),
    "inf-memory": (lambda p: with_memory(p, set_inf), r"memory contains NaN or Inf"),
    "inf-background": (lambda p: rewrite_tensors(p, background_mean=torch.full((INTER,), float("inf"))),
                       r"background_mean contains NaN or Inf"),
    "mask-bit-out-of-range": (mask_bit_beyond_intermediate_size, r"mask of edit row 0 sets bits beyond intermediate_size=500"),
    "mask-wrong-bit-count": (lambda p: rewrite_tensors(p, masks=torch.zeros(3, 64, dtype=torch.uint8)),
                             r"mask of edit row 0 has 0 bits set, expected top_k=64"),
    "mask-width": (lambda p: rewrite_tensors(p, masks=torch.zeros(3, 72, dtype=torch.uint8)),
                   r"tensor 'masks' has shape \(3, 72\), manifest implies \(3, 64\)"),
    "permutation-broken": (lambda p: rewrite_tensors(p, permutation=torch.zeros(INTER, dtype=torch.int64)),
                           r"permutation is not a permutation of 0\.\.499"),
    "edit-records-short": (lambda p: rewrite_edits(p, lambda text: "".join(text.splitlines(True)[:2])),
                           r"2 edit records for 3 masks"),
    "edit-record-not-json": (lambda p: rewrite_edits(p, lambda text: text + "{oops\n"), r"edits-v1\.jsonl:4: not valid JSON"),
    "edit-record-no-id": (lambda p: rewrite_edits(p, lambda text: text.replace('"edit_id": 1', '"id": 1')),
                          r"edits-v1\.jsonl:2: bad edit record"),
}


def test_the_good_artifact_passes_the_start_up_check(model_dir, good_artifact):
    from vllm_memoir.models import load_artifact_for

    artifact = load_artifact_for(vllm_config(model_dir, good_artifact))
    assert artifact.manifest.num_edits == 3 and artifact.manifest.intermediate_size == INTER


@pytest.mark.parametrize("case", sorted(BAD_ARTIFACTS))
def test_bad_artifact_is_refused_at_start_up(case, model_dir, good_artifact, tmp_path):
    from vllm_memoir.models import load_artifact_for
    from vllm_memoir.validation import MemoirConfigError

    mutate, message = BAD_ARTIFACTS[case]
    broken = shutil.copytree(good_artifact, tmp_path / "artifact")
    mutate(broken)
    with pytest.raises(MemoirConfigError, match=message) as info:
        load_artifact_for(vllm_config(model_dir, broken))
    # Every message says where: the artifact's file, or its directory for manifest-level faults.
    assert str(broken) in str(info.value), str(info.value)


def test_artifact_of_a_different_base_model_is_refused(good_artifact, tmp_path):
    from vllm_memoir.models import load_artifact_for
    from vllm_memoir.validation import MemoirConfigError

    other = build_tiny_llama(tmp_path / "other", intermediate_size=INTER, num_layers=2, seed=1)
    with pytest.raises(MemoirConfigError, match=r"made for a different base model"):
        load_artifact_for(vllm_config(other, good_artifact))


def test_no_artifact_path_names_the_override(model_dir, good_artifact):
    from vllm_memoir.models import load_artifact_for
    from vllm_memoir.validation import MemoirConfigError

    config = vllm_config(model_dir, good_artifact)
    config.model_config.hf_config.memoir_path = None
    with pytest.raises(MemoirConfigError, match=r"memoir_path"):
        load_artifact_for(config)


@pytest.mark.server
@pytest.mark.slow
def test_real_server_refuses_a_truncated_artifact(tiny_model_dir, words_dataset, tmp_path):
    """memoir-serve exits non-zero at start-up, the precise reason in its log."""
    artifact = tmp_path / "artifact"
    hp = MemoirHyperParams(inner_params=["model.layers[2].mlp.down_proj.weight"], top_k=128, edit_lr=20.0, n_iter=2,
                           irr_threshold=0.6).validate()
    run_edit_job(tiny_model_dir, words_dataset, hp, artifact, limit=2, progress=False)
    truncate(artifact, refresh=False)
    server = VllmServer(tiny_model_dir, [*COMMON, "--enforce-eager", *hf_overrides_args(artifact)], tmp_path / "refused.log")
    code = server.wait_for_exit(300)
    assert code != 0, server.log_tail()
    log = server.log_text()
    assert f"{tensor_file(artifact)}: checksum mismatch" in log, server.log_tail()
