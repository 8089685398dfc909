"""Reference answers for the plugin's parity tests: the transformers MEMOIR model, from token ids,
and the served side they are compared with (greedy completions with their token ids).

vLLM reports the exact prompt token ids it served (return_token_ids), so the reference
runs on those ids rather than re-tokenizing (chat templates, for one, add no <s>).
"""

from __future__ import annotations

import torch

from edit_tools.hf_model import MemoirHFModel


@torch.no_grad()
def greedy_ids(hf: MemoirHFModel, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (EOS ignored), batched with left padding and per-row routes."""
    ids, attention = hf.pad(prompts, left=True)
    with hf.routing(attention.bool()):
        out = hf.model.generate(input_ids=ids, attention_mask=attention, max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=hf.tokenizer.pad_token_id, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def token_logprobs(hf: MemoirHFModel, prompt: list[int], completion: list[int]) -> list[float]:
    """Log-probability of each completion token given the prompt (routed on the prompt)."""
    ids = torch.tensor([prompt + completion], device=hf.device)
    prompt_mask = torch.zeros_like(ids, dtype=torch.bool)
    prompt_mask[0, : len(prompt)] = True
    with hf.routing(prompt_mask):
        logits = hf.model(input_ids=ids, use_cache=False).logits.float()
    logprobs = torch.log_softmax(logits[0], dim=-1)
    positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion))
    return logprobs[positions, torch.tensor(completion)].tolist()


def split_clear_of_threshold(reference: MemoirHFModel, candidates: list[str], threshold: float,
                             margin: float) -> tuple[list[str], list[str]]:
    """(routed, unrouted) candidates, in order, leaving out those within `margin` of the threshold
    (a float-level difference could flip their route between vLLM and the reference)."""
    decisions = reference.route(candidates)
    chosen = [(p, d.route) for p, d in zip(candidates, decisions) if abs(d.overlap - threshold) >= margin]
    return [p for p, route in chosen if route >= 0], [p for p, route in chosen if route < 0]


# Greedy, EOS ignored, with the exact prompt and completion token ids in the response.
GREEDY_WITH_IDS = {"temperature": 0.0, "extra_body": {"return_token_ids": True, "ignore_eos": True}}


def served_client(server):
    client = server.client()
    client.memoir_model = client.models.list().data[0].id
    return client


def complete(client, prompt, max_tokens: int, logprobs: int | None = None):
    """(prompt token ids, completion token ids, choice) of a greedy completion, EOS ignored.

    `prompt` is text or a list of token ids."""
    response = client.completions.create(model=client.memoir_model, prompt=prompt, max_tokens=max_tokens,
                                         logprobs=logprobs, **GREEDY_WITH_IDS)
    choice = response.choices[0]
    return list(choice.prompt_token_ids), list(choice.token_ids), choice


def complete_together(client, prompts: list, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, completion token ids) per prompt of one completions request that carries
    them all: the server hands them to the engine at once, whatever the machine's load."""
    response = client.completions.create(model=client.memoir_model, prompt=prompts, max_tokens=max_tokens,
                                         **GREEDY_WITH_IDS)
    choices = sorted(response.choices, key=lambda choice: choice.index)
    return [(list(choice.prompt_token_ids), list(choice.token_ids)) for choice in choices]


def served_token_ids(client, api: str, prompt: str, stream: bool, max_tokens: int) -> tuple[list[int], list[int]]:
    """(prompt token ids, completion token ids) from the completions or chat API, streamed or not."""
    common = dict(model=client.memoir_model, max_tokens=max_tokens, stream=stream, **GREEDY_WITH_IDS)
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


def assert_parity(reference: MemoirHFModel, client, prompts: list, max_tokens: list[int], concurrency: int) -> None:
    """Greedy completions served concurrently are token-identical to the reference's."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda args: complete(client, *args), zip(prompts, max_tokens)))
    expected = greedy_ids(reference, [r[0] for r in results], max(max_tokens))
    mismatches = [(p, got, want[:n]) for p, (_, got, _), want, n in zip(prompts, results, expected, max_tokens)
                  if got != want[:n]]
    assert not mismatches, f"{len(mismatches)}/{len(prompts)} differ, e.g. {mismatches[:3]}"
    print(f"parity: {len(prompts)}/{len(prompts)} greedy completions token-identical (concurrency {concurrency})")


def speed_features_server(model_dir, artifact_dir, log, *, max_model_len: int, block_size: int,
                          batched_tokens: int, gpu_blocks: int):
    """A compiled server with vLLM's defaults (prefix caching, chunked prefill), a token budget
    small enough that prompts split into chunks and blocks small enough that prefixes get
    cached; routing decisions logged at debug level."""
    from vllm_memoir.server_process import VllmServer
    from vllm_memoir.engine_requirements import hf_overrides_args

    args = ["--dtype", "float32", "--max-model-len", str(max_model_len), "--block-size", str(block_size),
            "--max-num-batched-tokens", str(batched_tokens), "--max-num-seqs", "16",
            "--num-gpu-blocks-override", str(gpu_blocks), *hf_overrides_args(artifact_dir)]
    return VllmServer(model_dir, args, log, env={"MEMOIR_LOG_LEVEL": "DEBUG"})
