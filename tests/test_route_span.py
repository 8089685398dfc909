"""Routing spans: the last user message found from the chat template's markers, the same on the
edit tools' side (masks, edit job, reference routing) and the plugin's (per-slot spans, exact
partial KV-block sums under chunked prefill and prefix caching)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from edit_tools.chat_markers import ChatMarkersError, chat_markers, route_span_for
from edit_tools.chat_models import LONG_SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT, build_chat_llama, build_chat_tokenizer, messages
from edit_tools.hparams import HParamsError, MemoirHyperParams
from vllm_memoir.core import ArtifactError, read_manifest
from vllm_memoir.core.route_span import RouteSpan, RouteSpanError
from vllm_memoir.routing.layout import TokenLayout

USER, END = (90, 91), (92,)  # marker ids of the hand-made prompts below
SPAN = RouteSpan("last_user_message", USER, END)


def test_span_of_hand_made_prompts():
    system_and_user = [1, 90, 91, 5, 6, 92, 90, 91, 7, 8, 9, 92, 93, 94]
    assert SPAN.span(system_and_user) == (8, 11)
    assert SPAN.span([1, 90, 91, 5, 92, 95, 96, 92, 90, 91, 7, 8, 92, 93]) == (10, 12)  # the last user turn
    assert SPAN.span([1, 5, 6, 7]) == (0, 4)  # no user marker: a raw prompt, all its tokens
    assert SPAN.span([1, 90, 91, 5, 6]) == (3, 5)  # no end marker: to the prompt's end
    assert SPAN.span([1, 90, 91, 92, 93]) == (0, 5)  # an empty last message: all tokens
    assert SPAN.span([90, 91]) == (0, 2)
    assert SPAN.span([]) == (0, 0)
    assert RouteSpan().span(system_and_user) == (0, len(system_and_user))
    overlapping = RouteSpan("last_user_message", (92, 90, 91), (92,))  # a user marker holding the end marker
    assert overlapping.span([1, 90, 91, 5, 92, 90, 91, 7, 8, 92, 9]) == (7, 9)


def test_boundaries_list_every_candidate():
    found = SPAN.boundaries([1, 90, 91, 5, 92, 90, 91, 7, 8, 92])
    assert found.starts.tolist() == [3, 7] and found.ends.tolist() == [4, 9] and found.last == 9
    assert SPAN.boundaries([1, 2]).last == -1


def test_mask_of_padded_rows():
    ids = torch.tensor([[0, 0, 1, 90, 91, 7, 8, 92, 93], [1, 90, 91, 5, 92, 90, 91, 6, 92]])
    prompt = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    assert SPAN.mask(ids, prompt).int().tolist() == [[0, 0, 0, 0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1, 0]]
    assert RouteSpan().mask(ids, prompt) is prompt


@pytest.mark.parametrize("kind, markers, aggregation, message", [
    ("everything", {}, "mean", "routing_span 'everything' is not one of"),
    ("prompt", {"user_start": [1]}, "mean", "must be empty for routing_span 'prompt'"),
    ("last_user_message", {}, "mean", "must hold exactly ['user_start', 'message_end']"),
    ("last_user_message", {"user_start": [1], "message_end": []}, "mean", "message_end must be a non-empty list"),
    ("last_user_message", {"user_start": [1, -2], "message_end": [3]}, "mean", "user_start must be a non-empty list"),
    ("last_user_message", {"user_start": [1], "message_end": [True]}, "mean", "message_end must be a non-empty list"),
    ("last_user_message", {"user_start": [1], "message_end": [2]}, "last", "needs aggregation mean or mean_decentered"),
    ("last_user_message", [], "mean", "routing_span_markers must be an object"),
])
def test_manifest_fields_are_checked(kind, markers, aggregation, message):
    with pytest.raises(RouteSpanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        RouteSpan.from_manifest(kind, markers, aggregation, "manifest.json")


def test_hparams_routing_span():
    assert MemoirHyperParams().validate().routing_span == "prompt"
    assert MemoirHyperParams(routing_span="last_user_message", use_chat_template=True).validate().use_chat_template
    with pytest.raises(HParamsError, match="routing_span: 'system' is not supported"):
        MemoirHyperParams(routing_span="system").validate()
    with pytest.raises(HParamsError, match="routing_span: 'last_user_message' needs prompt_feature_agg mean"):
        MemoirHyperParams(routing_span="last_user_message", prompt_feature_agg="last").validate()


# ------------------------------------------------------------------------- chat template markers


@pytest.fixture(scope="module")
def chat_tokenizer():
    return build_chat_tokenizer(["who is the employer of gail suthein levun ?", "souzoubeix"])


def test_markers_of_the_llama3_style_template(chat_tokenizer):
    user_start, message_end = chat_markers(chat_tokenizer)
    tokens = chat_tokenizer.convert_ids_to_tokens
    assert tokens(user_start)[0] == "<|start_header_id|>" and tokens(user_start)[-3:] == ["<|end_header_id|>", "Ċ", "Ċ"]
    assert tokens(message_end)[0] == "<|eot_id|>" and tokens(message_end)[-3:] == ["<|end_header_id|>", "Ċ", "Ċ"]
    span = route_span_for("last_user_message", chat_tokenizer)
    question = "who is the employer of gail suthein levun ?"
    for conversation in (messages(question), messages(question, LONG_SYSTEM_PROMPT),
                         messages(question, SHORT_SYSTEM_PROMPT, [("who is the employer ?", "souzoubeix")])):
        text = chat_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = chat_tokenizer(text, add_special_tokens=False)["input_ids"]
        start, end = span.span(ids)
        assert chat_tokenizer.decode(ids[start:end]) == question
    raw = chat_tokenizer(question)["input_ids"]
    assert span.span(raw) == (0, len(raw))  # what /v1/completions sends: routed on every token


def test_templates_without_markers_are_refused(chat_tokenizer):
    from edit_tools.facts.world import CHAT_TEMPLATE as FACTS_TEMPLATE  # BOS + the user's words

    facts_like = build_chat_tokenizer(["a b c"])
    facts_like.chat_template = FACTS_TEMPLATE
    with pytest.raises(ChatMarkersError, match="puts no fixed tokens before a user message"):
        chat_markers(facts_like)
    facts_like.chat_template = None
    with pytest.raises(ChatMarkersError, match="has no chat template"):
        route_span_for("last_user_message", facts_like)
    assert route_span_for("prompt", facts_like) == RouteSpan()


# ------------------------------------------------------------------------- plugin: per-slot spans


def test_request_routes_keep_each_slot_span():
    """Each slot's span reaches the routing op's buffers, and its boundaries the block marks,
    through swaps and moves."""
    from vllm_memoir.routing.requests import PENDING, RequestRoutes
    from vllm_memoir.routing.span_marks import block_marks

    def published(routes, slot):
        routes.publish()
        return tuple(routes.slot_span_dev[:, slot].tolist())

    def marked(routes, slot, prompt):
        """Whether the slot's published marks are `prompt`'s boundaries (None: no boundaries)."""
        boundaries = None if prompt is None else SPAN.boundaries(prompt)
        want = torch.from_numpy(block_marks(boundaries, 4, 2))
        return torch.equal(routes.block_marks.device_table[slot], want)

    chat = [1, 90, 91, 5, 6, 92, 7]
    routes = RequestRoutes(capacity=2, route_span=SPAN)
    routes.add(0, chat, is_new_request=True)
    routes.add(1, [1, 5, 6], is_new_request=True)
    routes.set_batch(2)
    routes.track_block_marks(block_size=2, num_blocks=4)
    assert routes.row_routes() == [PENDING, PENDING]
    assert published(routes, 0) == (3, 5) and published(routes, 1) == (0, 3)
    assert SPAN.boundaries(chat).starts.tolist() == [3] and marked(routes, 0, chat)
    assert SPAN.boundaries([1, 5, 6]).starts.size == 0 and marked(routes, 1, [1, 5, 6])
    routes.swap(0, 1)
    assert published(routes, 0) == (0, 3) and published(routes, 1) == (3, 5)
    routes.move(1, 3)  # grows the buffers
    assert published(routes, 3) == (3, 5) and marked(routes, 3, chat)
    assert SPAN.boundaries(chat).ends.tolist() == [5]
    assert published(routes, 1) == (0, 0) and marked(routes, 1, None)
    plain = RequestRoutes(capacity=1, route_span=RouteSpan())
    plain.add(0, chat, is_new_request=True)
    plain.set_batch(1)
    plain.track_block_marks(block_size=2, num_blocks=4)
    assert published(plain, 0) == (0, 7) and marked(plain, 0, None)


# ------------------------------------------------------------------------- plugin: partial block sums


def _record(block_sums, span_sums, x, positions, table, boundaries, size):
    """What the routed layer records for one row computing `positions` (consecutive) of a request."""
    from vllm_memoir.routing.span_marks import block_marks

    slots = torch.tensor([table[p // size] * size + p % size for p in positions])
    layout = TokenLayout([0, len(positions)], [positions[-1] + 1], slots, torch.tensor([table]))
    tokens = layout.tokens_of(len(positions))
    block_sums.record(x, layout, tokens)
    marks = torch.from_numpy(block_marks(boundaries, len(table), size))
    span_sums.record(x, layout, tokens, marks[torch.tensor(positions) // size])


def _sum_between(span_sums, table, lo, hi, first):
    """span_sums.sum_between for one request whose block table is `table`: (sum, exact)."""
    layout = TokenLayout([0, 1], [first + 1], torch.zeros(1, dtype=torch.int64), torch.tensor([table]))
    row = torch.tensor([0])
    total, approximate = span_sums.sum_between(layout, row, torch.tensor([lo]), torch.tensor([hi]), torch.tensor([first]))
    return total[0], not bool(approximate[0])


def _sums(size, dim):
    from vllm_memoir.routing.block_sums import BlockSums
    from vllm_memoir.routing.span_sums import SpanBlockSums

    block_sums = BlockSums(size, dim, "cpu", num_blocks=100)
    return block_sums, SpanBlockSums(block_sums)


@pytest.mark.parametrize("size", [4, 5])
def test_span_sums_are_exact_for_chunks_and_shared_blocks(size):
    rng = random.Random(size)
    dim = 3
    for trial in range(40):
        block_sums, span_sums = _sums(size, dim)
        # A prompt: system turn, earlier user turns, the last user message, a generation prompt.
        ids = [1]
        for _ in range(rng.randint(1, 3)):
            ids += list(USER) + [rng.randint(3, 20) for _ in range(rng.randint(1, 9))] + list(END)
        ids += [93, 94]
        n = len(ids)
        x = torch.randn(n, dim, dtype=torch.float64).float()
        start, end = SPAN.span(ids)
        want = x[start:end].sum(0)
        table = list(rng.sample(range(100), -(-n // size)))
        # Request A computes the prompt in random chunks, deciding at the chunk holding its last token.
        cut = sorted(rng.sample(range(1, n), rng.randint(0, min(3, n - 1))))
        bounds = SPAN.boundaries(ids)
        edges = [0, *cut, n]
        for a, b in zip(edges[:-1], edges[1:]):
            if b == n and start < a:
                got, exact = _sum_between(span_sums, table, start, min(end, a), a)
                here = x[max(start, a):end].sum(0) if end > a else torch.zeros(dim)
                assert exact and torch.allclose(got + here, want, atol=1e-5), (trial, ids, cut)
            _record(block_sums, span_sums, x[a:b], list(range(a, b)), table, bounds, size)
        # Request B: the same prompt, its full blocks from the prefix cache (another request's sums).
        cached = (n - 1) // size * size
        if start < cached:
            got, exact = _sum_between(span_sums, table, start, min(end, cached), cached)
            here = x[max(start, cached):end].sum(0) if end > cached else torch.zeros(dim)
            assert exact and torch.allclose(got + here, want, atol=1e-5), (trial, ids)


def test_span_sums_flag_blocks_without_matching_offsets():
    size, dim = 4, 2
    ids = [1, 5, 90, 91, 6, 7, 92, 93]  # span [4, 6) starts inside block 1
    x = torch.arange(16, dtype=torch.float32).view(8, 2)
    block_sums, span_sums = _sums(size, dim)
    # Block 1 computed while a whole-prompt artifact was served: no boundaries recorded.
    _record(block_sums, span_sums, x, list(range(8)), [0, 1], None, size)
    got, exact = _sum_between(span_sums, [0, 1], 4, 6, 8)
    assert not exact and torch.equal(got, x[4:8].sum(0))  # the whole block, flagged
    _record(block_sums, span_sums, x, list(range(8)), [0, 1], SPAN.boundaries(ids), size)
    got, exact = _sum_between(span_sums, [0, 1], 4, 6, 8)
    assert exact and torch.equal(got, x[4:6].sum(0))
    # The block is rewritten under a whole-prompt rule again: the offsets are reset with it.
    _record(block_sums, span_sums, x, list(range(8)), [0, 1], None, size)
    got, exact = _sum_between(span_sums, [0, 1], 4, 6, 8)
    assert not exact


def test_slot_block_marks_follow_requests_through_the_batch():
    """Each slot's marks reach the device table when published, follow swaps and moves, grow
    with the slots, and the tokens of a forward read their own request's block marks."""
    from vllm_memoir.routing.requests import RequestRoutes
    from vllm_memoir.routing.span_marks import block_marks, no_marks

    size = 2
    prompt = [1, 90, 91, 5, 6, 92, 7]  # span [3, 5): block 1 has a tail from offset 1, block 2 a head to 1
    routes = RequestRoutes(capacity=2, route_span=SPAN)
    routes.add(0, prompt, is_new_request=True)  # before tracking: filled in when tracking starts
    marks = routes.track_block_marks(size, num_blocks=5)
    want = torch.from_numpy(block_marks(SPAN.boundaries(prompt), 5, size))
    empty = list(no_marks(size))  # [2, 0]: a tail from the block's end, a head to its start
    assert want[1].tolist() == [1, 0] and want[2].tolist() == [size, 1] and want[0].tolist() == empty
    assert torch.equal(marks.device_table[0], want)
    routes.add(1, [1, 5, 6], is_new_request=True)  # no user marker: no marks
    routes.set_batch(2)
    assert marks.device_table[1].tolist() == [empty] * 5
    routes.swap(0, 1)
    routes.publish()
    assert torch.equal(marks.device_table[1], want) and marks.device_table[0].tolist() == [empty] * 5
    routes.move(1, 3)  # grows the slots: a new marks table
    routes.set_batch(2, row_slots=[0, 3])
    grown = routes.block_marks
    assert grown.capacity >= 4 and torch.equal(grown.device_table[3], want) and grown.device_table[1].tolist() == [empty] * 5
    # A forward: row 0 is slot 0 (two tokens at positions 2, 3), row 1 slot 3 (positions 3, 4).
    layout = TokenLayout([0, 2, 4], [4, 5])
    tokens = layout.tokens_of(4)
    got = grown.of_tokens(tokens, routes.row_slots_dev)
    assert got.tolist() == [empty, empty, want[1].tolist(), want[2].tolist()]


# ------------------------------------------------------------------------- edit tools end to end


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    texts = ["who is the employer of gail suthein levun ?", "where does noulem goshor zostais live ?"]
    return build_chat_llama(tmp_path_factory.mktemp("chat-llama"), texts)


def test_edit_job_records_the_span_and_routes_on_it(chat_model_dir, tmp_path):
    from edit_tools.datasets import EditRequest
    from edit_tools.editor import EditJobError, run_edit_job
    from edit_tools.hf_model import MemoirHFModel

    requests = [EditRequest(prompt="who is the employer of gail suthein levun ?", target="souzoubeix",
                            loc="where does noulem goshor zostais live ?", loc_ans="kestouste")]
    hp = MemoirHyperParams(inner_params=["model.layers[3].mlp.down_proj.weight"], top_k=64, n_iter=6, edit_lr=20.0,
                           irr_threshold=0.5, routing_span="last_user_message", use_chat_template=True).validate()
    run_edit_job(chat_model_dir, requests, hp, tmp_path / "art", progress=False)
    manifest = read_manifest(tmp_path / "art")
    assert manifest.routing_span == "last_user_message"
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["routing_span_markers"]["user_start"]
    hf = MemoirHFModel.from_pretrained(chat_model_dir, artifact=tmp_path / "art")
    assert hf.use_chat_template and hf.route_span == manifest.route_span()
    prompt_ids = hf.prompt_ids(requests[0].prompt)
    assert hf.tokenizer.convert_ids_to_tokens(prompt_ids)[-1] == "Ċ"  # ends with the assistant header
    assert hf.route([requests[0].prompt])[0].overlap == 1.0  # the mask came from the same span
    # The feature the reference routes on is the mean over the span's tokens, nothing else.
    captured = []
    handle = hf.layer.base.register_forward_hook(lambda _m, args, _o: captured.append(args[0]))
    ids = hf.chat_ids(messages(requests[0].prompt, LONG_SYSTEM_PROMPT))
    decision = hf.route_ids([ids])[0]
    handle.remove()
    start, end = hf.route_span.span(ids)
    feature = captured[0][0, start:end].float().mean(0) - hf.layer.router.background_mean.float()
    expected = hf.layer.router.route_features(feature.unsqueeze(0))[0]
    assert (expected.route, expected.best_edit) == (decision.route, decision.best_edit)
    assert abs(expected.overlap - decision.overlap) <= 1 / 64
    everything = captured[0][0].float().mean(0) - hf.layer.router.background_mean.float()
    assert hf.layer.router.route_features(everything.unsqueeze(0))[0].overlap != decision.overlap
    # Appending with another span is refused, naming the setting.
    with pytest.raises(EditJobError, match="routing_span='last_user_message', the hyperparameters say 'prompt'"):
        run_edit_job(chat_model_dir, requests, MemoirHyperParams(**{**hp.to_dict(), "routing_span": "prompt"}).validate(),
                     tmp_path / "art", append=True, progress=False)


def test_old_manifests_read_as_prompt_and_bad_spans_are_refused(chat_model_dir, tmp_path):
    from edit_tools.datasets import EditRequest
    from edit_tools.editor import run_edit_job

    hp = MemoirHyperParams(inner_params=["model.layers[3].mlp.down_proj.weight"], top_k=64, n_iter=2,
                           prompt_feature_agg="mean").validate()
    run_edit_job(chat_model_dir, [EditRequest(prompt="who is the employer ?", target="souzoubeix")], hp,
                 tmp_path / "art", progress=False)
    path = tmp_path / "art" / "manifest.json"
    obj = json.loads(path.read_text())
    assert obj["routing_span"] == "prompt" and obj["routing_span_markers"] == {}
    del obj["routing_span"], obj["routing_span_markers"]  # a manifest written before the field existed
    path.write_text(json.dumps(obj))
    assert read_manifest(tmp_path / "art").route_span() == RouteSpan()
    path.write_text(json.dumps({**obj, "routing_span": "last_user_message", "routing_span_markers": {"user_start": [5]}}))
    with pytest.raises(ArtifactError, match="manifest.json: routing_span_markers must hold exactly"):
        read_manifest(tmp_path / "art")
    path.write_text(json.dumps({**obj, "routing_span": 3}))
    with pytest.raises(ArtifactError, match="field 'routing_span' must be a string"):
        read_manifest(tmp_path / "art")


def test_default_span_leaves_the_reference_unchanged(chat_model_dir):
    from edit_tools.hf_model import MemoirHFModel

    hf = MemoirHFModel.from_pretrained(chat_model_dir, module_path="model.layers.3.mlp.down_proj")
    ids, attention = hf.pad([hf.chat_ids(messages("who is the employer ?", SHORT_SYSTEM_PROMPT)), [1, 5]], left=True)
    assert torch.equal(hf.route_mask(ids, attention.bool()), attention.bool())  # every prompt token
    assert hf.prompt_ids("who is") == hf.tokenizer("who is")["input_ids"]  # plain text unless the artifact says so
