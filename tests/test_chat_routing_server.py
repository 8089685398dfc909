"""Chat requests routed on the last user message: /v1/chat/completions against the transformers reference.

One compiled `vllm serve` of a tiny BPE Llama with a Llama-3-style chat template, serving an
artifact edited with `use_chat_template` and `routing_span: last_user_message` at the last
decoder layer, with vLLM's defaults (prefix caching and chunked prefill on), a small token
budget (system prompts of ~200 tokens reach the layer in several chunks) and 32-token KV
blocks (shared system prompts and message openings come from the prefix cache). Conversations
with and without system prompts, with earlier turns, streamed and not, must be token-identical
to the reference's greedy answers on the prompt ids the server reports.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from plugin_reference import greedy_ids, served_client, speed_features_server

from edit_tools.chat_models import LONG_SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT, build_chat_llama, messages
from edit_tools.datasets import EditRequest
from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from vllm_memoir.core import load_artifact, save_artifact
from vllm_memoir.server_process import metric_value

pytestmark = [pytest.mark.server, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
LAST_LAYER = 3  # build_chat_llama's 4 layers
TOP_K = 128
# Overlaps clear of the threshold by 2.5 bits of top_k: float-level differences between the
# server and the reference move a mask by a bit or two.
MARGIN = 2.5 / TOP_K
BLOCK = 32
# Said before the question in some conversations: with the same system prompt, their blocks up
# to past the user message's start come from the prefix cache, so the span starts mid-block
# in a block another request computed (its partial sums must be exact).
SHARED_OPENING = ("please look this up in the records of the company and answer with one word only , "
                  "no greeting and no explanation , just the word :")
INEXACT = "memoir:inexact_span_features_total"


@pytest.fixture(scope="module")
def records():
    """Ten facts edit records (the ZsRE format; `loc` a same-template question about another
    subject), kept with this test: its conversations and thresholds were built around them,
    and the facts edit sets in data/facts are regenerated as the edit tools change."""
    return json.loads((REPO / "tests" / "data" / "chat-routing-facts-T10.json").read_text())


@pytest.fixture(scope="module")
def chat_model_dir(records, tmp_path_factory):
    texts = [r[k] for r in records for k in ("src", "rephrase", "loc", "alt", "loc_ans")] + [SHARED_OPENING]
    return build_chat_llama(tmp_path_factory.mktemp("chat-llama"), texts)


@pytest.fixture(scope="module")
def artifact_dir(chat_model_dir, records, tmp_path_factory):
    """The edits, with a threshold that routes about half of the conversations sent below.

    On this random model a system prompt or an earlier turn moves a question's overlap with
    the edits to 0.3-0.45, so a fixed threshold would route all or none of them; parity needs
    both. The threshold plays no part in training the edits, so it is set afterwards (as a new
    artifact version) between two grid points of the overlaps' median.
    """
    requests = [EditRequest(prompt=r["src"], target=r["alt"], loc=r["loc"], loc_ans=r["loc_ans"]) for r in records[:6]]
    hp = MemoirHyperParams(inner_params=[f"model.layers[{LAST_LAYER}].mlp.down_proj.weight"], top_k=TOP_K,
                           edit_lr=20.0, n_iter=8, irr_threshold=0.5, use_chat_template=True,
                           routing_span="last_user_message").validate()
    out = tmp_path_factory.mktemp("chat-artifact")
    run_edit_job(chat_model_dir, requests, hp, out, progress=False)
    hf = MemoirHFModel.from_pretrained(chat_model_dir, artifact=out)
    kinds = conversations(records)
    convs = kinds["system"] + kinds["turns"] + kinds["opening"]
    overlaps = sorted(d.overlap for d in hf.route_ids([hf.chat_ids(c) for c in convs]))
    artifact = load_artifact(out)
    artifact.manifest.irr_threshold = (round(overlaps[len(overlaps) // 2] * TOP_K) + 0.5) / TOP_K
    save_artifact(artifact, out)
    return out


@pytest.fixture(scope="module")
def reference(chat_model_dir, artifact_dir):
    return MemoirHFModel.from_pretrained(chat_model_dir, artifact=artifact_dir)


@pytest.fixture(scope="module")
def threshold(reference):
    return reference.artifact.manifest.irr_threshold


def conversations(records: list[dict]) -> dict[str, list[list[dict]]]:
    """Conversations by kind, for every record's question, paraphrase and unrelated question."""
    kinds: dict[str, list[list[dict]]] = {"bare": [], "system": [], "turns": [], "opening": []}
    for i, record in enumerate(records):
        other = records[(i + 1) % len(records)]
        for question in (record["src"], record["rephrase"], record["loc"]):
            kinds["bare"].append(messages(question))
            kinds["system"] += [messages(question, SHORT_SYSTEM_PROMPT), messages(question, LONG_SYSTEM_PROMPT)]
            kinds["turns"] += [messages(question, None, [(other["src"], other["alt"])]),
                               messages(question, LONG_SYSTEM_PROMPT, [(other["loc"], other["loc_ans"])])]
            kinds["opening"].append(messages(f"{SHARED_OPENING} {question}", SHORT_SYSTEM_PROMPT))
    return kinds


@pytest.fixture(scope="module")
def chosen(records, reference, threshold):
    """{kind: (routed, unrouted)} conversations clear of the threshold, as the reference routes them."""
    out = {}
    for kind, convs in conversations(records).items():
        decisions = reference.route_ids([reference.chat_ids(c) for c in convs])
        routed = [c for c, d in zip(convs, decisions) if d.routed and d.overlap >= threshold + MARGIN]
        unrouted = [c for c, d in zip(convs, decisions) if not d.routed and d.overlap <= threshold - MARGIN]
        out[kind] = (routed, unrouted)
    counts = {kind: (len(routed), len(unrouted)) for kind, (routed, unrouted) in out.items()}
    assert all(min(counts[kind]) >= 4 for kind in ("system", "turns")) and min(counts["opening"]) >= 2, counts
    return out


@pytest.fixture(scope="module")
def server(chat_model_dir, artifact_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "chat-routing.log"
    with speed_features_server(chat_model_dir, artifact_dir, log, max_model_len=512, block_size=BLOCK,
                               batched_tokens=64, gpu_blocks=96) as running:
        print(f"compiled chat server with prefix caching + chunked prefill: start-up {running.startup_seconds:.0f} s")
        yield running


def chat(client, conversation: list[dict], max_tokens: int, stream: bool = False) -> tuple[list[int], list[int]]:
    """(prompt token ids, answer token ids) of a greedy chat completion, EOS ignored."""
    response = client.chat.completions.create(
        model=client.memoir_model, messages=conversation, max_tokens=max_tokens, temperature=0.0, stream=stream,
        extra_body={"return_token_ids": True, "ignore_eos": True})
    prompt_ids, answer_ids = None, []
    for chunk in (response if stream else [response]):
        prompt_ids = getattr(chunk, "prompt_token_ids", None) or prompt_ids
        for choice in chunk.choices:
            answer_ids += list(getattr(choice, "token_ids", None) or [])
    return list(prompt_ids or []), answer_ids


def assert_chat_parity(reference, client, convs: list[list[dict]], max_tokens: int, stream: bool,
                       concurrency: int) -> list[list[int]]:
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda c: chat(client, c, max_tokens, stream), convs))
    for (prompt_ids, _), conv in zip(results, convs):
        assert prompt_ids == reference.chat_ids(conv)  # the server rendered the template as the reference does
    expected = greedy_ids(reference, [p for p, _ in results], max_tokens)
    bad = [(c[-1]["content"], got, want) for c, (_, got), want in zip(convs, results, expected) if got != want]
    assert not bad, f"{len(bad)}/{len(convs)} differ, e.g. {bad[:2]}"
    return [p for p, _ in results]


def test_chat_with_system_prompts_and_earlier_turns(server, reference, chosen):
    """Routed and unrouted conversations of every kind, 12 at a time, in chunks of 64 tokens."""
    client = served_client(server)
    routed_before = metric_value(server.metrics(), "memoir:routed_requests_total")
    convs = []
    for kind in ("bare", "system", "turns"):
        routed, unrouted = chosen[kind]
        convs += routed[:4] + unrouted[:4]
    served = assert_chat_parity(reference, client, convs, max_tokens=10, stream=False, concurrency=12)
    assert max(len(p) for p in served) > 3 * 64, "no prompt long enough to be split by the token budget"
    routed = sum(len(chosen[kind][0][:4]) for kind in ("bare", "system", "turns"))
    assert metric_value(server.metrics(), "memoir:routed_requests_total") - routed_before == routed
    assert "route of a prompt seen in parts" in server.log_text()


def test_streamed_chat(server, reference, chosen):
    client = served_client(server)
    # Other conversations than the first test's (their decisions are not cached yet), or the same ones.
    convs = [c for kind in ("system", "turns") for side in chosen[kind] for c in (side[4:7] or side[:3])]
    assert_chat_parity(reference, client, convs, max_tokens=12, stream=True, concurrency=6)


def test_span_starting_inside_a_cached_block(server, reference, chosen):
    """Same system prompt and message opening: the block holding the span's start comes from the
    prefix cache, computed by an earlier request; its partial sums give the exact feature."""
    client = served_client(server)
    routed, unrouted = chosen["opening"]
    convs = routed[:4] + unrouted[:3]
    ids = [reference.chat_ids(c) for c in convs]
    start, _ = reference.route_span.span(ids[0])
    common = next(i for i, column in enumerate(zip(*ids)) if len(set(column)) > 1)
    assert start % BLOCK and common // BLOCK * BLOCK > start, (start, common)  # the case this test is about
    before = server.metrics()
    for conv in convs:  # one at a time: each finds the previous one's blocks cached
        assert_chat_parity(reference, client, [conv], max_tokens=8, stream=False, concurrency=1)
    after = server.metrics()
    hits = metric_value(after, "vllm:prefix_cache_hits_total") - metric_value(before, "vllm:prefix_cache_hits_total")
    assert hits >= BLOCK * (len(convs) - 1) * (common // BLOCK), f"only {hits:.0f} prompt tokens came from the cache"
    log = server.log_text()
    # The first one's span ends in its first 64-token chunk (head sums); the others' start in a cached block.
    assert "starts mid-block and ends earlier (exact)" in log and "starts mid-block and ends in this forward (exact)" in log
    assert metric_value(after, INEXACT) == 0


def test_multi_turn_resends_a_routed_answer(server, reference, records, chosen, threshold):
    """Turn 2 carries turn 1 (routed) and the served answer; its route is the new question's."""
    client = served_client(server)
    first = chosen["bare"][0][0]
    _, answer_ids = chat(client, first, 6)
    answer = reference.tokenizer.decode(answer_ids, skip_special_tokens=True)
    follow_ups = [messages(r["loc"], None, [(first[-1]["content"], answer)]) for r in records] + \
                 [messages(r["src"], None, [(first[-1]["content"], answer)]) for r in records]
    decisions = reference.route_ids([reference.chat_ids(c) for c in follow_ups])
    clear = [c for c, d in zip(follow_ups, decisions) if abs(d.overlap - threshold) >= MARGIN]
    assert any(d.routed for d in decisions) and len(clear) >= 4
    assert_chat_parity(reference, client, clear[:8], max_tokens=8, stream=False, concurrency=4)
    assert metric_value(server.metrics(), INEXACT) == 0


def test_completions_route_raw_prompts_on_every_token(server, reference, records):
    """A raw prompt has no user marker: the span artifact routes it like the reference does."""
    client = served_client(server)
    prompts = [r["src"] for r in records[:6]] + [f"{SHORT_SYSTEM_PROMPT} {r['loc']}" for r in records[:4]]
    results = []
    for prompt in prompts:
        response = client.completions.create(model=client.memoir_model, prompt=prompt, max_tokens=8, temperature=0.0,
                                             extra_body={"return_token_ids": True, "ignore_eos": True})
        results.append((list(response.choices[0].prompt_token_ids), list(response.choices[0].token_ids)))
    assert all(reference.route_span.span(p) == (0, len(p)) for p, _ in results)
    assert [got for _, got in results] == greedy_ids(reference, [p for p, _ in results], 8)
