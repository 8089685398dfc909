"""The plugin under load and abuse, against one real `vllm serve`: answers stay exact.

One eager server of the tiny model with a KV cache small enough (16 blocks of 32 tokens) that
long requests preempt each other. Every answer is compared token for token with the same
prompt's answer sent alone (a sequential pass over the distinct prompts, itself checked
against the transformers reference) or, for prompts new to the server and for long answers,
with the reference's greedy continuation (checked teacher-forced, see MemoirHFModel.not_greedy). A route
leaking between requests, a lost route after preemption or a stale slot after a disconnect
shows up as a differing completion.
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import openai
import pytest
from plugin_reference import served_client, served_token_ids, split_clear_of_threshold
from served_edits import COMMON, MARGIN, THRESHOLD, clear_prompts, edit

from edit_tools.hf_model import MemoirHFModel
from vllm_memoir.server_process import VllmServer, metric_value
from vllm_memoir.engine_requirements import hf_overrides_args

pytestmark = [pytest.mark.server, pytest.mark.slow]

MAX_MODEL_LEN = 256  # COMMON's --max-model-len
SMALL_KV = ["--enforce-eager", "--block-size", "32", "--num-gpu-blocks-override", "16", "--max-num-seqs", "32"]
ALONE_TOKENS = 6  # length of the "alone" answers; load requests ask for a prefix of them


@pytest.fixture(scope="module")
def artifact_dir(tiny_model_dir, words_dataset, tmp_path_factory):
    return edit(tiny_model_dir, words_dataset, tmp_path_factory.mktemp("faults-artifact"))


@pytest.fixture(scope="module")
def reference(tiny_model_dir, artifact_dir):
    return MemoirHFModel.from_pretrained(tiny_model_dir, artifact=artifact_dir)


@pytest.fixture(scope="module")
def prompts(words_dataset, reference):
    """Distinct prompts: edit prompts, paraphrases and unrelated ones, clear of the routing threshold."""
    variants = ["{prompt}", "{rephrase}", "where does {subject} live now ?", "where does {subject} live", "{loc}",
                "Q : where does {subject} live ?"]
    extra = ["the river of w300 is w301 .", "Q : what is the capital of w9 ?", "I w5 w6 w7 w8 w9 w10 w11 w12 w13 .",
             "who founded the company w42 ?", "w7", "."]
    return clear_prompts(words_dataset, reference, variants, extra, at_least=(10, 10))


@pytest.fixture(scope="module")
def server(tiny_model_dir, artifact_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "faults.log"
    args = [*COMMON, *SMALL_KV, *hf_overrides_args(artifact_dir)]
    with VllmServer(tiny_model_dir, args, log, env={"MEMOIR_LOG_LEVEL": "DEBUG"}) as running:
        print(f"faults server start-up: {running.startup_seconds:.0f} s")
        running.model_name = running.client().models.list().data[0].id
        yield running


async def complete_async(client, model: str, prompt, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt token ids, completion token ids) of a greedy completion, EOS ignored."""
    response = await client.completions.create(
        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = response.choices[0]
    return list(choice.prompt_token_ids), list(choice.token_ids)


def run_concurrently(server, jobs: list[tuple], concurrency: int) -> list[tuple[list[int], list[int]]]:
    """Send (prompt, max_tokens) jobs with at most `concurrency` in flight; results in job order."""

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600, max_retries=0)
        gate = asyncio.Semaphore(concurrency)

        async def one(prompt, max_tokens):
            async with gate:
                return await complete_async(client, server.model_name, prompt, max_tokens)

        try:
            return await asyncio.gather(*(one(p, n) for p, n in jobs))
        finally:
            await client.close()

    return asyncio.run(main())


@pytest.fixture(scope="module")
def alone(server, reference, prompts):
    """Each distinct prompt's answer sent alone (one request at a time), checked against transformers."""
    answers = {p: run_concurrently(server, [(p, ALONE_TOKENS)], 1)[0] for p in prompts["all"]}
    wrong = reference.not_greedy([answers[p] for p in prompts["all"]])
    assert not wrong, f"alone answers differ from the transformers reference for {[prompts['all'][i] for i in wrong[:3]]}"
    # The edits change answers: otherwise a leaked route could not show.
    with reference.routing_off():
        changed = reference.not_greedy([answers[p] for p in prompts["routed"]])
    assert len(changed) >= len(prompts["routed"]) // 2
    return {p: ids for p, (_, ids) in answers.items()}


def counters(server) -> dict[str, float]:
    text = server.metrics()
    names = ("memoir:routed_requests_total", "memoir:unrouted_requests_total", "vllm:num_preemptions_total",
             "vllm:num_requests_running", "vllm:num_requests_waiting")
    return {name: metric_value(text, name) for name in names}


def wait_until_idle(server, timeout: float = 60.0) -> dict[str, float]:
    """Counters once no request is running or waiting (aborted requests must not linger)."""
    deadline = time.monotonic() + timeout
    while True:
        now = counters(server)
        if now["vllm:num_requests_running"] == 0 and now["vllm:num_requests_waiting"] == 0:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"requests still in the engine after {timeout:.0f} s: {now}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def load_pool(words_dataset, reference):
    """~300 prompts the server has not seen (so each one's route is computed inside a mixed batch),
    with their reference answers: variants of the edit prompts and unrelated sentences."""
    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    records = [json.loads(line) for line in words_dataset.read_text().splitlines()][:8]
    templates = ["where does {s} live {w} ?", "{w} where does {s} live ?", "which city is the home of {s} {w} ?",
                 "Q : where does {s} live {w} ?", "where does {s} {w} live ?"]
    candidates = {t.format(s=r["subject"], w=w) for r in records for t in templates for w in rng.sample(words, 12)}
    candidates |= {f"the {rng.choice(words)} of {rng.choice(words)} is {rng.choice(words)} ." for _ in range(200)}
    candidates = sorted(candidates)
    routed, unrouted = split_clear_of_threshold(reference, candidates, THRESHOLD, MARGIN)
    routed, unrouted = routed[:150], unrouted[:150]
    assert len(routed) >= 60 and len(unrouted) >= 60, (len(routed), len(unrouted))
    pool = routed + unrouted
    return {"routed": set(routed), "prompts": pool, "ids": {p: reference.prompt_ids(p) for p in pool}}


def test_isolation_under_load(server, reference, prompts, alone, load_pool):
    """1,000 mixed requests, 64 in flight: each answer equals the same request's answer alone.

    Half the requests repeat the prompts answered alone before (their routes come from the
    decision cache), half are new prompts whose routes are computed in the crowded batches;
    those stand in for their alone answer by the transformers reference, which the alone
    answers matched: every answer of a prompt is a prefix of its longest, which is greedy.
    """
    rng = random.Random(5)
    seen, fresh = prompts["all"], load_pool["prompts"]
    jobs = [(rng.choice(seen if i % 2 else fresh), rng.randint(1, ALONE_TOKENS)) for i in range(1000)]
    before = wait_until_idle(server)
    started = time.monotonic()
    results = run_concurrently(server, jobs, concurrency=64)
    elapsed = time.monotonic() - started
    retokenized = [p for (p, _), (ids, _) in zip(jobs, results) if p in load_pool["ids"] and ids != load_pool["ids"][p]]
    assert not retokenized, f"vLLM tokenized differently from transformers: {retokenized[:3]}"
    longest: dict[str, tuple[list[int], list[int]]] = {}
    for (p, _), result in zip(jobs, results):
        if p in load_pool["ids"] and len(result[1]) > len(longest.get(p, ([], []))[1]):
            longest[p] = result
    fresh_used = sorted(longest)
    not_greedy_fresh = {fresh_used[i] for i in reference.not_greedy([longest[p] for p in fresh_used])}
    expected = {**{p: ids for p, (_, ids) in longest.items()}, **alone}
    leaks = [(p, n, got, expected[p][:n]) for (p, n), (_, got) in zip(jobs, results)
             if got != expected[p][:n] or p in not_greedy_fresh]
    assert not leaks, f"{len(leaks)}/{len(jobs)} answers differ from the prompt's answer alone, e.g. {leaks[:3]}"
    after = wait_until_idle(server)
    # Each request is decided once, from its own prompt: the counters move by exactly the mix sent.
    routed = sum(p in prompts["routed"] or p in load_pool["routed"] for p, _ in jobs)
    assert after["memoir:routed_requests_total"] - before["memoir:routed_requests_total"] == routed
    assert after["memoir:unrouted_requests_total"] - before["memoir:unrouted_requests_total"] == len(jobs) - routed
    print(f"isolation: {len(jobs)} requests ({routed} routed, {len(set(jobs))} distinct prompt/length pairs) at "
          f"concurrency 64 in {elapsed:.1f} s, 0 leaks")


def test_preemption_storm(server, reference, prompts):
    """Long answers that do not fit the KV cache together: preempted, recomputed, still exact."""
    mixed = prompts["routed"][:12] + prompts["unrouted"][:12]
    lengths = [60 + (i * 17) % 61 for i in range(len(mixed))]
    before = counters(server)["vllm:num_preemptions_total"]
    log_before = server.log_text().count("MEMOIR: preempted request recomputed")
    results = run_concurrently(server, list(zip(mixed, lengths)), concurrency=len(mixed))
    assert [len(got) for _, got in results] == lengths
    wrong = [mixed[i] for i in reference.not_greedy(results)]
    assert not wrong, f"{len(wrong)}/{len(mixed)} differ after preemption, e.g. {wrong[:3]}"
    preemptions = counters(server)["vllm:num_preemptions_total"] - before
    recomputes = server.log_text().count("MEMOIR: preempted request recomputed") - log_before
    assert preemptions > 0, "the small KV cache did not force any preemption"
    assert recomputes > 0, "no preempted request was recomputed with its generated tokens"
    print(f"preemption storm: {len(mixed)} requests, {preemptions:.0f} preemptions, {recomputes} recomputes, all exact")


def test_client_disconnects_mid_stream(server, prompts, alone):
    """Streams cancelled after a few tokens, beside normal requests; then the server answers exactly."""
    rng = random.Random(7)

    async def cancelled_stream(client, prompt, keep):
        stream = await client.completions.create(model=server.model_name, prompt=prompt, max_tokens=120,
                                                 temperature=0.0, stream=True, extra_body={"ignore_eos": True})
        received = 0
        async for _chunk in stream:
            received += 1
            if received >= keep:
                break
        await stream.close()  # drops the connection: vLLM aborts the request
        return received

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600, max_retries=0)
        try:
            streams = [cancelled_stream(client, rng.choice(prompts["all"]), rng.randint(1, 5)) for _ in range(24)]
            normal_jobs = [(p, ALONE_TOKENS) for p in prompts["all"]]
            normal = [complete_async(client, server.model_name, p, n) for p, n in normal_jobs]
            done = await asyncio.gather(*streams, *normal)
            return done[:24], done[24:]
        finally:
            await client.close()

    received, normal = asyncio.run(main())
    assert all(r >= 1 for r in received)
    idle = wait_until_idle(server)  # every aborted request left the engine
    wrong = [p for p, (_, got) in zip(prompts["all"], normal) if got != alone[p]]
    assert not wrong, f"answers beside disconnecting clients differ: {wrong[:3]}"
    after = run_concurrently(server, [(p, ALONE_TOKENS) for p in prompts["all"]], concurrency=32)
    wrong = [p for p, (_, got) in zip(prompts["all"], after) if got != alone[p]]
    assert not wrong, f"answers after the disconnects differ: {wrong[:3]}"
    print(f"disconnects: 24 streams cancelled after {sum(received)} chunks in all; engine idle "
          f"(running {idle['vllm:num_requests_running']:.0f}); later answers exact")


def test_max_tokens_one(server, prompts, alone):
    results = run_concurrently(server, [(p, 1) for p in prompts["all"]], concurrency=len(prompts["all"]))
    assert [got for _, got in results] == [alone[p][:1] for p in prompts["all"]]


def test_prompts_near_and_over_max_model_len(server, reference, prompts, alone):
    tokenizer = reference.tokenizer
    rng = random.Random(11)
    words = [f"w{i}" for i in range(400)]
    near = []
    for prompt in prompts["routed"][:3] + prompts["unrouted"][:3]:
        ids = reference.prompt_ids(prompt)
        filler = tokenizer(" ".join(rng.choice(words) for _ in range(400)), add_special_tokens=False)["input_ids"]
        near.append(ids[:1] + filler[: MAX_MODEL_LEN - 8 - len(ids)] + ids[1:])  # 248 tokens, then 8 generated
    near.append(reference.prompt_ids(prompts["routed"][0]) * (MAX_MODEL_LEN // len(reference.prompt_ids(prompts["routed"][0]))))
    near[-1] = near[-1][: MAX_MODEL_LEN - 1]  # 255 prompt tokens + 1 generated = max_model_len
    decisions = reference.route_ids(near)
    kept = [ids for ids, d in zip(near, decisions) if abs(d.overlap - THRESHOLD) >= MARGIN]
    assert len(kept) >= 4
    jobs = [(ids, MAX_MODEL_LEN - len(ids)) for ids in kept]
    results = run_concurrently(server, jobs, concurrency=len(jobs))
    assert [len(got) for _, got in results] == [n for _, n in jobs]
    assert [ids for ids, _ in results] == kept
    assert not reference.not_greedy(results)

    too_long = reference.prompt_ids(prompts["unrouted"][0]) * 40
    assert len(too_long) > MAX_MODEL_LEN
    with pytest.raises(openai.BadRequestError) as info:
        run_concurrently(server, [(too_long, 4)], 1)
    assert info.value.status_code == 400
    assert "maximum context length" in str(info.value) or "max_model_len" in str(info.value), str(info.value)
    results = run_concurrently(server, [(p, ALONE_TOKENS) for p in prompts["all"][:6]], concurrency=6)
    assert [got for _, got in results] == [alone[p] for p in prompts["all"][:6]]


def test_empty_prompts(server, reference, prompts, alone):
    """An empty prompt (text or token ids) is a clean 400 naming the parameter; an empty chat
    message is a valid request (the template adds the role) and is answered exactly; the
    server keeps serving."""
    for empty in ("", []):
        with pytest.raises(openai.BadRequestError) as info:
            run_concurrently(server, [(empty, 4)], 1)
        assert info.value.status_code == 400 and "prompt" in str(info.value), str(info.value)
    client = served_client(server)
    prompt_ids, token_ids = served_token_ids(client, "chat", "", stream=False, max_tokens=ALONE_TOKENS)
    assert prompt_ids and len(token_ids) == ALONE_TOKENS and not reference.not_greedy([(prompt_ids, token_ids)])
    results = run_concurrently(server, [(p, ALONE_TOKENS) for p in prompts["all"]], concurrency=16)
    assert [got for _, got in results] == [alone[p] for p in prompts["all"]]
