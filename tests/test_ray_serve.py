"""The facts model with a MEMOIR artifact served through Ray Serve LLM on a local CPU Ray cluster.

Two replicas with the live-edit routes on (`admin: true`; 2-4 min to deploy on 2 cores): the
`openai` client gets, through Ray Serve's OpenAI ingress, the same greedy tokens as the
transformers MEMOIR reference, and the edited answers; then the admin routes swap in a newer
artifact version, disable an edit and refuse bad calls, in every replica at once. Ray is shut
down afterwards and no replica or engine process lingers. The tests share the app, not its
state: each first swaps in the version it starts from (`serve_version`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from helpers import wait_until
from plugin_reference import greedy_ids

from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from vllm_memoir.server_process import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FACTS_MODEL = REPO / "models" / "facts-llama"
FACTS_DATA = REPO / "data" / "facts" / "zsre-facts-T10.json"
NUM_EDITS = 4
APPENDED = 2  # edits v2 adds to v1
NUM_REPLICAS = 2
ADMIN_KEY = "ray-admin-key-for-tests"
MAX_TOKENS = 4
DEPLOY_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def ray_serve():
    return pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")


@pytest.fixture(scope="module")
def facts_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts-artifact")
    hp = MemoirHyperParams.from_yaml(REPO / "configs" / "facts-llama.yaml")
    run_edit_job(FACTS_MODEL, FACTS_DATA, hp, out, limit=NUM_EDITS, progress=False)
    return out


@pytest.fixture(scope="module")
def artifact_v2(facts_artifact, tmp_path_factory):
    """v1 plus APPENDED edits, written as a copy (v1 stays what the replicas started with)."""
    from edit_tools.datasets import load_edit_dataset

    out = tmp_path_factory.mktemp("facts-artifact-v2") / "artifact"
    shutil.copytree(facts_artifact, out)
    hp = MemoirHyperParams.from_yaml(REPO / "configs" / "facts-llama.yaml")
    appended = load_edit_dataset(FACTS_DATA)[NUM_EDITS:NUM_EDITS + APPENDED]
    run_edit_job(FACTS_MODEL, appended, hp, out, append=True, progress=False)
    return out


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.add(pid)
    return alive


@pytest.fixture(scope="module")
def served(ray_serve, facts_artifact):
    """(openai client, served model id, base URL) of a two-replica MEMOIR app with live edits."""
    import ray
    from openai import OpenAI

    from vllm_memoir.ray_app import build_app

    port = free_port()
    # Logical CPUs, not cores: Ray Serve LLM reserves 1 for the ingress, and per replica 1 for
    # the replica actor plus 1 per engine worker (its placement group); with fewer the app
    # never schedules and serve.run waits forever.
    # The ingress reads the admin key from its environment, which the local cluster inherits.
    os.environ["MEMOIR_ADMIN_KEY"] = ADMIN_KEY
    ray.init(num_cpus=1 + 2 * NUM_REPLICAS, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({
            "model": str(FACTS_MODEL), "artifact": str(facts_artifact), "model_id": "facts-llama",
            "num_replicas": NUM_REPLICAS, "dtype": "float32", "admin": True,
            "engine_kwargs": {"max_model_len": 64, "enforce_eager": True},
            "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"},
        })
        started = time.monotonic()
        # Returns once every deployment is healthy; raises if a replica fails to start.
        ray_serve.run(app, name="memoir", route_prefix="/", blocking=False)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=120, max_retries=0)
        while True:
            try:
                models = client.models.list().data
                break
            except Exception:  # the proxy may take a moment to route to the new app
                if time.monotonic() - started > DEPLOY_TIMEOUT_S:
                    raise
                time.sleep(2)
        print(f"Ray Serve app ready after {time.monotonic() - started:.0f} s")
        yield client, models[0].id, f"http://127.0.0.1:{port}"
    finally:
        os.environ.pop("MEMOIR_ADMIN_KEY", None)
        spawned = _descendants(os.getpid())
        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()
        # Replica actors own the engine-core subprocesses; Ray stops them, but make sure.
        deadline = time.monotonic() + 30
        while _alive(spawned) and time.monotonic() < deadline:
            time.sleep(1)
        leftovers = _alive(spawned)
        for pid in leftovers:
            os.kill(pid, signal.SIGKILL)
        assert not leftovers, f"processes outlived ray.shutdown(): {sorted(leftovers)}"


def test_openai_client_gets_edited_answers_through_ray_serve(served, facts_artifact):
    client, model_id, base_url = served
    serve_version(base_url, facts_artifact, 1)
    assert model_id == "facts-llama"
    records = json.loads(FACTS_DATA.read_text())
    prompts = [r["src"] for r in records[:NUM_EDITS]] + [r["rephrase"] for r in records[:NUM_EDITS]]
    prompts += [r["loc"] for r in records[:2]]

    served_ids, served_texts = [], []
    for prompt in prompts:
        response = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                             extra_body={"return_token_ids": True, "ignore_eos": True})
        choice = response.choices[0]
        served_ids.append((list(choice.prompt_token_ids), list(choice.token_ids)))
        served_texts.append(choice.text)

    reference = MemoirHFModel.from_pretrained(FACTS_MODEL, artifact=facts_artifact)
    expected = greedy_ids(reference, [p for p, _ in served_ids], MAX_TOKENS)
    mismatches = [(prompt, got, want) for prompt, (_, got), want in zip(prompts, served_ids, expected) if got != want]
    assert not mismatches, f"Ray Serve differs from the transformers reference: {mismatches}"

    routes = reference.route(prompts)
    assert any(d.routed for d in routes), "no prompt routes to an edit: the comparison would not test the plugin"
    targets = [r["alt"] for r in records[:NUM_EDITS]]
    edited = [text for text, target in zip(served_texts[:NUM_EDITS], targets) if text.strip().startswith(target)]
    print(f"{len(edited)}/{NUM_EDITS} edit prompts answered with the new target through Ray Serve; "
          f"{sum(d.routed for d in routes)}/{len(prompts)} prompts routed; all {len(prompts)} token-identical")
    assert edited, f"no edited answer through Ray Serve: {list(zip(prompts, served_texts))}"


# --- live edits in every replica (admin routes on the ingress) ----------------------------------

def _admin(base_url: str, key: str | None = ADMIN_KEY):
    import httpx

    return httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=600)


def serve_version(base_url: str, artifact: Path, version: int) -> None:
    """Swap `artifact` in on every replica (read, never written by the tests), so that a test
    starts from a known version whatever ran before."""
    with _admin(base_url) as admin:
        response = admin.post("/memoir/artifact", json={"path": str(artifact)})
    assert response.status_code == 200, response.text
    assert response.json()["version"] == version, response.text


def _complete(client, model_id: str, prompt: str) -> tuple[list[int], list[int]]:
    choice = client.completions.create(model=model_id, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0]
    return list(choice.prompt_token_ids), list(choice.token_ids)


def test_ray_admin_routes_need_the_admin_key(served, facts_artifact):
    _, _, base_url = served
    serve_version(base_url, facts_artifact, 1)
    for key in (None, "wrong-key"):
        with _admin(base_url, key) as admin:
            for response in (admin.get("/memoir/edits"), admin.post("/memoir/artifact", json={"path": "/x"}),
                             admin.post("/memoir/edits/0/disable")):
                assert response.status_code == 401, (key, response.status_code, response.text)
                assert "admin key" in response.json()["error"]
    with _admin(base_url) as admin:
        state = admin.get("/memoir/edits").json()
    assert state["version"] == 1 and state["num_edits"] == NUM_EDITS
    assert state["consistent"] and [r["version"] for r in state["replicas"]] == [1] * NUM_REPLICAS


def test_ray_swap_reaches_every_replica_without_a_failed_request(served, facts_artifact, artifact_v2):
    """POST v2 while requests flow: none fails, every replica reports v2, and answers are v2's."""
    client, model_id, base_url = served
    serve_version(base_url, facts_artifact, 1)
    records = json.loads(FACTS_DATA.read_text())
    appended = [r["src"] for r in records[NUM_EDITS:NUM_EDITS + APPENDED]]
    v1 = MemoirHFModel.from_pretrained(FACTS_MODEL, artifact=facts_artifact)
    v2 = MemoirHFModel.from_pretrained(FACTS_MODEL, artifact=artifact_v2)
    assert not any(d.routed for d in v1.route(appended)) and all(d.routed for d in v2.route(appended))

    errors: list[str] = []
    answered: list[tuple[int, float]] = []  # (traffic thread, when a request was sent) of each answer
    stop = threading.Event()

    def traffic(thread: int):
        prompts = appended + [r["src"] for r in records[:NUM_EDITS]] + [r["loc"] for r in records[:2]]
        i = 0
        while not stop.is_set():
            sent = time.monotonic()
            try:
                _complete(client, model_id, prompts[i % len(prompts)])
                answered.append((thread, sent))
            except Exception as exc:  # noqa: BLE001 -- a failed request is the failure under test
                errors.append(repr(exc))
            i += 1

    threads = [threading.Thread(target=traffic, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    try:
        # Requests flow on every thread before the swap, and go on flowing after it answers
        # (a failed request ends the wait: it is reported below).
        wait_until(lambda: errors or {n for n, _ in list(answered)} == {0, 1, 2}, 120,
                   "an answer on each traffic thread")
        with _admin(base_url) as admin:
            response = admin.post("/memoir/artifact", json={"path": str(artifact_v2)})
        swapped = time.monotonic()
        wait_until(lambda: errors or sum(sent > swapped for _, sent in list(answered)) >= 3, 120,
                   "3 answers to requests sent after the swap")
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert response.status_code == 200, response.text
    swap = response.json()
    print("Ray swap:", swap)
    assert swap["version"] == 2 and swap["previous_versions"] == [1] * NUM_REPLICAS
    assert swap["num_edits"] == NUM_EDITS + APPENDED and len(swap["replicas"]) == NUM_REPLICAS
    assert not errors, errors[:3]

    with _admin(base_url) as admin:
        state = admin.get("/memoir/edits").json()
    assert state["consistent"] and [r["version"] for r in state["replicas"]] == [2] * NUM_REPLICAS
    # Each prompt several times: Serve spreads requests over both replicas; all must answer as v2.
    for prompt in appended * 3:
        prompt_ids, got = _complete(client, model_id, prompt)
        assert got == greedy_ids(v2, [prompt_ids], MAX_TOKENS)[0], prompt
        assert got != greedy_ids(v1, [prompt_ids], MAX_TOKENS)[0], "v2 does not change this answer"
    with _admin(base_url) as admin:
        counted = admin.get("/memoir/edits").json()["edits"]
    assert all(e["routed_requests"] >= 3 for e in counted[NUM_EDITS:]), counted  # summed over replicas


def _an_appended_edit(state: dict, client, model_id: str, reference: MemoirHFModel):
    """The first appended edit of the served listing `state`: (edit id, prompt, the server's
    edited answer, the base model's answer by the reference with routing off)."""
    edit_id, prompt = state["edits"][NUM_EDITS]["edit_id"], state["edits"][NUM_EDITS]["prompt"]
    prompt_ids, edited = _complete(client, model_id, prompt)
    with reference.routing_off():
        base = greedy_ids(reference, [prompt_ids], MAX_TOKENS)[0]
    return edit_id, prompt, edited, base


def test_ray_disable_and_refusals_apply_to_every_replica(served, artifact_v2, tmp_path):
    client, model_id, base_url = served
    serve_version(base_url, artifact_v2, 2)
    v2 = MemoirHFModel.from_pretrained(FACTS_MODEL, artifact=artifact_v2)
    with _admin(base_url) as admin:
        state = admin.get("/memoir/edits").json()
        edit_id, prompt, edited, base = _an_appended_edit(state, client, model_id, v2)
        assert edited != base

        assert admin.post(f"/memoir/edits/{edit_id}/disable").status_code == 200
        answers = [_complete(client, model_id, prompt)[1] for _ in range(4)]
        assert answers == [base] * 4, "a replica still serves the disabled edit"
        after = admin.get("/memoir/edits").json()
        assert after["consistent"] and [r["num_enabled"] for r in after["replicas"]] == [len(state["edits"]) - 1] * 2
        assert admin.post(f"/memoir/edits/{edit_id}/enable").status_code == 200
        assert [_complete(client, model_id, prompt)[1] for _ in range(4)] == [edited] * 4

        truncated = tmp_path / "truncated"
        shutil.copytree(artifact_v2, truncated)
        tensors = next(truncated.glob("memoir-v*.safetensors"))
        tensors.write_bytes(tensors.read_bytes()[: tensors.stat().st_size // 2])
        for path, status, message in ((truncated, 422, "checksum mismatch"), (tmp_path / "missing", 422, "missing")):
            response = admin.post("/memoir/artifact", json={"path": str(path)})
            assert response.status_code == status and message in response.json()["error"], response.text
        response = admin.post("/memoir/edits/987654/disable")
        assert response.status_code == 404 and "987654" in response.json()["error"], response.text
        final = admin.get("/memoir/edits").json()
    assert final["consistent"] and [r["version"] for r in final["replicas"]] == [2] * NUM_REPLICAS
    assert final["num_enabled"] == len(state["edits"])


def test_ray_persisted_disable_flips_every_replica_without_a_reload(served, artifact_v2, tmp_path):
    """A persisted disable is written once (a records-only version that keeps the tensors file)
    and taken by every replica in place: both serve the new version, the edit is off
    everywhere, and nothing was loaded again."""
    from vllm_memoir.core import load_artifact

    client, model_id, base_url = served
    own = tmp_path / "artifact"  # a copy: the persisted versions must not change the shared fixture
    shutil.copytree(artifact_v2, own)
    serve_version(base_url, own, 2)
    v2 = MemoirHFModel.from_pretrained(FACTS_MODEL, artifact=own)
    tensors_before = {p.name: p.stat().st_ino for p in own.glob("memoir-v*.safetensors")}
    with _admin(base_url) as admin:
        state = admin.get("/memoir/edits").json()
        edit_id, prompt, edited, base = _an_appended_edit(state, client, model_id, v2)
        response = admin.post(f"/memoir/edits/{edit_id}/disable", json={"persist": True})
        assert response.status_code == 200, response.text
        persisted = response.json()["persisted"]
        assert (persisted["version"], persisted["previous_version"]) == (3, 2), persisted
        assert "load_seconds" not in persisted and persisted["flip_seconds"] >= 0
        assert [_complete(client, model_id, prompt)[1] for _ in range(4)] == [base] * 4
        after = admin.get("/memoir/edits").json()
        assert after["consistent"] and [r["version"] for r in after["replicas"]] == [3] * NUM_REPLICAS
        assert after["num_enabled"] == len(state["edits"]) - 1
        # On disk: version 3 with the flag, under the same tensors file (not rewritten).
        on_disk = load_artifact(own)
        assert on_disk.manifest.version == 3
        assert [e.enabled for e in on_disk.edits if e.edit_id == edit_id] == [False]
        assert {p.name: p.stat().st_ino for p in own.glob("memoir-v*.safetensors")} == tensors_before
        response = admin.post(f"/memoir/edits/{edit_id}/enable", json={"persist": True})
        assert response.status_code == 200 and response.json()["persisted"]["version"] == 4, response.text
        assert [_complete(client, model_id, prompt)[1] for _ in range(4)] == [edited] * 4
        # An unknown edit is refused before anything is written.
        assert admin.post("/memoir/edits/987654/disable", json={"persist": True}).status_code == 404
    assert load_artifact(own).manifest.version == 4
