"""Live edits against a real `memoir-serve` (MEMOIR_ADMIN=1): swap, inspect, disable, persist, refuse.

One compiled server (no --enforce-eager) of the embedded facts model for the module, started
with artifact v1 (3 edits); v2 is v1 plus 2 appended edits (`run_edit_job(..., append=True)`).
Every served answer is checked against the transformers reference of the version that must
have served it (tests/plugin_reference.py), on the exact prompt token ids vLLM reports.
The tests run in file order and share the server: each reads the state it starts from.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from plugin_reference import greedy_ids

from edit_tools.datasets import load_edit_dataset
from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from vllm_memoir.core import read_manifest
from vllm_memoir.server_process import REQUIRED_FLAGS, VllmServer, memoir_overrides

REPO = Path(__file__).resolve().parents[1]
FACTS_MODEL = REPO / "models" / "facts-llama"
EDITS = REPO / "data" / "facts" / "zsre-facts-T10.json"
HPARAMS = REPO / "configs" / "facts-llama.yaml"
N_V1, K_APPENDED = 3, 2
ADMIN_KEY, API_KEY = "admin-key-for-tests", "api-key-for-tests"
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "64", "--api-key", API_KEY, *REQUIRED_FLAGS]


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
    from vllm_memoir.request_routes import PENDING, RequestRoutes

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


# --- the served server ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def records():
    return json.loads(EDITS.read_text())[: N_V1 + K_APPENDED]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """v1 (N_V1 edits) and v2 (v1 + K_APPENDED edits, a newer version of the same artifact)."""
    hp = MemoirHyperParams.from_yaml(HPARAMS)
    requests = load_edit_dataset(EDITS)[: N_V1 + K_APPENDED]
    root = tmp_path_factory.mktemp("live-edits")
    v1, v2 = root / "v1", root / "v2"
    run_edit_job(FACTS_MODEL, requests[:N_V1], hp, v1, progress=False)
    shutil.copytree(v1, v2)
    run_edit_job(FACTS_MODEL, requests[N_V1:], hp, v2, append=True, progress=False)
    return {"v1": v1, "v2": v2, "root": root}


@pytest.fixture(scope="module")
def references(artifacts):
    return {name: MemoirHFModel.from_pretrained(FACTS_MODEL, artifact=artifacts[name]) for name in ("v1", "v2")}


@pytest.fixture(scope="module")
def server(artifacts, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "live-edits.log"
    env = {"MEMOIR_ADMIN": "1", "MEMOIR_ADMIN_KEY": ADMIN_KEY, "MEMOIR_LOG_LEVEL": "DEBUG"}
    with VllmServer(FACTS_MODEL, [*SERVE_ARGS, *memoir_overrides(artifacts["v1"])], log, env=env,
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
def test_admin_calls_need_the_admin_key(server, artifacts):
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
def test_swap_mid_stream(server, artifacts, references, records):
    """POST v2 while requests stream in: none fails; each is served wholly by v1 or v2, as its timing says."""
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

    # Long requests decoding when the swap is posted (their prompt is answered differently by v2).
    long_prompt, long_tokens = appended[0], 45
    num_long = 4
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
        response = admin.swap(artifacts["v2"])
        events["swap_done"] = time.monotonic()
        time.sleep(3.0)  # traffic after the swap
        stop.set()
        long_results = [future.result() for future in long_futures]
        for future in traffic_futures:
            future.result()

    assert response.status_code == 200, response.text
    swap = response.json()
    print("swap:", swap, f"{len(stream_results)} streamed requests")
    assert swap["version"] == 2 and swap["previous_version"] == 1 and swap["num_edits"] == N_V1 + K_APPENDED
    # Requests decoding at the swap are served wholly by v1: the swap waits for them.
    for prompt_ids, got in long_results:
        assert got == reference("v1", prompt_ids, long_tokens)
        assert got != reference("v2", prompt_ids, long_tokens)
    # Those still running when the drain began (after the load) were waited for: they finished
    # before the swap answered (which leaves the server after the stream's last chunk; 0.2 s of
    # client-side slack). A fast server can finish them during the load; then only v1-parity holds.
    drain_began = events["swap_sent"] + swap["load_seconds"]
    in_flight = [done for done in long_done if done > drain_began]
    print(f"{len(in_flight)}/{num_long} long requests still decoding when the drain began")
    assert all(done <= events["swap_done"] + 0.2 for done in in_flight) and swap["drain_seconds"] > 0

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
    assert late > 0, "no request was sent after the swap"
    after = [completer.complete(p, n) for p, n in zip(prompts, lengths)]
    assert all(ids[1] == reference("v2", ids[0], n) for ids, n in zip(after, lengths))


@pytest.mark.server
@pytest.mark.slow
def test_served_edits_listing(server, artifacts, records):
    state = Admin(server).edits()
    assert state["version"] == read_manifest(artifacts["v2"]).version == 2
    assert state["path"] == str(artifacts["v2"].resolve())
    assert state["num_edits"] == state["num_enabled"] == N_V1 + K_APPENDED
    assert [e["prompt"] for e in state["edits"]] == [r["src"] for r in records]
    assert [e["target"] for e in state["edits"]] == [r["alt"] for r in records]
    assert all(e["enabled"] for e in state["edits"])
    # The appended edits were routed only after the swap (the test above asked them then).
    assert all(e["routed_requests"] > 0 for e in state["edits"][N_V1:])
    assert state["unrouted_requests"] > 0
    page = Admin(server).http.get("/memoir/edits", params={"offset": 1, "limit": 2}).json()
    assert [e["edit_id"] for e in page["edits"]] == [e["edit_id"] for e in state["edits"][1:3]]


@pytest.mark.server
@pytest.mark.slow
def test_disable_enable_and_persist(server, artifacts, references, records):
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
    on_disk = read_manifest(artifacts["v2"])
    assert persisted["version"] == on_disk.version == state["version"] + 1
    lines = (artifacts["v2"] / f"edits-v{on_disk.version}.jsonl").read_text().splitlines()
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
def test_bad_requests_refused_and_old_edits_still_served(server, artifacts, references, records):
    completer, admin = Completer(server), Admin(server)
    before = admin.edits()
    root = artifacts["root"]
    cases = {
        "truncated": (_truncated(artifacts["v2"], root / "truncated"), 422, "checksum mismatch"),
        "other base model": (_other_base_model(artifacts["v2"], root / "other"), 422, "different base model"),
        "missing": (root / "does-not-exist", 422, "missing"),
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
@pytest.mark.skipif(os.environ.get("MEMOIR_TP_TESTS") == "0", reason="MEMOIR_TP_TESTS=0 (a second server, ~1 min)")
def test_two_rank_swap(artifacts, references, records, tmp_path_factory):
    """--tensor-parallel-size 2: both ranks load, commit and serve the same version."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("two CPU cores are needed to bind two tensor-parallel workers")
    env = {"MEMOIR_ADMIN": "1", "MEMOIR_ADMIN_KEY": ADMIN_KEY, "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"}
    args = [*SERVE_ARGS, "--enforce-eager", "--tensor-parallel-size", "2", *memoir_overrides(artifacts["v1"])]
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
