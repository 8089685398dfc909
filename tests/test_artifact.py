import json

import pytest
import torch
from helpers import COLUMNS as D
from helpers import HIDDEN as H
from helpers import make_artifact
from safetensors.torch import save_file

from vllm_memoir.core import ArtifactError, MemoirArtifact, load_artifact, read_manifest, save_artifact
from vllm_memoir.core import artifact as artifact_module


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


def test_edit_records_roundtrip_every_field_as_json_lines(tmp_path):
    """Records are written field by field (EditRecord.to_json, not dataclasses.asdict): the same
    JSON lines, and every field reads back, outcome and disabled flags included."""
    import dataclasses

    from vllm_memoir.core import EditRecord

    art = make_artifact()
    art.edits[1] = EditRecord(edit_id=7, prompt="p\u00e9 \"q\"", target="t", enabled=False, rephrase="r",
                              subject="s", outcome={"loss": 0.5, "steps": 3, "took": False})
    save_artifact(art, tmp_path)
    lines = next(tmp_path.glob("edits-v*.jsonl")).read_text().splitlines()
    assert lines == [json.dumps(dataclasses.asdict(e)) for e in art.edits]
    assert load_artifact(tmp_path).edits == art.edits


def test_reading_records_leaves_the_garbage_collector_as_it_was(tmp_path):
    """The loader holds the collector while it builds records, and gives it back, also when a
    record is refused."""
    import gc

    save_artifact(make_artifact(), tmp_path)
    assert gc.isenabled()
    load_artifact(tmp_path)
    assert gc.isenabled()
    gc.disable()
    try:
        load_artifact(tmp_path)
        assert not gc.isenabled()
    finally:
        gc.enable()
    edits = next(tmp_path.glob("edits-v*.jsonl"))
    edits.write_text(edits.read_text() + "not json\n")
    with pytest.raises(ArtifactError, match=r"jsonl:4: not valid JSON"):
        artifact_module._read_edits(edits)
    assert gc.isenabled()


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


# --- only regular files are read, and paths in messages are bounded ---------------------------------

def _read_in_thread(fn, timeout: float = 10.0):
    """Run fn on a daemon thread: a reader that blocks (on a FIFO) fails the test instead of hanging it."""
    import threading

    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 -- handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert not thread.is_alive(), "the reader blocked"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _make_fifo(path):
    import os

    path.unlink(missing_ok=True)
    os.mkfifo(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda p: ((p / "manifest.json").unlink(), (p / "manifest.json").mkdir()), r"manifest\.json: is a directory"),
    (lambda p: _make_fifo(p / "manifest.json"), r"manifest\.json: is a FIFO"),
    (lambda p: _make_fifo(_tensor_file(p)), r"memoir-v1\.safetensors: is a FIFO"),
    (lambda p: _make_fifo(next(p.glob("edits-v*.jsonl"))), r"edits-v1\.jsonl: is a FIFO"),
], ids=["manifest-directory", "manifest-fifo", "tensors-fifo", "edits-fifo"])
def test_files_that_are_not_regular_are_refused_without_blocking(tmp_path, mutate, message):
    save_artifact(make_artifact(), tmp_path)
    mutate(tmp_path)
    with pytest.raises(ArtifactError, match=message):
        _read_in_thread(lambda: load_artifact(tmp_path))


def test_a_manifest_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    save_artifact(make_artifact(), tmp_path)
    size = (tmp_path / "manifest.json").stat().st_size
    monkeypatch.setattr(artifact_module, "MAX_MANIFEST_BYTES", size - 1)
    with pytest.raises(ArtifactError, match=rf"manifest\.json: {size} bytes, more than the {size - 1}"):
        read_manifest(tmp_path)


def test_unusable_paths_get_one_bounded_line(tmp_path):
    long_name = tmp_path / ("x" * 300)  # one component over NAME_MAX: ENAMETOOLONG, not "missing"
    with pytest.raises(ArtifactError) as info:
        read_manifest(long_name)
    message = str(info.value)
    assert "cannot be read (File name too long)" in message and "\n" not in message
    assert len(message) < 400 and "characters)" in message, message

    huge = "/" + "y/" * 2_500_000  # a 5 MB path, as a client may post
    with pytest.raises(ArtifactError) as info:
        read_manifest(huge)
    assert len(str(info.value)) < 400 and str(info.value).startswith("/y/y/"), str(info.value)[:400]

    with pytest.raises(ArtifactError, match="NUL character"):
        read_manifest(str(tmp_path) + "/a\0b")
    with pytest.raises(ArtifactError, match=r"manifest\.json: missing \(is .* a MEMOIR artifact directory\?\)"):
        read_manifest(tmp_path / "absent")


# --- versions: one per published state, not one per checkpoint -------------------------------------

def _checkpoint(artifact: MemoirArtifact, directory, done: int, total: int, digest: str = "d1", first_row: int = 0):
    artifact.manifest.job = {"data_sha256": digest, "first_row": first_row, "done": done, "total": total}
    save_artifact(artifact, directory)
    return read_manifest(directory)


def test_checkpoints_of_one_job_share_its_version(tmp_path):
    """A fresh job checkpointing 3 times publishes version 1; an append job publishes version 2."""
    artifact = make_artifact(3)
    assert _checkpoint(artifact, tmp_path, 1, 3).version == 1
    assert sorted(p.name for p in tmp_path.glob("memoir-v*")) == ["memoir-v1.part1.safetensors"]
    assert _checkpoint(artifact, tmp_path, 2, 3).version == 1
    assert sorted(p.name for p in tmp_path.glob("memoir-v*")) == ["memoir-v1.part2.safetensors"]
    final = _checkpoint(artifact, tmp_path, 3, 3)
    assert final.version == 1 and sorted(final.files) == ["edits-v1.jsonl", "memoir-v1.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits-v1.jsonl", "manifest.json", "memoir-v1.safetensors"]

    # A resumed job (the artifact read back from disk) goes on in the same version.
    resumed = load_artifact(tmp_path)
    appended = _checkpoint(resumed, tmp_path, 1, 2, digest="d2", first_row=3)
    assert appended.version == 2
    resumed = load_artifact(tmp_path)
    assert _checkpoint(resumed, tmp_path, 2, 2, digest="d2", first_row=3).version == 2
    assert load_artifact(tmp_path).manifest.version == 2


def test_another_job_over_an_unfinished_one_is_a_new_version(tmp_path):
    artifact = make_artifact(3)
    assert _checkpoint(artifact, tmp_path, 1, 3).version == 1
    assert _checkpoint(make_artifact(3, seed=1), tmp_path, 1, 3, digest="other").version == 2
    # A save with no job (a persisted flag) is always a new version.
    assert _checkpoint(make_artifact(3), tmp_path, 3, 3, digest="other").version == 2
    plain = load_artifact(tmp_path)
    plain.manifest.job = {}
    save_artifact(plain, tmp_path)
    assert read_manifest(tmp_path).version == 3


def test_old_manifests_with_the_job_in_hparams_read_and_resume(tmp_path):
    """Manifests written before the `job` field kept the edit job's progress in hparams["job"]:
    they read the same, and the next checkpoint of that job stays in its version."""
    _checkpoint(make_artifact(3), tmp_path, 1, 3)
    path = tmp_path / "manifest.json"
    obj = json.loads(path.read_text())
    job = obj.pop("job")
    obj["hparams"] = {**obj["hparams"], "job": job}
    path.write_text(json.dumps(obj))
    old = read_manifest(tmp_path)
    assert old.job == job and "job" not in old.hparams and artifact_module.unfinished_job(old.job) == job
    assert _checkpoint(load_artifact(tmp_path), tmp_path, 2, 3).version == 1
    written = json.loads(path.read_text())
    assert written["job"]["done"] == 2 and "job" not in written["hparams"]


# --- a version with new records and the same tensors (persisted enable/disable) ------------------

def _flag_version(path, row=1):
    """save_edit_records of the artifact in `path` with row `row` turned off."""
    from vllm_memoir.core.artifact import load_edit_records, save_edit_records

    manifest = read_manifest(path)
    records = load_edit_records(path, manifest)
    records.set_enabled(row, False)
    return manifest, save_edit_records(path, manifest, records)


def test_a_records_version_keeps_the_tensors_file_and_loads_whole(tmp_path):
    save_artifact(make_artifact(), tmp_path)
    tensors = _tensor_file(tmp_path)
    inode, mtime = tensors.stat().st_ino, tensors.stat().st_mtime_ns
    before, written = _flag_version(tmp_path)
    assert written == read_manifest(tmp_path) and written.version == 2 and before.version == 1
    assert written.files[tensors.name] == before.files[tensors.name] and "edits-v2.jsonl" in written.files
    assert (tensors.stat().st_ino, tensors.stat().st_mtime_ns) == (inode, mtime)  # not rewritten
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits-v2.jsonl", "manifest.json", tensors.name]
    back = load_artifact(tmp_path)  # every checksum checked: the new records' and the kept tensors'
    assert [e.enabled for e in back.edits] == [True, False, True] and back.manifest.version == 2
    assert torch.equal(back.masks, make_artifact().masks)
    _, again = _flag_version(tmp_path, row=2)  # and again: version 3 over the same tensors file
    assert again.version == 3 and set(again.files) == {tensors.name, "edits-v3.jsonl"}
    assert [e.enabled for e in load_artifact(tmp_path).edits] == [True, False, False]
    save_artifact(load_artifact(tmp_path), tmp_path)  # a full save after it writes its own tensors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edits-v4.jsonl", "manifest.json", "memoir-v4.safetensors"]


def test_a_records_version_is_checked_like_any_other(tmp_path):
    """The kept tensors file is still checked against the manifest's sha256 when loaded."""
    save_artifact(make_artifact(), tmp_path)
    _flag_version(tmp_path)
    _tensor_file(tmp_path).write_bytes(_tensor_file(tmp_path).read_bytes()[:-100])
    with pytest.raises(ArtifactError, match=r"memoir-v1\.safetensors: checksum mismatch"):
        load_artifact(tmp_path)


def _refusal_cases():
    import dataclasses

    return {
        "disk-moved-on": (lambda path, manifest, records: (save_artifact(make_artifact(), path), manifest, records)[1:],
                          r"version 2 on disk is not the version 1 the records were read from"),
        "record-count": (lambda path, manifest, records: (manifest, records[:2]), r"2 edit records for 3 masks"),
        "unfinished-job": (lambda path, manifest, records: (dataclasses.replace(
            manifest, job={"data_sha256": "d", "first_row": 0, "done": 1, "total": 3}), records),
            r"version 1 on disk is not"),
    }


@pytest.mark.parametrize("case", sorted(_refusal_cases()))
def test_a_refused_records_version_writes_nothing(tmp_path, case):
    from vllm_memoir.core.artifact import load_edit_records, save_edit_records

    mutate, message = _refusal_cases()[case]
    save_artifact(make_artifact(), tmp_path)
    manifest = read_manifest(tmp_path)
    manifest_arg, records = mutate(tmp_path, manifest, load_edit_records(tmp_path, manifest))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(ArtifactError, match=message):
        save_edit_records(tmp_path, manifest_arg, records)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_records_version_of_an_unfinished_job_is_refused(tmp_path):
    from vllm_memoir.core.artifact import load_edit_records, save_edit_records

    art = make_artifact()
    art.manifest.job = {"data_sha256": "d", "first_row": 0, "done": 3, "total": 6}
    save_artifact(art, tmp_path)
    manifest = read_manifest(tmp_path)
    with pytest.raises(ArtifactError, match="checkpoint of an unfinished edit job"):
        save_edit_records(tmp_path, manifest, load_edit_records(tmp_path, manifest))


def test_a_failed_records_version_keeps_the_previous_one(tmp_path, monkeypatch):
    """The disk fills while the manifest is written: version 1 stays whole, no new file is left."""
    from vllm_memoir.core.artifact import load_edit_records, save_edit_records

    save_artifact(make_artifact(), tmp_path)
    manifest = read_manifest(tmp_path)
    records = load_edit_records(tmp_path, manifest)
    records.set_enabled(0, False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    write_atomic = artifact_module.write_atomic

    def full_at_the_manifest(path, write):
        if path.name == "manifest.json":
            raise OSError("No space left on device")
        write_atomic(path, write)
    monkeypatch.setattr(artifact_module, "write_atomic", full_at_the_manifest)
    with pytest.raises(OSError, match="No space"):
        save_edit_records(tmp_path, manifest, records)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert load_artifact(tmp_path).manifest.version == 1


def test_records_are_read_against_their_checksum(tmp_path):
    from vllm_memoir.core.artifact import load_edit_records

    save_artifact(make_artifact(), tmp_path)
    manifest = read_manifest(tmp_path)
    assert [e.edit_id for e in load_edit_records(tmp_path, manifest)] == [0, 1, 2]
    edits = next(tmp_path.glob("edits-v*.jsonl"))
    edits.write_text(edits.read_text().replace('"enabled": true', '"enabled": false', 1))
    with pytest.raises(ArtifactError, match=r"edits-v1\.jsonl: checksum mismatch"):
        load_edit_records(tmp_path, manifest)
    edits.unlink()
    with pytest.raises(ArtifactError, match=r"edits-v1\.jsonl: missing"):
        load_edit_records(tmp_path, manifest)


# --- the load: checksums beside the rest, and the cheaper checks ----------------------------------

def test_a_damaged_file_is_reported_as_such_whatever_else_fails(tmp_path):
    """The tensors file is hashed while the rest is read: a bad checksum is still the error, not
    what reading the damaged file raised first."""
    save_artifact(make_artifact(), tmp_path)
    edits = next(tmp_path.glob("edits-v*.jsonl"))
    edits.write_text(edits.read_text() + "{oops\n")  # unreadable and not the file the manifest hashed
    with pytest.raises(ArtifactError, match=r"edits-v1\.jsonl: checksum mismatch"):
        load_artifact(tmp_path)
    save_artifact(make_artifact(), tmp_path / "b")
    tensors = _tensor_file(tmp_path / "b")
    tensors.write_bytes(b"\x00" * 16)  # not safetensors either
    with pytest.raises(ArtifactError, match=r"memoir-v1\.safetensors: checksum mismatch"):
        load_artifact(tmp_path / "b")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_finiteness_check_finds_every_nan_and_inf(dtype, monkeypatch):
    monkeypatch.setattr(artifact_module, "_FINITE_BLOCK", 1000)  # several blocks
    values = torch.randn(37, 301).to(dtype)
    values[5, 5] = torch.finfo(dtype).max
    assert artifact_module._all_finite(values) and artifact_module._all_finite(values[:, ::3])
    for bad in (float("nan"), float("inf"), float("-inf")):
        for at in ((0, 0), (36, 300), (20, 17)):
            broken = values.clone()
            broken[at] = bad
            assert not artifact_module._all_finite(broken), (bad, at)
            assert not artifact_module._all_finite(broken.t())  # not contiguous


# --- file modes -----------------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_artifact_files_get_the_umask_mode_not_0600(tmp_path, umask):
    import os
    import stat

    previous = os.umask(umask)
    try:
        save_artifact(make_artifact(), tmp_path)
        save_artifact(make_artifact(), tmp_path)  # a second version replaces every file
    finally:
        os.umask(previous)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert sorted(modes) == ["edits-v2.jsonl", "manifest.json", "memoir-v2.safetensors"]
    assert set(modes.values()) == {0o666 & ~umask}, {name: oct(mode) for name, mode in modes.items()}


def test_a_fresh_edit_job_is_version_1_however_often_it_checkpoints(tiny_model_dir, words_dataset, tmp_path, capsys):
    """The user-visible numbers: `memoir inspect` says version 1 after a job of 3 checkpoints, 2 after --append."""
    from edit_tools import cli
    from edit_tools.editor import run_edit_job
    from edit_tools.hparams import MemoirHyperParams

    hp = MemoirHyperParams(inner_params=["model.layers[2].mlp.down_proj.weight"], top_k=128, n_iter=2,
                           checkpoint_every=1).validate()
    out = tmp_path / "artifact"
    run_edit_job(tiny_model_dir, words_dataset, hp, out, limit=3, progress=False)
    assert read_manifest(out).version == 1
    capsys.readouterr()
    assert cli.main(["inspect", str(out)]) in (0, None)
    assert "version 1)" in capsys.readouterr().out
    more = tmp_path / "more.jsonl"
    more.write_text("".join(words_dataset.read_text().splitlines(True)[3:5]))
    run_edit_job(tiny_model_dir, more, hp, out, append=True, progress=False)
    manifest = read_manifest(out)
    assert manifest.version == 2 and manifest.num_edits == 5
    assert sorted(p.name for p in out.iterdir()) == ["edits-v2.jsonl", "manifest.json", "memoir-v2.safetensors"]
