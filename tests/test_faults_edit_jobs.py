"""Edit jobs on a full disk or an unwritable output: a clear error, the previous artifact intact.

A full disk is simulated where it strikes, at the artifact writer's rename or file write
(root ignores read-only permissions, so chmod cannot stand in for it). Being SIGKILLed and
resumed is tested in test_edit_tools.py (test_sigkilled_cli_job_resumes_to_the_uninterrupted_result).
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from helpers import make_artifact

from edit_tools import cli
from edit_tools.datasets import load_edit_dataset
from edit_tools.editor import EditJobError, run_edit_job
from edit_tools.hparams import MemoirHyperParams
from vllm_memoir.core import artifact as artifact_module
from vllm_memoir.core import load_artifact

LAYER = 2


def hparams() -> MemoirHyperParams:
    return MemoirHyperParams(inner_params=[f"model.layers[{LAYER}].mlp.down_proj.weight"], top_k=128, edit_lr=20.0,
                             n_iter=4, irr_threshold=0.6, checkpoint_every=1).validate()


def disk_full_at(monkeypatch, call: int) -> list[str]:
    """Make the artifact writer's `call`-th os.replace (0-based) fail with ENOSPC; returns the
    destinations it was asked to write."""
    real_replace, targets = os.replace, []

    def replace(src, dst):
        targets.append(os.path.basename(dst))
        if len(targets) - 1 == call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(artifact_module.os, "replace", replace)
    return targets


def snapshot(directory) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def requests(words_dataset):
    return load_edit_dataset(words_dataset, limit=4)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, requests, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run_edit_job(tiny_model_dir, requests[:2], hparams(), out, progress=False)
    run_edit_job(tiny_model_dir, requests[2:], hparams(), out, append=True, progress=False)
    return load_artifact(out)


@pytest.mark.parametrize("failing_write", [0, 1, 2], ids=["memory-file", "edits-file", "manifest"])
def test_full_disk_at_any_write_leaves_the_directory_as_it_was(failing_write, tmp_path, monkeypatch):
    """The artifact writer alone (no model): whichever of its three writes fails, nothing changes."""
    artifact_module.save_artifact(make_artifact(2), tmp_path)
    before = snapshot(tmp_path)
    targets = disk_full_at(monkeypatch, failing_write)
    newer = make_artifact(3, seed=1)
    with pytest.raises(OSError, match="No space left on device"):
        artifact_module.save_artifact(newer, tmp_path)
    assert targets[failing_write] == ["memoir-v2.safetensors", "edits-v2.jsonl", "manifest.json"][failing_write]
    assert snapshot(tmp_path) == before  # no temporary files, no orphaned files of the failed version
    assert newer.manifest.version == 0 and newer.manifest.files == {}  # the caller's manifest is unchanged
    assert load_artifact(tmp_path).manifest.num_edits == 2


def test_full_disk_during_append_keeps_the_previous_version(tiny_model_dir, requests, uninterrupted, tmp_path,
                                                            monkeypatch):
    out = tmp_path / "artifact"
    run_edit_job(tiny_model_dir, requests[:2], hparams(), out, progress=False)
    before = snapshot(out)
    disk_full_at(monkeypatch, 2)  # the new version's manifest: the last and smallest write
    with pytest.raises(EditJobError) as info:
        run_edit_job(tiny_model_dir, requests[2:], hparams(), out, append=True, progress=False)
    message = str(info.value)
    assert str(out) in message and "No space left on device" in message, message
    assert "previous version (v1, 2 edits) is intact" in message and "run the same command again" in message, message
    assert snapshot(out) == before
    previous = load_artifact(out)
    assert previous.manifest.num_edits == 2 and previous.manifest.version == 1  # one version per job
    monkeypatch.undo()
    # Space is back: the same command resumes and ends where an uninterrupted job ends.
    final = run_edit_job(tiny_model_dir, requests[2:], hparams(), out, append=True, progress=False)
    assert torch.equal(final.masks, uninterrupted.masks) and torch.equal(final.memory, uninterrupted.memory)
    assert [e.prompt for e in load_artifact(out).edits] == [r.prompt for r in requests]


def test_full_disk_on_the_first_checkpoint_writes_nothing(tiny_model_dir, requests, tmp_path, monkeypatch):
    out = tmp_path / "artifact"
    disk_full_at(monkeypatch, 0)
    with pytest.raises(EditJobError, match="no artifact was written yet"):
        run_edit_job(tiny_model_dir, requests[:1], hparams(), out, progress=False)
    assert not out.exists()  # the job made the directory, so a failed job removes it: nothing is left behind


def test_cli_reports_a_full_disk_and_exits_2(tiny_model_dir, words_dataset, tmp_path, monkeypatch, capsys):
    hp = tmp_path / "hp.yaml"
    hp.write_text(f"inner_params: ['model.layers[{LAYER}].mlp.down_proj.weight']\ntop_k: 128\nedit_lr: 20.0\n"
                  "n_iter: 2\nirr_threshold: 0.6\n")
    disk_full_at(monkeypatch, 2)
    code = cli.main(["edit", "--model", str(tiny_model_dir), "--data", str(words_dataset), "--hparams", str(hp),
                     "--out", str(tmp_path / "art"), "--limit", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "memoir edit: error:" in err and "writing the artifact failed (No space left on device)" in err, err


def test_unwritable_output_fails_before_any_edit(tiny_model_dir, requests, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(EditJobError, match=r"a-file: the output path exists and is not a directory"):
        run_edit_job(tiny_model_dir, requests[:1], hparams(), blocker, progress=False)
    with pytest.raises(EditJobError, match=r"cannot write the artifact there"):
        run_edit_job(tiny_model_dir, requests[:1], hparams(), blocker / "inside", progress=False)

    # A read-only directory (root ignores chmod, so the probe write is refused instead); no model
    # is loaded and no edit computed before the refusal.
    def read_only(*_args, **_kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    import edit_tools.editor as editor

    monkeypatch.setattr(editor.tempfile, "mkstemp", read_only)
    monkeypatch.setattr(editor.MemoirHFModel, "from_pretrained",
                        lambda *a, **k: pytest.fail("the model was loaded before the output was checked"))
    with pytest.raises(EditJobError, match=r"cannot write the artifact there \(Permission denied\)"):
        run_edit_job(tiny_model_dir, requests[:1], hparams(), tmp_path / "ro", progress=False)
