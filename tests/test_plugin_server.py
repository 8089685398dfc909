"""The plugin under a real `vllm serve`: exact parity with the transformers reference.

A tiny model's engine starts in ~40 s eager and ~100 s compiled on 2 cores, so servers are
few, shared by the tests of a class, and started concurrently where they can be.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from plugin_reference import greedy_ids, token_logprobs

from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from edit_tools.tiny_models import build_tiny_llama, build_word_tokenizer, default_words
from vllm_memoir.server_process import REQUIRED_FLAGS, VllmServer, memoir_overrides, metric_value, start_all

pytestmark = [pytest.mark.server, pytest.mark.slow]

LAYER = 2
THRESHOLD = 0.6
MARGIN = 0.04  # prompts this close to the threshold could flip on float noise; left out
COMMON = ["--dtype", "float32", "--max-model-len", "256", *REQUIRED_FLAGS]


def edit(model_dir, words_dataset, out, limit=8):
    hp = MemoirHyperParams(inner_params=[f"model.layers[{LAYER}].mlp.down_proj.weight"], top_k=128, edit_lr=20.0,
                           n_iter=8, irr_threshold=THRESHOLD).validate()
    run_edit_job(model_dir, words_dataset, hp, out, limit=limit, progress=False)
    return out


@pytest.fixture(scope="module")
def artifact_dir(tiny_model_dir, words_dataset, tmp_path_factory):
    return edit(tiny_model_dir, words_dataset, tmp_path_factory.mktemp("memoir-artifact"))


def build_tiny_mistral(out_dir):
    """A random Mistral (vLLM serves it with its own model class) with the tiny word tokenizer.

    Not Qwen2: transformers 5 loads a qwen2 checkpoint's tokenizer as Qwen2Tokenizer, which
    cannot read the tiny word-level tokenizer.json.
    """
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = build_word_tokenizer(default_words())
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2,
                           sliding_window=None)
    torch.manual_seed(0)
    MistralForCausalLM(config).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def mistral(words_dataset, tmp_path_factory):
    model_dir = build_tiny_mistral(tmp_path_factory.mktemp("tiny-mistral"))
    artifact = edit(model_dir, words_dataset, tmp_path_factory.mktemp("mistral-artifact"), limit=4)
    return model_dir, artifact, MemoirHFModel.from_pretrained(model_dir, artifact=artifact)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, artifact_dir):
    return MemoirHFModel.from_pretrained(tiny_model_dir, artifact=artifact_dir)


def split_clear_of_threshold(reference, candidates: list[str]) -> tuple[list[str], list[str]]:
    """(routed, unrouted) candidates, in order, leaving out those within MARGIN of the threshold
    (a float-level difference could flip their route between vLLM and the reference)."""
    decisions = reference.route(candidates)
    chosen = [(p, d.route) for p, d in zip(candidates, decisions) if abs(d.overlap - THRESHOLD) >= MARGIN]
    return [p for p, route in chosen if route >= 0], [p for p, route in chosen if route < 0]


@pytest.fixture(scope="module")
def prompts(words_dataset, reference):
    """Edit prompts, paraphrase-like variants and unrelated prompts, clear of the threshold."""
    records = [json.loads(line) for line in words_dataset.read_text().splitlines()][:8]
    candidates = []
    for r in records:
        s = r["subject"]
        candidates += [r["prompt"], f"where does {s} live now ?", f"where does {s} live", r["rephrase"], r["loc"]]
    candidates += ["the river of w300 is w301 .", "Q : what is the capital of w9 ?", "I w5 w6 w7 w8 w9 w10 w11 w12 w13 ."]
    routed, unrouted = split_clear_of_threshold(reference, candidates)
    assert len(routed) >= 12 and len(unrouted) >= 8, (len(routed), len(unrouted))
    return {"routed": routed, "unrouted": unrouted, "all": routed + unrouted}


def served_client(server):
    client = server.client()
    client.memoir_model = client.models.list().data[0].id
    return client


def complete(client, prompt, max_tokens: int, logprobs: int | None = None):
    """(prompt token ids, completion token ids, choice) of a greedy completion, EOS ignored."""
    response = client.completions.create(
        model=client.memoir_model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, logprobs=logprobs,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    choice = response.choices[0]
    return list(choice.prompt_token_ids), list(choice.token_ids), choice


def served_token_ids(client, api: str, prompt: str, stream: bool, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt token ids, completion token ids) from the completions or chat API, streamed or not."""
    common = dict(model=client.memoir_model, max_tokens=max_tokens, temperature=0.0, stream=stream,
                  extra_body={"return_token_ids": True, "ignore_eos": True})
    if api == "chat":
        response = client.chat.completions.create(messages=[{"role": "user", "content": prompt}], **common)
    else:
        response = client.completions.create(prompt=prompt, **common)
    chunks = response if stream else [response]
    prompt_ids, token_ids = None, []
    for chunk in chunks:
        # chat reports prompt ids on the response, completions on the choice
        prompt_ids = getattr(chunk, "prompt_token_ids", None) or prompt_ids
        for choice in chunk.choices:
            prompt_ids = getattr(choice, "prompt_token_ids", None) or prompt_ids
            token_ids += list(getattr(choice, "token_ids", None) or [])
    return list(prompt_ids or []), token_ids


def assert_parity(reference, client, prompts: list[str], max_tokens: list[int], concurrency: int) -> None:
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda args: complete(client, *args), zip(prompts, max_tokens)))
    expected = greedy_ids(reference, [r[0] for r in results], max(max_tokens))
    mismatches = [(p, got, want[:n]) for p, (_, got, _), want, n in zip(prompts, results, expected, max_tokens)
                  if got != want[:n]]
    assert not mismatches, f"{len(mismatches)}/{len(prompts)} differ, e.g. {mismatches[:3]}"
    print(f"parity: {len(prompts)}/{len(prompts)} greedy completions token-identical (concurrency {concurrency})")


class TestEager:
    """--enforce-eager, next to a plain vLLM server of the same base model."""

    @pytest.fixture(scope="class")
    def servers(self, tiny_model_dir, artifact_dir, mistral, tmp_path_factory):
        logs = tmp_path_factory.mktemp("logs")
        servers = {
            "memoir": VllmServer(tiny_model_dir, [*COMMON, "--enforce-eager", *memoir_overrides(artifact_dir)],
                                 logs / "eager.log", env={"MEMOIR_LOG_LEVEL": "DEBUG"}),
            "base": VllmServer(tiny_model_dir, [*COMMON, "--enforce-eager"], logs / "base.log"),
            "mistral": VllmServer(mistral[0], [*COMMON, "--enforce-eager",
                                               *memoir_overrides(mistral[1], "MemoirMistralForCausalLM")],
                                  logs / "mistral.log"),
        }
        start_all(list(servers.values()))
        print("eager start-up (concurrent): " + ", ".join(f"{n} {s.startup_seconds:.0f} s" for n, s in servers.items()))
        yield servers
        for server in servers.values():
            server.stop()

    def test_mistral_family_parity(self, servers, mistral, words_dataset):
        _, _, reference = mistral
        records = [json.loads(line) for line in words_dataset.read_text().splitlines()]
        prompts = [r["prompt"] for r in records[:4]] + [r["loc"] for r in records[:4]]
        decisions = reference.route(prompts)
        assert sum(d.routed for d in decisions) >= 2 and sum(not d.routed for d in decisions) >= 2
        assert_parity(reference, served_client(servers["mistral"]), prompts, [8] * len(prompts), concurrency=len(prompts))

    def test_sequential_greedy_parity(self, servers, reference, prompts):
        client = served_client(servers["memoir"])
        assert_parity(reference, client, prompts["all"], [8] * len(prompts["all"]), concurrency=1)
        # The edits matter: most routed prompts' answers differ from the base model's.
        with reference.routing_off():
            base = greedy_ids(reference, [reference.prompt_ids(p) for p in prompts["routed"]], 8)
        served = [complete(client, p, 8)[1] for p in prompts["routed"]]
        assert sum(s != b for s, b in zip(served, base)) >= len(served) // 2

    def test_concurrent_mixed_parity(self, servers, reference, prompts):
        mixed = (prompts["routed"] + prompts["unrouted"]) * 2
        lengths = [4 + (i * 7) % 21 for i in range(len(mixed))]
        assert_parity(reference, served_client(servers["memoir"]), mixed, lengths, concurrency=len(mixed))

    @pytest.mark.parametrize("api", ["completions", "chat"])
    @pytest.mark.parametrize("stream", [False, True])
    def test_openai_apis_match_reference(self, servers, reference, prompts, api, stream):
        client = served_client(servers["memoir"])
        for prompt in (prompts["routed"][0], prompts["unrouted"][0]):
            prompt_ids, token_ids = served_token_ids(client, api, prompt, stream, max_tokens=8)
            assert prompt_ids, "the server did not report prompt token ids"
            assert token_ids == greedy_ids(reference, [prompt_ids], 8)[0]

    def test_logprobs_match_reference(self, servers, reference, prompts):
        client = served_client(servers["memoir"])
        worst = 0.0
        for prompt in prompts["routed"][:4] + prompts["unrouted"][:4]:
            prompt_ids, token_ids, choice = complete(client, prompt, 6, logprobs=1)
            expected = token_logprobs(reference, prompt_ids, token_ids)
            worst = max(worst, max(abs(a - b) for a, b in zip(choice.logprobs.token_logprobs, expected)))
        assert worst < 1e-3, worst

    def test_unrouted_requests_equal_plain_vllm(self, servers, prompts):
        """Unrouted requests get exactly what vLLM serving the base model gives, bit for bit."""
        memoir, base = served_client(servers["memoir"]), served_client(servers["base"])
        for prompt in prompts["unrouted"][:6]:
            _, memoir_tokens, memoir_choice = complete(memoir, prompt, 6, logprobs=5)
            _, base_tokens, base_choice = complete(base, prompt, 6, logprobs=5)
            assert memoir_tokens == base_tokens
            assert memoir_choice.logprobs.top_logprobs == base_choice.logprobs.top_logprobs
        for prompt in prompts["routed"][:3]:
            memoir_lp = complete(memoir, prompt, 6, logprobs=1)[2].logprobs.token_logprobs
            base_lp = complete(base, prompt, 6, logprobs=1)[2].logprobs.token_logprobs
            assert memoir_lp != base_lp

    def test_decisions_are_logged_and_counted(self, servers):
        server = servers["memoir"]
        log = server.log_text()
        assert "MEMOIR route: edit_id=" in log and "MEMOIR no route" in log
        metrics = server.metrics()
        assert metric_value(metrics, "memoir:routed_requests_total") > 0
        assert metric_value(metrics, "memoir:unrouted_requests_total") > 0
        assert metric_value(metrics, "vllm:prompt_tokens_total") > 0  # vLLM's own metrics still served


class TestCompiledAndRefusals:
    @pytest.fixture(scope="class")
    def refusals(self, tiny_model_dir, artifact_dir, tmp_path_factory):
        """Servers that must refuse to start, run in the background from the class's first test on
        (they overlap the compiled server's start-up)."""
        logs = tmp_path_factory.mktemp("logs")
        other_model = build_tiny_llama(tmp_path_factory.mktemp("other-llama"), seed=1)
        runs = {
            # vLLM's defaults: prefix caching and chunked prefill both on.
            "defaults": VllmServer(tiny_model_dir, ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                                                    *memoir_overrides(artifact_dir)], logs / "defaults.log"),
            "foreign": VllmServer(other_model, [*COMMON, "--enforce-eager", *memoir_overrides(artifact_dir)],
                                  logs / "foreign.log"),
        }
        pool = ThreadPoolExecutor(len(runs))
        futures = {name: pool.submit(server.wait_for_exit, 300) for name, server in runs.items()}
        yield runs, futures
        pool.shutdown(wait=True)  # wait_for_exit always stops its server

    def test_compiled_with_preemption_parity(self, refusals, tiny_model_dir, artifact_dir, reference, prompts,
                                             tmp_path_factory):
        """torch.compile (no --enforce-eager) and a KV cache small enough to force preemptions."""
        log = tmp_path_factory.mktemp("logs") / "compiled.log"
        args = [*COMMON, "--block-size", "32", "--num-gpu-blocks-override", "12", *memoir_overrides(artifact_dir)]
        with VllmServer(tiny_model_dir, args, log, env={"MEMOIR_LOG_LEVEL": "DEBUG"}) as server:
            client = served_client(server)
            mixed = prompts["routed"][:10] + prompts["unrouted"][:10]
            lengths = [60 + (i * 13) % 41 for i in range(len(mixed))]
            assert_parity(reference, client, mixed, lengths, concurrency=len(mixed))
            preemptions = metric_value(server.metrics(), "vllm:num_preemptions_total")
        assert preemptions > 0, "the small KV cache did not force any preemption"
        recomputes = server.log_text().count("MEMOIR: preempted request recomputed")
        assert recomputes > 0, "no preempted request was recomputed with its generated tokens"
        print(f"compiled server: start-up {server.startup_seconds:.0f} s, {preemptions:.0f} preemptions, "
              f"{recomputes} recomputes after preemption logged")

    def test_refuses_unsafe_engine_settings_and_foreign_artifact(self, refusals):
        runs, futures = refusals
        codes = {name: future.result() for name, future in futures.items()}
        assert codes["defaults"] != 0 and codes["foreign"] != 0, codes
        assert "--no-enable-prefix-caching --no-enable-chunked-prefill" in runs["defaults"].log_text()
        assert "made for a different base model" in runs["foreign"].log_text()


class TestTensorParallel:
    def test_two_rank_parity(self, tiny_model_dir, artifact_dir, reference, prompts, tmp_path_factory):
        """--tensor-parallel-size 2 on CPU: sharded memory, gathered top-k, one all-reduce."""
        import os

        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            pytest.skip("two CPU cores are needed to bind two tensor-parallel workers")
        # vLLM's CPU workers bind to NUMA nodes by default; one node here, so bind one core each.
        env = {"VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}|{cores[1]}"}
        args = [*COMMON, "--enforce-eager", "--tensor-parallel-size", "2", *memoir_overrides(artifact_dir)]
        with VllmServer(tiny_model_dir, args, tmp_path_factory.mktemp("logs") / "tp2.log", env=env) as server:
            print(f"tensor-parallel server: start-up {server.startup_seconds:.0f} s")
            mixed = prompts["routed"] + prompts["unrouted"]
            assert_parity(reference, served_client(server), mixed, [8] * len(mixed), concurrency=len(mixed))
