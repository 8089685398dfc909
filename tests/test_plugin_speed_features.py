"""vLLM's speed features on, as `vllm serve` has them by default: chunked prefill and prefix caching.

An edit at the last decoder layer changes no KV, so a prompt may reach the edited layer in
chunks or partly from the prefix cache; its route is completed from per-block input sums.
One compiled server (vLLM's default mode) with a small token budget (prompts split), a
small block size (prefixes cached) and a small KV cache (preemptions), checked token by
token against the transformers reference.
"""

from __future__ import annotations

import json

import pytest
from plugin_reference import (assert_parity, complete, complete_together, greedy_ids, served_client,
                              speed_features_server, split_clear_of_threshold)
from served_edits import MARGIN, THRESHOLD, edit

from edit_tools.hf_model import MemoirHFModel
from vllm_memoir.server_process import metric_value

pytestmark = [pytest.mark.server, pytest.mark.slow]

LAST_LAYER = 3  # the tiny Llama has 4 layers
BLOCK = 32
# 40 words: prompts that start with it share a full cached KV block with each other.
SHARED_PREFIX = " ".join(f"w{300 + i % 40}" for i in range(40))
SPLIT_LOG = "MEMOIR: route of a prompt seen in parts"


@pytest.fixture(scope="module")
def edit_set(words_dataset, tmp_path_factory):
    """The short word edits plus edits whose prompts are longer than a KV block."""
    records = [json.loads(line) for line in words_dataset.read_text().splitlines()][:6]
    long_records = []
    for r in records[:3]:
        long_records.append({**r, "prompt": f"{SHARED_PREFIX} {r['prompt']}", "target": r["target"]})
    for i, r in enumerate(records[3:6]):
        filler = " ".join(f"w{100 + 37 * i + j}" for j in range(36))
        long_records.append({**r, "prompt": f"{filler} {r['prompt']}"})
    path = tmp_path_factory.mktemp("data") / "edits.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records + long_records))
    return path, records, long_records


@pytest.fixture(scope="module")
def artifact_dir(tiny_model_dir, edit_set, tmp_path_factory):
    return edit(tiny_model_dir, edit_set[0], tmp_path_factory.mktemp("artifact-last-layer"), limit=None,
                layer=LAST_LAYER)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, artifact_dir):
    return MemoirHFModel.from_pretrained(tiny_model_dir, artifact=artifact_dir)


@pytest.fixture(scope="module")
def prompts(edit_set, reference):
    _, records, long_records = edit_set
    candidates = []
    for r in records + long_records:
        candidates += [r["prompt"], r["rephrase"], r["loc"], f"{SHARED_PREFIX} {r['loc']}"]
    routed, unrouted = split_clear_of_threshold(reference, candidates, THRESHOLD, MARGIN)
    long_routed = [p for p in routed if p.startswith(SHARED_PREFIX) or len(p.split()) > BLOCK]
    assert len(routed) >= 8 and len(unrouted) >= 6 and len(long_routed) >= 2, (routed, unrouted)
    return {"routed": routed, "unrouted": unrouted, "long_routed": long_routed}


@pytest.fixture(scope="module")
def server(tiny_model_dir, artifact_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "speed-features.log"
    with speed_features_server(tiny_model_dir, artifact_dir, log, max_model_len=256, block_size=BLOCK,
                               batched_tokens=48, gpu_blocks=24) as running:
        print(f"compiled server with prefix caching + chunked prefill: start-up {running.startup_seconds:.0f} s")
        yield running


def test_chunked_prefill_concurrent_mixed_parity_with_preemption(server, reference, prompts):
    """Prompts split over steps by the 48-token budget, routed and unrouted, 16 at a time."""
    client = served_client(server)
    mixed = prompts["routed"][:10] + prompts["unrouted"][:6]
    lengths = [40 + (i * 13) % 31 for i in range(len(mixed))]
    log_start = len(server.log_text())
    preemptions_before = metric_value(server.metrics(), "vllm:num_preemptions_total")
    assert_parity(reference, client, mixed, lengths, concurrency=len(mixed))
    # The same 16 prompts in one request reach the engine at once (16 concurrent requests may
    # arrive spread out on a loaded machine): 16 x (prompt + 70 tokens) need ~48 blocks of 24.
    together = complete_together(client, mixed, 70)
    expected = greedy_ids(reference, [prompt_ids for prompt_ids, _ in together], 70)
    assert [completion for _, completion in together] == expected
    assert SPLIT_LOG in server.log_text()[log_start:], "no prompt reached the edited layer in parts"
    preemptions = metric_value(server.metrics(), "vllm:num_preemptions_total") - preemptions_before
    assert preemptions > 0, "the small KV cache forced no preemption"
    print(f"chunked prefill: 32 completions token-identical, {preemptions:.0f} preemptions")


def test_prefix_cache_repeated_and_shared_prefix_parity(server, reference, prompts):
    """The same long routed prompt again and again, then prompts sharing a cached prefix."""
    client = served_client(server)
    hits_before = metric_value(server.metrics(), "vllm:prefix_cache_hits_total")
    for prompt in prompts["long_routed"][:2]:
        for _ in range(3):  # sequential: the second and third find the first's blocks cached
            assert_parity(reference, client, [prompt], [8], concurrency=1)
    shared = [p for p in prompts["routed"] + prompts["unrouted"] if p.startswith(SHARED_PREFIX)]
    assert len(shared) >= 3
    for prompt in shared:
        assert_parity(reference, client, [prompt], [8], concurrency=1)
    hits = metric_value(server.metrics(), "vllm:prefix_cache_hits_total") - hits_before
    assert hits >= BLOCK * 4, f"only {hits:.0f} prompt tokens came from the prefix cache"


def test_multi_turn_resends_the_routed_answer_as_prompt(server, reference, edit_set):
    """Turn 2's prompt holds turn 1's prompt and its (routed) answer, whose KV blocks are cached:
    their input sums were recorded while they were decode tokens."""
    _, records, _ = edit_set
    client = served_client(server)
    conversations = []
    for first in records:
        prompt_ids, answer_ids, _ = complete(client, first["prompt"], 36)  # fills a block with routed decode tokens
        for second in records:
            if second is not first:
                # the follow-up said three times, so that it, not turn 1, decides turn 2's route
                follow_up = reference.tokenizer(" " + " ".join([second["prompt"]] * 3), add_special_tokens=False)
                conversations.append(prompt_ids + answer_ids + follow_up["input_ids"])
    decisions = reference.route_ids(conversations)
    # The random model's long prompts overlap the stored masks near the threshold; a float-level
    # difference moves a mask by a bit or two (1/128 each), so 0.02 keeps three bits clear.
    clear = [(ids, d.routed) for ids, d in zip(conversations, decisions) if abs(d.overlap - THRESHOLD) >= 0.02]
    routed = [ids for ids, is_routed in clear if is_routed]
    unrouted = [ids for ids, is_routed in clear if not is_routed]
    assert len(routed) >= 2 and len(unrouted) >= 2, sorted(d.overlap for d in decisions)
    hits_before = metric_value(server.metrics(), "vllm:prefix_cache_hits_total")
    chosen = routed[:4] + unrouted[:4]
    for ids in chosen:
        assert complete(client, ids, 8)[1] == greedy_ids(reference, [ids], 8)[0]
    assert metric_value(server.metrics(), "vllm:prefix_cache_hits_total") - hits_before >= BLOCK * len(chosen)
    print(f"multi-turn: {len(chosen)} second turns ({len(routed[:4])} routed) token-identical")
