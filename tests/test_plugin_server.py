"""The plugin under a real `vllm serve`: exact parity with the transformers reference.

A tiny model's engine starts in ~40 s eager and ~100 s compiled on 2 cores, so servers are
few, shared by the tests of a class, and started concurrently where they can be.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from plugin_reference import assert_parity, complete, greedy_ids, served_client, served_token_ids, token_logprobs
from served_edits import COMMON, clear_prompts, edit

from edit_tools.hf_model import MemoirHFModel
from edit_tools.tiny_models import build_tiny_llama, build_word_tokenizer, default_words
from vllm_memoir.server_process import VllmServer, metric_value, start_all
from vllm_memoir.engine_requirements import hf_overrides_args

pytestmark = [pytest.mark.server, pytest.mark.slow]


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


@pytest.fixture(scope="module")
def prompts(words_dataset, reference):
    """Edit prompts, paraphrase-like variants and unrelated prompts, clear of the threshold."""
    variants = ["{prompt}", "where does {subject} live now ?", "where does {subject} live", "{rephrase}", "{loc}"]
    extra = ["the river of w300 is w301 .", "Q : what is the capital of w9 ?", "I w5 w6 w7 w8 w9 w10 w11 w12 w13 ."]
    return clear_prompts(words_dataset, reference, variants, extra, at_least=(12, 8))


class TestEager:
    """--enforce-eager, next to a plain vLLM server of the same base model."""

    @pytest.fixture(scope="class")
    @classmethod  # pytest 9.1 deprecates class-scoped fixtures as instance methods (removed in 10)
    def servers(cls, tiny_model_dir, artifact_dir, mistral, tmp_path_factory):
        logs = tmp_path_factory.mktemp("logs")
        servers = {
            "memoir": VllmServer(tiny_model_dir, [*COMMON, "--enforce-eager", *hf_overrides_args(artifact_dir)],
                                 logs / "eager.log", env={"MEMOIR_LOG_LEVEL": "DEBUG"}),
            "base": VllmServer(tiny_model_dir, [*COMMON, "--enforce-eager"], logs / "base.log"),
            "mistral": VllmServer(mistral[0], [*COMMON, "--enforce-eager",
                                               *hf_overrides_args(mistral[1], "MemoirMistralForCausalLM")],
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

    def test_decisions_are_logged_and_counted(self, servers, prompts):
        """One routed and one unrouted request of its own: each is logged and counted once."""
        server = servers["memoir"]
        client = served_client(server)
        names = ("memoir:routed_requests_total", "memoir:unrouted_requests_total", "vllm:prompt_tokens_total")
        log_start, before = len(server.log_text()), [metric_value(server.metrics(), n) for n in names]
        for prompt in (prompts["routed"][0], prompts["unrouted"][0]):
            complete(client, prompt, 2)
        log = server.log_text()[log_start:]
        assert "MEMOIR route: edit_id=" in log and "MEMOIR no route" in log, log[-2000:]
        after = [metric_value(server.metrics(), n) for n in names]
        assert after[0] - before[0] == 1 and after[1] - before[1] == 1, (before, after)
        assert after[2] > before[2]  # vLLM's own metrics still served


class TestCompiledAndRefusals:
    @pytest.fixture(scope="class")
    @classmethod  # see TestEager.servers
    def refusals(cls, tiny_model_dir, artifact_dir, tmp_path_factory):
        """Servers that must refuse to start, run in the background from the class's first test on
        (they overlap the compiled server's start-up)."""
        logs = tmp_path_factory.mktemp("logs")
        other_model = build_tiny_llama(tmp_path_factory.mktemp("other-llama"), seed=1)
        runs = {
            # vLLM's defaults: prefix caching and chunked prefill both on.
            "defaults": VllmServer(tiny_model_dir, ["--dtype", "float32", "--max-model-len", "256", "--enforce-eager",
                                                    *hf_overrides_args(artifact_dir)], logs / "defaults.log"),
            "foreign": VllmServer(other_model, [*COMMON, "--enforce-eager", *hf_overrides_args(artifact_dir)],
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
        args = [*COMMON, "--block-size", "32", "--num-gpu-blocks-override", "12", *hf_overrides_args(artifact_dir)]
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
        args = [*COMMON, "--enforce-eager", "--tensor-parallel-size", "2", *hf_overrides_args(artifact_dir)]
        with VllmServer(tiny_model_dir, args, tmp_path_factory.mktemp("logs") / "tp2.log", env=env) as server:
            print(f"tensor-parallel server: start-up {server.startup_seconds:.0f} s")
            mixed = prompts["routed"] + prompts["unrouted"]
            assert_parity(reference, served_client(server), mixed, [8] * len(mixed), concurrency=len(mixed))
