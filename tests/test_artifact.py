import json

import pytest
import torch
from safetensors.torch import save_file

from vllm_memoir.core import (
    ArtifactError,
    ArtifactManifest,
    EditRecord,
    MemoirArtifact,
    load_artifact,
    pack_indices,
    read_manifest,
    save_artifact,
    tophash_indices,
)
from vllm_memoir.core import artifact as artifact_module

H, D, K = 16, 300, 20


def make_artifact(num_edits: int = 3, seed: int = 0) -> MemoirArtifact:
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(D, generator=gen)
    masks = pack_indices(tophash_indices(torch.randn(num_edits, D, generator=gen), K, perm), D)
    manifest = ArtifactManifest(
        base_model="tiny", base_fingerprint="f" * 64, module_path="model.layers.1.mlp.down_proj", layer_index=1,
        hidden_size=H, intermediate_size=D, dtype="float32", top_k=K, irr_threshold=0.5, aggregation="mean_decentered",
    )
    return MemoirArtifact(
        manifest=manifest, memory=torch.randn(H, D, generator=gen), masks=masks, permutation=perm,
        background_mean=torch.randn(D, generator=gen),
        edits=[EditRecord(edit_id=i, prompt=f"p{i}", target=f"t{i}") for i in range(num_edits)],
    )


def _tensor_file(path):
    return next(path.glob("memoir-v*.safetensors"))


def _rewrite_tensors(path, **changes):
    """Replace tensors and refresh the manifest checksum, so only the content is wrong."""
    art = make_artifact()
    tensors = {"memory": art.memory, "masks": art.masks, "permutation": art.permutation, "background_mean": art.background_mean}
    tensors.update(changes)
    target = _tensor_file(path)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][target.name] = artifact_module._sha256(target)
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_roundtrip(tmp_path):
    art = make_artifact()
    save_artifact(art, tmp_path)
    back = load_artifact(tmp_path, expected_fingerprint="f" * 64)
    assert torch.equal(back.memory, art.memory) and torch.equal(back.masks, art.masks)
    assert torch.equal(back.permutation, art.permutation) and torch.equal(back.background_mean, art.background_mean)
    assert [e.prompt for e in back.edits] == ["p0", "p1", "p2"] and back.manifest.version == 1


def test_new_version_replaces_old_files(tmp_path):
    save_artifact(make_artifact(2), tmp_path)
    save_artifact(make_artifact(3, seed=1), tmp_path)
    assert read_manifest(tmp_path).version == 2 and load_artifact(tmp_path).manifest.num_edits == 3
    assert len(list(tmp_path.glob("memoir-v*.safetensors"))) == 1


def test_failed_save_keeps_previous_version(tmp_path, monkeypatch):
    save_artifact(make_artifact(2), tmp_path)

    def broken(*_args, **_kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(artifact_module, "save_file", broken)
    with pytest.raises(OSError, match="No space"):
        save_artifact(make_artifact(3, seed=1), tmp_path)
    back = load_artifact(tmp_path)
    assert back.manifest.num_edits == 2 and back.manifest.version == 1
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda p: _tensor_file(p).write_bytes(_tensor_file(p).read_bytes()[:-100]), "checksum mismatch"),
        (lambda p: _tensor_file(p).unlink(), "missing"),
        (lambda p: (p / "manifest.json").unlink(), "manifest.json: missing"),
        (lambda p: (p / "manifest.json").write_text("{not json"), "not valid JSON"),
        (lambda p: _edit_manifest(p, format_version=99), "unknown format_version 99"),
        (lambda p: _edit_manifest(p, hidden_size=32), "tensor 'memory' has shape"),
        (lambda p: _rewrite_tensors(p, memory=torch.full((H, D), float("nan"))), "NaN or Inf"),
        (lambda p: _rewrite_tensors(p, memory=torch.zeros(H, D, dtype=torch.float16)), "memory dtype"),
        (lambda p: _rewrite_tensors(p, background_mean=torch.tensor([float("inf")] * D)), "background_mean contains NaN"),
        (lambda p: _rewrite_tensors(p, permutation=torch.zeros(D, dtype=torch.int64)), "not a permutation"),
        (lambda p: _rewrite_tensors(p, masks=_mask_beyond_dim()), "beyond intermediate_size"),
        (lambda p: _rewrite_tensors(p, masks=torch.zeros(3, 40, dtype=torch.uint8)), "bits set, expected top_k"),
    ],
    ids=["truncated", "missing-tensors", "missing-manifest", "bad-json", "version", "shape", "nan", "dtype",
         "bg-inf", "permutation", "mask-out-of-range", "mask-count"],
)
def test_bad_artifacts_are_refused_with_a_precise_message(tmp_path, mutate, message):
    save_artifact(make_artifact(), tmp_path)
    mutate(tmp_path)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(tmp_path)


def test_different_base_model_is_refused(tmp_path):
    save_artifact(make_artifact(), tmp_path)
    with pytest.raises(ArtifactError, match="different base model"):
        load_artifact(tmp_path, expected_fingerprint="0" * 64)


def _edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _mask_beyond_dim():
    masks = make_artifact().masks.clone()
    row = masks[0]
    # Move one set bit of row 0 to bit 301 (outside D=300): count stays top_k.
    first = int((row != 0).nonzero()[0])
    low = int(row[first]) & -int(row[first])
    row[first] = int(row[first]) ^ low
    row[301 // 8] = int(row[301 // 8]) | (1 << (301 % 8))
    return masks
