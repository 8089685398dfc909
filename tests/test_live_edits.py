"""Live edits against a real `memoir-serve` (MEMOIR_ADMIN=1): swap, inspect, disable, persist, refuse.

One compiled server (no --enforce-eager) of the embedded facts model for the module, started
with artifact v1 (3 edits); v2 is v1 plus 2 appended edits (`run_edit_job(..., append=True)`).
Every served answer is checked against the transformers reference of the version that must
have served it (tests/plugin_reference.py), on the exact prompt token ids vLLM reports.
The tests share the server but not its state: each first swaps in a fresh copy of the version
it starts from (`serve_copy`), sends the requests it counts, and never writes into v1 or v2.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
from argparse import Namespace
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from helpers import make_artifact, wait_until
from plugin_reference import greedy_ids

from edit_tools.datasets import load_edit_dataset
from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from vllm_memoir.core import read_manifest
from vllm_memoir.server_process import VllmServer
from vllm_memoir.engine_requirements import ROUTING_FLAGS, hf_overrides_args

REPO = Path(__file__).resolve().parents[1]
FACTS_MODEL = REPO / "models" / "facts-llama"
EDITS = REPO / "data" / "facts" / "zsre-facts-T10.json"
HPARAMS = REPO / "configs" / "facts-llama.yaml"
N_V1, K_APPENDED = 3, 2
ADMIN_KEY, API_KEY = "admin-key-for-tests", "api-key-for-tests"
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "64", "--api-key", API_KEY, *ROUTING_FLAGS]


# --- unit checks (no server) ------------------------------------------------------------------

def test_routes_absent_unless_enabled_and_allowlisted(monkeypatch):
    """MEMOIR_ADMIN unset: no /memoir route is attached; VLLM_PLUGINS unset: vLLM loads no endpoint plugin."""
    from fastapi import FastAPI

    from vllm.plugins import load_endpoint_plugins
    from vllm_memoir.admin_api import MemoirAdminPlugin

    monkeypatch.delenv("MEMOIR_ADMIN", raising=False)
    app = FastAPI()
    MemoirAdminPlugin().attach_router(app)
    assert not [r for r in app.routes if getattr(r, "path", "").startswith("/memoir")]

    monkeypatch.setenv("MEMOIR_ADMIN", "1")
    app = FastAPI()
    MemoirAdminPlugin().attach_router(app)
    paths = {r.path for r in app.routes if getattr(r, "path", "").startswith("/memoir")}
    assert paths == {"/memoir/edits", "/memoir/artifact", "/memoir/edits/{edit_id}/disable",
                     "/memoir/edits/{edit_id}/enable"}

    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    assert load_endpoint_plugins(("generate",)) == []
    monkeypatch.setenv("VLLM_PLUGINS", "memoir-admin")
    assert [p.name for p in load_endpoint_plugins(("generate",))] == ["memoir-admin"]


def test_admin_key_choice(monkeypatch):
    from vllm_memoir.admin_api import admin_keys

    monkeypatch.delenv("MEMOIR_ADMIN_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    assert admin_keys(Namespace(api_key=["a", "b"])) == ["a", "b"]
    assert admin_keys(Namespace(api_key=None)) == []
    monkeypatch.setenv("VLLM_API_KEY", "env")
    assert admin_keys(Namespace(api_key=None)) == ["env"]
    monkeypatch.setenv("MEMOIR_ADMIN_KEY", "admin")
    assert admin_keys(Namespace(api_key=["a"])) == ["admin"]  # the admin key alone, not the API key


def test_memoir_serve_adds_admin_plumbing_only_when_enabled(monkeypatch):
    from vllm_memoir import serve

    assert serve.with_admin(["m"])[-2:] == ["--worker-extension-cls", serve.ADMIN_EXTENSION]
    with pytest.raises(SystemExit, match="--worker-extension-cls"):
        serve.with_admin(["m", "--worker-extension-cls", "other.module:Ext"])
    monkeypatch.setenv("VLLM_PLUGINS", "memoir")
    serve.allowlist_admin_plugin()
    assert set(serve.os.environ["VLLM_PLUGINS"].split(",")) == {"memoir", "memoir-admin"}


def test_rebase_keeps_running_routes_and_reroutes_new_requests():
    """After a change of the served edits: running and resumed requests keep their edit (re-indexed),
    new requests with the same prompt are routed again, an edit that is gone leaves its requests unrouted."""
    from vllm_memoir.core import NO_ROUTE
    from vllm_memoir.core.routing import RouteDecision
    from vllm_memoir.routing.requests import PENDING, RequestRoutes

    routes = RequestRoutes(capacity=4)
    routes.add(0, [5, 6, 7], is_new_request=True)
    routes.add(1, [8, 9], is_new_request=True)
    routes.set_batch(2)
    routes.record(0, RouteDecision(route=2, best_edit=2, overlap=0.9))
    routes.record(1, RouteDecision(route=1, best_edit=1, overlap=0.8))
    routes.rebase(lambda row: {2: 4}.get(row, NO_ROUTE))  # edit row 2 is row 4 in the new version; row 1's edit is gone
    assert routes.row_routes() == [4, NO_ROUTE]
    routes.add(2, [5, 6, 7], is_new_request=True)
    assert int(routes.slot_route[2]) == PENDING  # a new request routes against the new edits
    routes.add(3, [5, 6, 7], is_new_request=False)
    assert int(routes.slot_route[3]) == 4  # a preempted one coming back keeps its edit


# --- the controller over stand-in workers (no model, no server) -------------------------------------

class FakeWorkers:
    """An engine client with one rank that answers the MemoirWorkerExtension calls over an artifact
    on disk, as the real workers do (same answer shapes), without a model."""

    def __init__(self, path: Path):
        from vllm_memoir.core import load_artifact

        self.path, self.artifact, self.staged = Path(path), load_artifact(path), None
        self.calls: list[str] = []

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[dict]:
        self.calls.append(method)
        try:
            return [{"ok": True, **(getattr(self, method)(*args) or {})}]
        except KeyError as exc:
            return [{"ok": False, "kind": "unknown_edit", "error": f"no edit with id {exc.args[0]}"}]
        except ValueError as exc:  # ArtifactError, as the worker extension answers it
            return [{"ok": False, "kind": "refused", "error": str(exc)}]

    async def pause_generation(self, mode: str, clear_cache: bool) -> None:
        self.calls.append("pause")

    async def resume_generation(self) -> None:
        self.calls.append("resume")

    def memoir_state(self, with_edits: bool = True, offset: int = 0, limit: int | None = None) -> dict:
        from vllm_memoir.validation import artifact_sha256

        manifest, edits = self.artifact.manifest, self.artifact.edits
        state = {"path": str(self.path), "version": manifest.version, "artifact_sha256": artifact_sha256(manifest),
                 "num_edits": len(edits), "num_enabled": sum(e.enabled for e in edits), "tp_rank": 0}
        if with_edits:
            state["edits"] = [{"edit_id": e.edit_id, "enabled": e.enabled, "routed_requests": 0} for e in edits]
        return state

    def memoir_prepare(self, path: str, version: int) -> dict:
        from vllm_memoir.core import load_artifact

        artifact = load_artifact(path)
        assert artifact.manifest.version == version
        self.staged = (Path(path), artifact)
        return {"loading": True}

    def memoir_prepared(self) -> dict:
        return {"ready": True, "version": self.staged[1].manifest.version}

    def memoir_commit(self, version: int) -> dict:
        (self.path, self.artifact), self.staged = self.staged, None
        return self.memoir_state(with_edits=False)

    def memoir_abort(self) -> dict:
        self.staged = None
        return {}

    def memoir_set_enabled(self, edit_id: int, enabled: bool) -> dict:
        record = {e.edit_id: e for e in self.artifact.edits}[edit_id]
        record.enabled = enabled
        return {"edit_id": edit_id, "enabled": enabled}

    def memoir_flags(self, edit_id: int) -> dict:
        from vllm_memoir.core.edit_records import EditRecords
        from vllm_memoir.live_edits import served_flags

        {e.edit_id: e for e in self.artifact.edits}[edit_id]  # KeyError: not served
        return served_flags(self.path, self.artifact.manifest, EditRecords.of(self.artifact.edits))

    def memoir_adopt_flags(self, previous_version: int, manifest: dict, edit_id: int, enabled: bool) -> dict:
        from vllm_memoir.live_edits import flags_version

        written = flags_version(self.artifact.manifest, previous_version, manifest)  # checked before any change
        self.memoir_set_enabled(edit_id, enabled)
        self.artifact.manifest = written
        return self.memoir_state(with_edits=False)


def _run(coro, timeout: float = 30.0):
    import asyncio

    async def bounded():
        return await asyncio.wait_for(coro, timeout)  # a read that blocks (a FIFO) fails, not hangs
    return asyncio.run(bounded())


def _served_artifact(directory: Path, **job) -> tuple[Path, FakeWorkers]:
    from vllm_memoir.core import save_artifact

    artifact = make_artifact(3)
    if job:
        artifact.manifest.job = {"data_sha256": "d", "first_row": 0, **job}
    save_artifact(artifact, directory)
    return directory, FakeWorkers(directory)


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.parametrize("enable", [False, True], ids=["disable", "enable"])
def test_refused_persist_changes_nothing(tmp_path, enable):
    """409 (the artifact on disk moved to another version): the served flags, version and the disk stay."""
    from vllm_memoir.core import load_artifact, save_artifact
    from vllm_memoir.edit_control import EditControl, EditControlError

    path, workers = _served_artifact(tmp_path / "art")
    control = EditControl(workers)
    if enable:  # the edit to enable is off (in the server only)
        _run(control.set_enabled(1, False, persist=False))
    save_artifact(load_artifact(path), path)  # an edit job wrote version 2 meanwhile
    before, on_disk = _run(control.state()), _snapshot(path)
    assert before["version"] == 1 and read_manifest(path).version == 2

    first_call = len(workers.calls)
    with pytest.raises(EditControlError) as info:
        _run(control.set_enabled(1, enable, persist=True))
    assert info.value.status == 409 and "version 2 on disk" in str(info.value) and "\n" not in str(info.value)
    assert workers.calls[first_call:] == ["memoir_flags"]  # read what is served; nothing flipped or swapped
    assert _run(control.state()) == before  # edit 1 keeps its flag; same version and content
    assert _snapshot(path) == on_disk


def _with_a_rolled_back_edit(directory: Path) -> tuple[Path, FakeWorkers]:
    """A served artifact whose edit 1 the edit job rolled back (failed_edits: roll_back)."""
    from vllm_memoir.core import save_artifact

    artifact = make_artifact(3)
    artifact.edits[1].enabled = False
    artifact.edits[1].outcome = {"loss": 3.2, "steps": 30, "took": False, "rolled_back": True}
    save_artifact(artifact, directory)
    return directory, FakeWorkers(directory)


def test_enabling_a_rolled_back_edit_is_refused_and_changes_nothing(tmp_path):
    """Persisted: refused (422) before anything is written. On a worker: refused before the flag
    moves. Disabling it, and enabling an edit that took, still work."""
    from types import SimpleNamespace

    from vllm_memoir.core.edit_records import EditRecords
    from vllm_memoir.edit_control import EditControl, EditControlError
    from vllm_memoir.live_edits import LiveEditError, LiveEdits

    path, workers = _with_a_rolled_back_edit(tmp_path / "art")
    control = EditControl(workers)
    before, on_disk = _run(control.state()), _snapshot(path)
    with pytest.raises(EditControlError) as info:
        _run(control.set_enabled(1, True, persist=True))
    message = str(info.value)
    assert info.value.status == 422 and "edit 1 was rolled back" in message and "\n" not in message
    assert _run(control.state()) == before and _snapshot(path) == on_disk
    _run(control.set_enabled(0, False, persist=True))  # other edits' flags still persist
    assert read_manifest(path).version == 2

    records = EditRecords.of(make_artifact(3).edits)
    records.record(1).outcome = {"loss": 3.2, "steps": 30, "took": False, "rolled_back": True}
    flipped = []
    live = LiveEdits.__new__(LiveEdits)  # the worker's side, without a served model
    live.layer = SimpleNamespace(records=records, edit_rows={e: e for e in range(3)}, tp_rank=1,
                                 manifest=SimpleNamespace(version=1), set_enabled=lambda *a: flipped.append(a))
    with pytest.raises(LiveEditError, match="edit 1 was rolled back when it was made"):
        live.set_enabled(1, True)
    assert flipped == []
    live.set_enabled(1, False)
    live.set_enabled(2, True)
    assert flipped == [(1, False), (2, True)]


def test_refused_persist_into_another_checkpoint_of_the_same_version(tmp_path):
    """Two checkpoints of one job share a version: the content tells them apart."""
    from vllm_memoir.core import load_artifact, save_artifact
    from vllm_memoir.edit_control import EditControl, EditControlError

    path, workers = _served_artifact(tmp_path / "art", done=3, total=6)
    control = EditControl(workers)
    later = load_artifact(path)
    later.memory += 1.0
    later.manifest.job["done"] = 4
    save_artifact(later, path)
    assert read_manifest(path).version == 1
    before, on_disk = _run(control.state()), _snapshot(path)
    with pytest.raises(EditControlError, match="POST the artifact first") as info:
        _run(control.set_enabled(0, False, persist=True))
    assert info.value.status == 409 and _run(control.state()) == before and _snapshot(path) == on_disk


def test_persist_refused_while_an_edit_job_checkpoints_into_the_artifact(tmp_path):
    from vllm_memoir.edit_control import EditControl, EditControlError

    path, workers = _served_artifact(tmp_path / "art", done=3, total=6)
    control = EditControl(workers)
    before, on_disk = _run(control.state()), _snapshot(path)
    with pytest.raises(EditControlError, match=r"checkpoint of an edit job \(3 of 6 edits done\)") as info:
        _run(control.set_enabled(0, False, persist=True))
    assert info.value.status == 409 and _run(control.state()) == before and _snapshot(path) == on_disk


def test_persist_writes_then_serves_the_new_version(tmp_path):
    from vllm_memoir.core import load_artifact
    from vllm_memoir.edit_control import EditControl, EditControlError

    path, workers = _served_artifact(tmp_path / "art")
    control = EditControl(workers)
    tensors = next(path.glob("memoir-v*.safetensors"))
    tensors_sha, tensors_inode = read_manifest(path).files[tensors.name], tensors.stat().st_ino
    with pytest.raises(EditControlError, match="no edit with id 99") as info:
        _run(control.set_enabled(99, False, persist=True))
    assert info.value.status == 404 and read_manifest(path).version == 1

    answer = _run(control.set_enabled(1, False, persist=True))
    assert answer["persisted"]["version"] == 2 == read_manifest(path).version
    assert answer["persisted"]["previous_version"] == 1 and answer["persisted"]["num_edits"] == 3
    assert [e.enabled for e in load_artifact(path).edits] == [True, False, True]
    state = _run(control.state())
    assert state["version"] == 2 and [e["enabled"] for e in state["edits"]] == [True, False, True]
    # Served by flipping the flag in the workers after the write: no swap, no load, no listing.
    assert {"memoir_prepare", "memoir_commit", "pause"}.isdisjoint(workers.calls)
    assert workers.calls.index("memoir_flags") < workers.calls.index("memoir_adopt_flags")
    # The new version names the same tensors file, not rewritten; the old edits file is gone.
    manifest = read_manifest(path)
    assert manifest.files == {tensors.name: tensors_sha, "edits-v2.jsonl": manifest.files["edits-v2.jsonl"]}
    assert tensors.stat().st_ino == tensors_inode
    assert sorted(p.name for p in path.iterdir()) == ["edits-v2.jsonl", "manifest.json", tensors.name]

    # A flag changed in memory only is written too, by the next persisted change.
    _run(control.set_enabled(2, False, persist=False))
    answer = _run(control.set_enabled(1, True, persist=True))
    assert answer["persisted"]["version"] == 3 == read_manifest(path).version
    assert [e.enabled for e in load_artifact(path).edits] == [True, True, False]
    assert [e["enabled"] for e in _run(control.state())["edits"]] == [True, True, False]


def test_a_persist_the_disk_refuses_changes_nothing(tmp_path, monkeypatch):
    """The disk fills while the new version is written: 409, version 1 on disk as it was, and the
    flag is not flipped in the workers."""
    from vllm_memoir.core import artifact as artifact_module
    from vllm_memoir.edit_control import EditControl, EditControlError

    path, workers = _served_artifact(tmp_path / "art")
    control = EditControl(workers)
    before, on_disk = _run(control.state()), _snapshot(path)

    def full(path, write):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(artifact_module, "write_atomic", full)
    with pytest.raises(EditControlError, match="cannot persist into .*No space left on device") as info:
        _run(control.set_enabled(1, False, persist=True))
    assert info.value.status == 409 and "memoir_adopt_flags" not in workers.calls
    assert _run(control.state()) == before and _snapshot(path) == on_disk


def test_a_persisted_version_swaps_in_and_extends_like_any_other(tmp_path):
    """The flag version (tensors file of version 1, manifest of version 2) loads, swaps in, and a
    later full save (an append) writes its own tensors file and drops the shared one."""
    from vllm_memoir.core import load_artifact, save_artifact
    from vllm_memoir.edit_control import EditControl

    path, workers = _served_artifact(tmp_path / "art")
    control = EditControl(workers)
    _run(control.set_enabled(0, False, persist=True))
    assert set(read_manifest(path).files) == {"memoir-v1.safetensors", "edits-v2.jsonl"}
    assert _run(control.swap(path))["version"] == 2
    artifact = load_artifact(path)
    assert [e.enabled for e in artifact.edits] == [False, True, True]
    save_artifact(artifact, path)
    assert set(read_manifest(path).files) == {"memoir-v3.safetensors", "edits-v3.jsonl"}
    assert sorted(p.name for p in path.iterdir()) == ["edits-v3.jsonl", "manifest.json", "memoir-v3.safetensors"]
    assert [e.enabled for e in load_artifact(path).edits] == [False, True, True]


def test_a_flag_version_the_workers_cannot_serve_changes_nothing_served(tmp_path):
    """Written, then refused by the workers (they serve another version by then): nothing served
    changes, and the message says where the flags are."""
    from vllm_memoir.edit_control import EditControl, EditControlError

    path, workers = _served_artifact(tmp_path / "art")
    control = EditControl(workers)
    flags = workers.memoir_flags

    def flags_then_another_version(edit_id):
        answer = flags(edit_id)
        workers.artifact.manifest.version = 7  # a swap elsewhere, between the read and the flip
        return answer
    workers.memoir_flags = flags_then_another_version
    with pytest.raises(EditControlError, match="serves version 7, the flags were written over version 1") as info:
        _run(control.set_enabled(1, False, persist=True))
    assert info.value.status == 422 and "the flags are saved in" in str(info.value)
    assert read_manifest(path).version == 2  # on disk, as the message says
    assert all(e["enabled"] for e in _run(control.state())["edits"]) and _run(control.summary())["version"] == 7


@pytest.mark.parametrize("change, message", [
    ({"version": 1}, "not newer than the served version 1"),
    ({"top_k": 5}, "not version 1 with other flags"),
    ({"files": {"memoir-v2.safetensors": "0" * 64, "edits-v2.jsonl": "0" * 64}}, "not version 1 with other flags"),
    ({"format_version": 9}, "unknown format_version 9"),
], ids=["same-version", "other-settings", "other-tensors", "bad-manifest"])
def test_workers_refuse_a_manifest_that_is_not_the_served_one_with_other_flags(change, message):
    import dataclasses

    from vllm_memoir.live_edits import LiveEditError, flags_version

    served = make_artifact(3).manifest
    served.version, served.files = 1, {"memoir-v1.safetensors": "a" * 64, "edits-v1.jsonl": "b" * 64}
    written = {**dataclasses.asdict(served), "version": 2, "files": {"memoir-v1.safetensors": "a" * 64,
                                                                     "edits-v2.jsonl": "c" * 64}}
    assert flags_version(served, 1, written).version == 2
    with pytest.raises(LiveEditError, match=message):
        flags_version(served, 1, {**written, **change})


def _bad_paths(root: Path) -> dict[str, tuple[str, str]]:
    import os

    from vllm_memoir.core import save_artifact

    directory = root / "manifest-is-a-directory"
    save_artifact(make_artifact(3), directory)
    (directory / "manifest.json").unlink()
    (directory / "manifest.json").mkdir()
    fifo = root / "manifest-is-a-fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "manifest.json")
    return {
        "directory": (str(directory), r"manifest\.json: is a directory, not a regular file"),
        "fifo": (str(fifo), r"manifest\.json: is a FIFO, not a regular file"),
        "long-name": (str(root / ("n" * 300)), r"cannot be read \(File name too long\)"),
        "5-MB-path": ("/" + "p/" * 2_500_000, r"longer than 4096 characters"),
        "nul": (str(root) + "/a\0b", r"NUL character"),
        "empty": ("", r"the artifact path is empty"),
    }


def test_unusable_artifact_paths_are_refused_in_one_bounded_line(tmp_path):
    from vllm_memoir.edit_control import EditControl, EditControlError

    path, workers = _served_artifact(tmp_path / "art")
    control = EditControl(workers)
    before = _run(control.state())
    for name, (bad, message) in _bad_paths(tmp_path).items():
        with pytest.raises(EditControlError, match=message) as info:
            _run(control.swap(bad), timeout=10)
        assert info.value.status == 422, name
        text = str(info.value)
        assert "\n" not in text and len(text) < 500, (name, text[:600])
    assert _run(control.state()) == before and not workers.staged


def test_admin_routes_check_the_key_before_the_body(tmp_path, monkeypatch, caplog):
    """Through the plugin's FastAPI routes: 401 before any parsing; with the key, 400/422 in one line."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from vllm_memoir.admin_api import MemoirAdminPlugin, key_hashes
    from vllm_memoir.edit_control import EditControl

    monkeypatch.setenv("MEMOIR_ADMIN", "1")
    app = FastAPI()
    MemoirAdminPlugin().attach_router(app)
    path, workers = _served_artifact(tmp_path / "art")
    app.state.memoir_admin_key_hashes = key_hashes([ADMIN_KEY])
    app.state.memoir_edit_control = EditControl(workers)
    client = TestClient(app, raise_server_exceptions=False)
    key = {"Authorization": f"Bearer {ADMIN_KEY}"}
    json_type = {"Content-Type": "application/json"}

    for route in ("/memoir/artifact", "/memoir/edits/0/disable", "/memoir/edits/0/enable"):
        response = client.post(route, content=b"{not json", headers=json_type)
        assert response.status_code == 401 and "admin key" in response.json()["error"], (route, response.text)
        response = client.post(route, content=b"{not json", headers={**json_type, **key})
        assert response.status_code == 400, (route, response.text)
        assert response.json()["error"].startswith("the request body is not valid JSON (Expecting property name")
    response = client.post("/memoir/artifact", json={}, headers=key)
    assert response.status_code == 400 and response.json()["error"] == "bad request body (path: Field required)"
    response = client.post("/memoir/edits/0/disable", headers=key)  # no body: persist defaults to false
    assert response.status_code == 200 and response.json() == {"edit_id": 0, "enabled": False}
    response = client.post("/memoir/edits/0/enable", json={"persist": "maybe"}, headers=key)
    assert response.status_code == 400 and response.json()["error"].startswith("bad request body (persist: ")

    before = client.get("/memoir/edits", headers=key).json()
    caplog.set_level("WARNING", logger="vllm_memoir.admin_api")
    bad_root = tmp_path / "bad"
    bad_root.mkdir()
    for name, (bad, message) in _bad_paths(bad_root).items():
        response = client.post("/memoir/artifact", json={"path": bad}, headers=key)
        assert response.status_code == 422, (name, response.status_code, response.text[:300])
        assert re.search(message, response.json()["error"]), (name, response.text[:300])
        assert len(response.text) < 600 and "\n" not in response.json()["error"], name
        assert client.get("/memoir/edits", headers=key).json() == before
    assert caplog.records and all(len(r.getMessage()) < 700 for r in caplog.records)


def test_replicated_persist_refusal_changes_no_replica(tmp_path):
    """Ray Serve: two replicas; a refused persist (disk moved on) leaves both as they were."""
    pytest.importorskip("ray.serve.llm", reason="Ray Serve LLM is not installed (pip install 'ray[serve]')")
    import asyncio

    from vllm_memoir.core import load_artifact, save_artifact
    from vllm_memoir.edit_control import EditControl, EditControlError
    from vllm_memoir.ray_live_edits import MemoirLLMServer, ReplicatedEditControl

    path, _ = _served_artifact(tmp_path / "art")
    replicas = []
    for _ in range(2):
        replica = MemoirLLMServer.__new__(MemoirLLMServer)  # the memoir_* methods only, no engine
        replica._memoir_control, replica._memoir_prepared = EditControl(FakeWorkers(path)), None
        replicas.append(replica)

    async def broadcast(method, kwargs):
        return list(await asyncio.gather(*(getattr(r, method)(**kwargs) for r in replicas)))

    control = ReplicatedEditControl(broadcast)
    save_artifact(load_artifact(path), path)  # version 2 on disk, version 1 served
    before = _run(control.state())
    with pytest.raises(EditControlError, match="version 2 on disk") as info:
        _run(control.set_enabled(2, False, persist=True))
    assert info.value.status == 409 and _run(control.state()) == before
    assert all(e["enabled"] for e in before["edits"])
    with pytest.raises(EditControlError, match="longer than 4096") as info:
        _run(control.swap("/" + "p/" * 3000))
    assert info.value.status == 422


# --- the served server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records():
    return json.loads(EDITS.read_text())[: N_V1 + K_APPENDED]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """v1 (N_V1 edits) and v2 (v1 + K_APPENDED edits, a newer version of the same artifact),
    left as written: tests serve and change copies (serve_copy).

    Checkpointed after every edit: versions count jobs, so v1 is still version 1 and v2 version 2."""
    hp = MemoirHyperParams.from_yaml(HPARAMS)
    hp.checkpoint_every = 1
    requests = load_edit_dataset(EDITS)[: N_V1 + K_APPENDED]
    root = tmp_path_factory.mktemp("live-edits")
    v1, v2 = root / "v1", root / "v2"
    run_edit_job(FACTS_MODEL, requests[:N_V1], hp, v1, progress=False)
    shutil.copytree(v1, v2)
    run_edit_job(FACTS_MODEL, requests[N_V1:], hp, v2, append=True, progress=False)
    return {"v1": v1, "v2": v2}


@pytest.fixture(scope="module")
def references(artifacts):
    return {name: MemoirHFModel.from_pretrained(FACTS_MODEL, artifact=artifacts[name]) for name in ("v1", "v2")}


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "live-edits.log"
    env = {"MEMOIR_ADMIN": "1", "MEMOIR_ADMIN_KEY": ADMIN_KEY, "MEMOIR_LOG_LEVEL": "DEBUG"}
    with VllmServer(FACTS_MODEL, [*SERVE_ARGS, *hf_overrides_args(artifacts["v1"])], log, env=env,
                    startup_timeout=600) as running:
        print(f"live-edit server (compiled): start-up {running.startup_seconds:.0f} s")
        yield running


class Admin:
    def __init__(self, server: VllmServer, key: str | None = ADMIN_KEY):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.http = httpx.Client(base_url=server.url, headers=headers, timeout=600)

    def edits(self) -> dict:
        response = self.http.get("/memoir/edits")
        assert response.status_code == 200, response.text
        return response.json()

    def swap(self, path) -> httpx.Response:
        return self.http.post("/memoir/artifact", json={"path": str(path)})

    def toggle(self, edit_id, enable: bool, persist: bool = False) -> httpx.Response:
        return self.http.post(f"/memoir/edits/{edit_id}/{'enable' if enable else 'disable'}", json={"persist": persist})


class Completer:
    """Greedy completions with the exact prompt and completion token ids the server used."""

    def __init__(self, server: VllmServer):
        self.http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=600)
        self.model = self.http.get("/v1/models").json()["data"][0]["id"]

    def body(self, prompt: str, max_tokens: int, stream: bool = False) -> dict:
        return {"model": self.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                "stream": stream, "return_token_ids": True, "ignore_eos": True}

    def complete(self, prompt: str, max_tokens: int) -> tuple[list[int], list[int]]:
        response = self.http.post("/v1/completions", json=self.body(prompt, max_tokens))
        response.raise_for_status()
        choice = response.json()["choices"][0]
        return list(choice["prompt_token_ids"]), list(choice["token_ids"])

    def stream(self, prompt: str, max_tokens: int, on_first_token) -> tuple[list[int], list[int]]:
        prompt_ids, token_ids = None, []
        with self.http.stream("POST", "/v1/completions", json=self.body(prompt, max_tokens, stream=True)) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    prompt_ids = choice.get("prompt_token_ids") or prompt_ids
                    if choice.get("token_ids") and not token_ids:
                        on_first_token()
                    token_ids += choice.get("token_ids") or []
        return list(prompt_ids), token_ids


def expected(reference: MemoirHFModel, prompt_ids: list[int], n: int) -> list[int]:
    return greedy_ids(reference, [prompt_ids], n)[0]


def switch_shows_in_answer(references: dict[str, MemoirHFModel], prompts: list[str], n: int) -> str:
    """The first of `prompts` routed under v1 whose n-token v1 answer v2 continues otherwise after
    its first token (teacher-forced): a request of it switched from v1 to v2 midway gets other
    tokens than v1's answer. Fails when none is: the swap test could not see such a switch."""
    for prompt in prompts:
        if not references["v1"].route([prompt])[0].routed:
            continue
        ids = references["v1"].prompt_ids(prompt)
        answer = expected(references["v1"], ids, n)
        if references["v2"].not_greedy([(ids + answer[:1], answer[1:])]):
            return prompt
    raise AssertionError(f"v2 continues every routed prompt's v1 answer as v1 does: {prompts}")


def serve_copy(server: VllmServer, artifacts: dict[str, Path], name: str, directory: Path) -> Path:
    """Swap a fresh copy of artifact `name` ("v1" or "v2") in, so that a test starts from a known
    served state whatever ran before; the test may persist into the copy. Returns its path."""
    copy = shutil.copytree(artifacts[name], directory / f"served-{name}")
    response = Admin(server).swap(copy)
    assert response.status_code == 200, response.text
    assert response.json()["version"] == read_manifest(artifacts[name]).version
    return copy


@contextmanager
def edit_disabled(reference: MemoirHFModel, row: int):
    enabled = reference.layer.router.enabled
    enabled[row] = False
    try:
        yield reference
    finally:
        enabled[row] = True


@pytest.mark.server
@pytest.mark.slow
def test_admin_calls_need_the_admin_key(server, artifacts, tmp_path):
    serve_copy(server, artifacts, "v1", tmp_path)
    before = Admin(server).edits()
    for key in (None, "wrong-key", API_KEY):  # with MEMOIR_ADMIN_KEY set, the API key is not an admin key
        admin = Admin(server, key)
        for response in (admin.http.get("/memoir/edits"), admin.swap(artifacts["v2"]), admin.toggle(0, False)):
            assert response.status_code == 401, (key, response.status_code, response.text)
            assert "admin key" in response.json()["error"]
    assert Admin(server).edits() == before  # nothing changed
    assert before["version"] == 1 and before["num_edits"] == N_V1


@pytest.mark.server
@pytest.mark.slow
def test_swap_mid_stream(server, artifacts, references, records, tmp_path):
    """POST v2 while requests stream in: none fails; each is served wholly by v1 or v2, as its timing says."""
    serve_copy(server, artifacts, "v1", tmp_path)
    v2_copy = shutil.copytree(artifacts["v2"], tmp_path / "swapped-v2")
    completer, admin = Completer(server), Admin(server)
    appended = [r["src"] for r in records[N_V1:]]
    prompts = appended + [r["src"] for r in records[:N_V1]] + [r["rephrase"] for r in records[:2]] + \
        [r["loc"] for r in records[:2]]
    # The appended edits' prompts are what v2 changes: unrouted under v1, routed under v2.
    v1_routes, v2_routes = references["v1"].route(appended), references["v2"].route(appended)
    assert not any(d.routed for d in v1_routes) and all(d.routed for d in v2_routes)

    cache: dict[tuple, list[int]] = {}

    def reference(version: str, prompt_ids: list[int], n: int) -> list[int]:
        """Greedy answers are prefixes of longer ones: one reference run per prompt and version."""
        key = (version, tuple(prompt_ids))
        if len(cache.get(key, ())) < n:
            cache[key] = expected(references[version], prompt_ids, max(n, 8))
        return cache[key][:n]

    lengths = [3 + i % 4 for i in range(len(prompts))]
    with ThreadPoolExecutor(8) as pool:
        before = list(pool.map(lambda a: completer.complete(*a), zip(prompts, lengths)))

    # Long requests decoding when the swap is posted, on a prompt whose answer would change if
    # they were switched to v2 midway.
    long_tokens, num_long = 45, 4
    long_prompt = switch_shows_in_answer(references, [r[key] for key in ("src", "rephrase") for r in records[:N_V1]],
                                         long_tokens)
    decoding = threading.Barrier(num_long + 1)  # every long request has its first token, and the test
    events: dict[str, float] = {}
    long_done: list[float] = []
    stream_results: list[dict] = []
    stop = threading.Event()

    def long_request():
        result = completer.stream(long_prompt, long_tokens, lambda: decoding.wait(300))
        long_done.append(time.monotonic())
        return result

    def traffic():  # a steady stream of short requests across the swap
        i = 0
        while not stop.is_set():
            prompt, n = prompts[i % len(prompts)], 2 + i % 5
            sent = time.monotonic()
            try:
                ids = completer.complete(prompt, n)
                stream_results.append({"prompt": prompt, "sent": sent, "done": time.monotonic(), "ids": ids, "n": n})
            except Exception as exc:  # noqa: BLE001 -- a failed request is the failure under test
                stream_results.append({"prompt": prompt, "sent": sent, "error": repr(exc)})
            i += 1

    with ThreadPoolExecutor(num_long + 2) as pool:
        long_futures = [pool.submit(long_request) for _ in range(num_long)]
        traffic_futures = [pool.submit(traffic) for _ in range(2)]
        decoding.wait(300)  # all long requests are decoding now
        events["swap_sent"] = time.monotonic()
        response = admin.swap(v2_copy)
        events["swap_done"] = time.monotonic()
        # Traffic goes on until 6 requests sent after the swap are answered (or one fails: reported below).
        wait_until(lambda: any("error" in r for r in list(stream_results)) or
                   sum("done" in r and r["sent"] > events["swap_done"] for r in list(stream_results)) >= 6,
                   300, "6 requests sent after the swap answered")
        stop.set()
        long_results = [future.result() for future in long_futures]
        for future in traffic_futures:
            future.result()

    assert response.status_code == 200, response.text
    swap = response.json()
    print("swap:", swap, f"{len(stream_results)} streamed requests")
    assert swap["version"] == 2 and swap["previous_version"] == 1 and swap["num_edits"] == N_V1 + K_APPENDED
    # Requests decoding at the swap are served wholly by v1: the swap waits for them. One switched
    # to v2's memory midway (keeping its route) would continue otherwise (switch_shows_in_answer),
    # so the tokens tell, not the client's clock. A fast server can finish them during the load
    # (the count below, by the client's clock, is for information); then there was nothing to wait for.
    for prompt_ids, got in long_results:
        assert got == reference("v1", prompt_ids, long_tokens)
    drain_began = events["swap_sent"] + swap["load_seconds"]
    in_flight = [done for done in long_done if done > drain_began]
    print(f"about {len(in_flight)}/{num_long} long requests still decoding when the drain began")
    assert swap["drain_seconds"] > 0  # the engine was paused for the switch

    failures = [r for r in stream_results if "error" in r]
    assert not failures, failures[:3]
    assert all(ids[1] == reference("v1", ids[0], n) for ids, n in zip(before, lengths))
    late = 0
    for r in stream_results:
        prompt_ids, got = r["ids"]
        v1, v2 = reference("v1", prompt_ids, r["n"]), reference("v2", prompt_ids, r["n"])
        if r["done"] < events["swap_sent"]:
            assert got == v1, r
        elif r["sent"] > events["swap_done"]:
            assert got == v2, r
            late += 1
        else:
            assert got in (v1, v2), r  # in flight around the swap: wholly one version
    assert late >= 6, "fewer requests were sent after the swap than waited for"
    after = [completer.complete(p, n) for p, n in zip(prompts, lengths)]
    assert all(ids[1] == reference("v2", ids[0], n) for ids, n in zip(after, lengths))


@pytest.mark.server
@pytest.mark.slow
def test_served_edits_listing(server, artifacts, references, records, tmp_path):
    served = serve_copy(server, artifacts, "v2", tmp_path)
    completer, admin = Completer(server), Admin(server)
    # Requests of its own, counted by the reference's routes: each edit's prompt and the
    # unrelated prompts that v2 leaves unrouted.
    edit_prompts = [r["src"] for r in records]
    unrouted = [r["loc"] for r in records if not references["v2"].route([r["loc"]])[0].routed]
    assert unrouted, "every unrelated prompt routes under v2: nothing to count as unrouted"
    routed_to = Counter(d.route for d in references["v2"].route(edit_prompts) if d.routed)
    before = admin.edits()
    for prompt in edit_prompts + unrouted:
        completer.complete(prompt, 2)
    state = admin.edits()
    assert state["version"] == read_manifest(served).version == 2
    assert state["path"] == str(served.resolve())
    assert state["num_edits"] == state["num_enabled"] == N_V1 + K_APPENDED
    assert [e["prompt"] for e in state["edits"]] == [r["src"] for r in records]
    assert [e["target"] for e in state["edits"]] == [r["alt"] for r in records]
    assert all(e["enabled"] for e in state["edits"])
    counted = [after["routed_requests"] - earlier["routed_requests"] for after, earlier in zip(state["edits"], before["edits"])]
    assert counted == [routed_to[row] for row in range(N_V1 + K_APPENDED)], counted
    assert state["unrouted_requests"] - before["unrouted_requests"] == len(unrouted)
    page = admin.http.get("/memoir/edits", params={"offset": 1, "limit": 2}).json()
    assert [e["edit_id"] for e in page["edits"]] == [e["edit_id"] for e in state["edits"][1:3]]


@pytest.mark.server
@pytest.mark.slow
def test_disable_enable_and_persist(server, artifacts, references, records, tmp_path):
    served = serve_copy(server, artifacts, "v2", tmp_path)  # persisted into below
    completer, admin = Completer(server), Admin(server)
    state = admin.edits()
    row = 0
    edit_id, prompt = state["edits"][row]["edit_id"], records[row]["src"]
    prompt_ids, edited = completer.complete(prompt, 4)
    assert edited == expected(references["v2"], prompt_ids, 4)
    with references["v2"].routing_off():
        base = expected(references["v2"], prompt_ids, 4)
    assert edited != base, "the edit does not change this prompt's answer; pick another"

    response = admin.toggle(edit_id, enable=False)
    assert response.status_code == 200, response.text
    assert completer.complete(prompt, 4)[1] == base  # the base model's answer now
    with edit_disabled(references["v2"], row) as disabled:
        assert not disabled.route([prompt])[0].routed
    assert admin.edits()["edits"][row]["enabled"] is False
    assert admin.toggle(edit_id, enable=True).status_code == 200
    assert completer.complete(prompt, 4)[1] == edited

    # Persist: the flag is written into the served artifact as a new version, which is then served.
    response = admin.toggle(edit_id, enable=False, persist=True)
    assert response.status_code == 200, response.text
    persisted = response.json()["persisted"]
    on_disk = read_manifest(served)
    assert persisted["version"] == on_disk.version == state["version"] + 1
    lines = (served / f"edits-v{on_disk.version}.jsonl").read_text().splitlines()
    flags = {json.loads(line)["edit_id"]: json.loads(line)["enabled"] for line in lines}
    assert flags[edit_id] is False and sum(flags.values()) == N_V1 + K_APPENDED - 1
    assert admin.edits()["version"] == on_disk.version
    assert completer.complete(prompt, 4)[1] == base
    response = admin.toggle(edit_id, enable=True, persist=True)
    assert response.status_code == 200 and response.json()["persisted"]["version"] == on_disk.version + 1
    assert completer.complete(prompt, 4)[1] == edited


def _truncated(source: Path, out: Path) -> Path:
    shutil.copytree(source, out)
    tensors = next(out.glob("memoir-v*.safetensors"))
    tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
    return out


def _other_base_model(source: Path, out: Path) -> Path:
    """The same files, declared for another base model (what an artifact of another model carries)."""
    shutil.copytree(source, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["base_model"], manifest["base_fingerprint"] = "some/other-model", "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.mark.server
@pytest.mark.slow
def test_bad_requests_refused_and_old_edits_still_served(server, artifacts, references, records, tmp_path):
    serve_copy(server, artifacts, "v2", tmp_path)
    completer, admin = Completer(server), Admin(server)
    before = admin.edits()
    cases = {
        "truncated": (_truncated(artifacts["v2"], tmp_path / "truncated"), 422, "checksum mismatch"),
        "other base model": (_other_base_model(artifacts["v2"], tmp_path / "other"), 422, "different base model"),
        "missing": (tmp_path / "does-not-exist", 422, "missing"),
    }
    for name, (path, status, message) in cases.items():
        response = admin.swap(path)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert message in response.json()["error"] and str(path.name) in response.json()["error"], response.text
    for response in (admin.toggle(987654, enable=False), admin.toggle(987654, enable=True)):
        assert response.status_code == 404 and "987654" in response.json()["error"], response.text
    assert admin.http.post("/memoir/artifact", json={}).status_code == 400  # no path: vLLM answers 400 for a bad body

    assert admin.edits() == before  # same version, path, flags and counts
    prompt_ids, got = completer.complete(records[N_V1]["src"], 4)
    assert got == expected(references["v2"], prompt_ids, 4)  # v2's content still served


@pytest.mark.server
@pytest.mark.slow
def test_refusals_found_by_a_probe_change_nothing(server, artifacts, references, records, tmp_path):
    """The live server: a refused persist keeps the edit on; bad JSON without the key is 401; a
    manifest that is a directory or a FIFO, or a too-long path, is 422 in one line; and the next
    request on the same keep-alive connection is answered."""
    from vllm_memoir.core import load_artifact, save_artifact

    served = serve_copy(server, artifacts, "v2", tmp_path)
    completer, admin = Completer(server), Admin(server)
    log_start = len(server.log_text())
    before = admin.edits()
    save_artifact(load_artifact(served), served)  # a newer version on disk than the served one
    edit_id = before["edits"][0]["edit_id"]
    for enable in (False, True):
        response = admin.toggle(edit_id, enable=enable, persist=True)
        assert response.status_code == 409, response.text
        assert f"version {before['version'] + 1} on disk" in response.json()["error"], response.text
    assert admin.edits() == before  # edit 0 still enabled, same version and content
    prompt_ids, got = completer.complete(records[0]["src"], 4)
    assert got == expected(references["v2"], prompt_ids, 4)  # still edited (the edit is on)
    before = admin.edits()  # that completion counted a routed request

    keyless = Admin(server, key=None).http
    response = keyless.post("/memoir/artifact", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 401, response.text
    response = admin.http.post("/memoir/artifact", content=b"{not json", headers={"Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"], response.text

    directory = tmp_path / "directory-manifest"
    directory.mkdir()
    (directory / "manifest.json").mkdir()
    fifo = tmp_path / "fifo-manifest"
    fifo.mkdir()
    os.mkfifo(fifo / "manifest.json")
    for path, message in ((directory, "is a directory"), (fifo, "is a FIFO"), (tmp_path / ("n" * 300), "too long"),
                          ("/" + "p/" * 100_000, "longer than 4096 characters")):
        response = admin.swap(path)
        assert response.status_code == 422 and message in response.json()["error"], response.text[:300]
        assert len(response.text) < 600, response.text[:300]
        assert admin.edits() == before  # the same connection, answered
    log = server.log_text()[log_start:]  # what this test made the server log
    assert "Traceback" not in log and "p/p/p/" * 200 not in log, log[-2000:]


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("MEMOIR_TP_TESTS") == "0", reason="MEMOIR_TP_TESTS=0 (a second server, ~1 min)")
def test_two_rank_swap(artifacts, references, records, tmp_path_factory):
    """--tensor-parallel-size 2: both ranks load, commit and serve the same version."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two CPU cores are needed to bind two tensor-parallel workers")
    env = {"MEMOIR_ADMIN": "1", "MEMOIR_ADMIN_KEY": ADMIN_KEY, "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"}
    args = [*SERVE_ARGS, "--enforce-eager", "--tensor-parallel-size", "2", *hf_overrides_args(artifacts["v1"])]
    log = tmp_path_factory.mktemp("logs") / "tp2.log"
    with VllmServer(FACTS_MODEL, args, log, env=env, startup_timeout=600) as server:
        completer, admin = Completer(server), Admin(server)
        prompts = [r["src"] for r in records] + [r["loc"] for r in records[:2]]
        assert admin.edits()["version"] == 1
        for ids in [completer.complete(p, 4) for p in prompts]:
            assert ids[1] == expected(references["v1"], ids[0], 4)
        response = admin.swap(artifacts["v2"])
        assert response.status_code == 200, response.text
        print(f"tensor-parallel server: start-up {server.startup_seconds:.0f} s, swap {response.json()}")
        state = admin.edits()
        assert state["version"] == read_manifest(artifacts["v2"]).version and state["num_edits"] == N_V1 + K_APPENDED
        with ThreadPoolExecutor(len(prompts)) as pool:
            results = list(pool.map(lambda p: completer.complete(p, 4), prompts))
        assert all(ids[1] == expected(references["v2"], ids[0], 4) for ids in results)
