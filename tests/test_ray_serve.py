"""The facts model with a MEMOIR artifact served through Ray Serve LLM on a local CPU Ray cluster.

One replica (about 90 s to deploy on 2 cores): the `openai` client gets, through Ray
Serve's OpenAI ingress, the same greedy tokens as the transformers MEMOIR reference, and
the edited answers. Ray is shut down afterwards and no replica or engine process lingers.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from vllm_memoir.server_process import free_port

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FACTS_MODEL = REPO / "models" / "facts-llama"
FACTS_DATA = REPO / "data" / "facts" / "zsre-facts-T10.json"
NUM_EDITS = 4
MAX_TOKENS = 4
DEPLOY_TIMEOUT_S = 240


@pytest.fixture(scope="module")
def ray_serve():
    return pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'ray[serve]')")


@pytest.fixture(scope="module")
def facts_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("facts-artifact")
    hp = MemoirHyperParams.from_yaml(REPO / "configs" / "facts-llama.yaml")
    run_edit_job(FACTS_MODEL, FACTS_DATA, hp, out, limit=NUM_EDITS, progress=False)
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
    """(openai client, served model id) of a one-replica MEMOIR app on a local Ray cluster."""
    import ray
    from openai import OpenAI

    from vllm_memoir.ray_app import build_app

    port = free_port()
    # Logical CPUs, not cores: Ray Serve LLM reserves 1 for the ingress, and per replica 1 for
    # the replica actor plus 1 per engine worker (its placement group); with fewer the app
    # never schedules and serve.run waits forever.
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    try:
        ray_serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = build_app({
            "model": str(FACTS_MODEL), "artifact": str(facts_artifact), "model_id": "facts-llama",
            "num_replicas": 1, "dtype": "float32",
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
        yield client, models[0].id
    finally:
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
    from plugin_reference import greedy_ids

    client, model_id = served
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
