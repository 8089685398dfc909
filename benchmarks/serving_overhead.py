"""Serving overhead of the MEMOIR plugin: the same model served by plain vLLM and by vLLM + plugin.

One command runs the whole comparison: it builds what it needs (a real artifact of a few
edits made with the edit tools, synthetic artifacts of 1,000 and 100,000 edits, optionally a
larger random-weight Llama), serves each model with `memoir-serve` twice -- without
--hf-overrides (plain vLLM) and with the plugin -- under the same flags otherwise, and
sends both the same workload through the OpenAI completions API:

  256 prompts (edit prompts, their paraphrases, unrelated prompts), 64 output tokens each
  (greedy, ignore_eos), 32 concurrent streaming clients.

Reported per server: output tokens/s, time to first token (TTFT) p50/p99 and inter-token
latency (ITL) p50/p99, and the plugin/plain ratio. The machine is noisy (2 shared cores), so
each server is warmed up, then plain and plugin rounds alternate (ABAB...) and medians over
the rounds are reported. At most two servers run at a time (plain stays up per model; one
plugin server per artifact), and the one not measuring is stopped (SIGSTOP) during the other's
round, since vLLM's CPU workers of both bind to the same core.

    python benchmarks/serving_overhead.py                  # facts model + a 1024-hidden Llama
    python benchmarks/serving_overhead.py --models facts --rounds 3 --artifacts real,1000
    python benchmarks/serving_overhead.py --model /path/to/llama --artifacts 1000,100000

Results: benchmarks/results/serving_overhead.json (and a table on stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from report_paths import command_line  # noqa: E402
from synthetic_artifact import synthetic_artifact  # noqa: E402

from vllm_memoir.server_process import VllmServer, start_all  # noqa: E402
from vllm_memoir.engine_requirements import ROUTING_FLAGS, hf_overrides_args

logger = logging.getLogger("serving_overhead")
REPO = Path(__file__).resolve().parents[1]
FACTS_MODEL = REPO / "models" / "facts-llama"
FACTS_DATA = REPO / "data" / "facts" / "zsre-facts-T100.json"
FACTS_HPARAMS = REPO / "configs" / "facts-llama.yaml"


# --- workload --------------------------------------------------------------------------------

@dataclass
class Workload:
    prompts: list[str]
    kinds: list[str]  # "edit", "paraphrase" or "unrelated", per prompt
    max_tokens: int
    concurrency: int


def build_workload(records: list[dict], num_edited: int, count: int, max_tokens: int, concurrency: int,
                   seed: int = 0) -> Workload:
    """A shuffled mix: 1/4 edit prompts, 1/4 their paraphrases, 1/2 unrelated prompts."""
    edited, others = records[:num_edited], records[num_edited:]
    pools = {
        "edit": [r["src"] for r in edited],
        "paraphrase": [r["rephrase"] for r in edited],
        "unrelated": [r["src"] for r in others] + [r["loc"] for r in records],
    }
    shares = {"edit": count // 4, "paraphrase": count // 4}
    shares["unrelated"] = count - sum(shares.values())
    items = [(kind, pools[kind][i % len(pools[kind])]) for kind, n in shares.items() for i in range(n)]
    random.Random(seed).shuffle(items)
    return Workload([p for _, p in items], [k for k, _ in items], max_tokens, concurrency)


def fresh_variant(workload: Workload, round_index: int, vocabulary: list[str], words: int = 2) -> Workload:
    """The workload with `words` random vocabulary words before each prompt, new every round.

    The plugin caches routing decisions by prompt, so a workload repeated round after round
    pays the matching cost once; fresh prompts make every request pay it (at 100,000 edits
    it is the plugin's largest per-request cost). Routes may change; only speed is measured.
    """
    rng = random.Random(1000 + round_index)
    prompts = [" ".join(rng.choices(vocabulary, k=words) + [prompt]) for prompt in workload.prompts]
    return Workload(prompts, workload.kinds, workload.max_tokens, workload.concurrency)


def shared_prefix_variant(workload: Workload, prefix: str) -> Workload:
    """The workload with one prefix (a system-prompt-like run of words) before every prompt: with
    prefix caching on, requests after the first reuse its KV blocks, and the plugin completes
    their route features from its per-block input sums."""
    return Workload([f"{prefix} {prompt}" for prompt in workload.prompts], workload.kinds, workload.max_tokens,
                    workload.concurrency)


def shared_prefix(vocabulary: list[str], words: int) -> str:
    return " ".join(random.Random(7).choices(vocabulary, k=words))


def prompt_vocabulary(records: list[dict]) -> list[str]:
    return sorted({word for r in records for word in r["src"].split() if word.isalpha()})


# --- client ----------------------------------------------------------------------------------

@dataclass
class RequestTiming:
    ttft: float
    itls: list[float]
    tokens: int


async def _stream_one(session: aiohttp.ClientSession, url: str, model: str, prompt: str,
                      max_tokens: int, attempts: int = 3) -> RequestTiming:
    """One streamed request; a kept-alive connection the server closed as it was reused
    (aiohttp raises before any byte of the answer) is retried on a fresh one."""
    for attempt in range(1, attempts + 1):
        try:
            return await _stream_once(session, url, model, prompt, max_tokens)
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as exc:
            if attempt == attempts:
                raise
            RETRIES[0] += 1
            logger.warning("retrying a request whose connection was closed before its answer (%s)", exc)
    raise AssertionError("unreachable")


RETRIES = [0]


async def _stream_once(session: aiohttp.ClientSession, url: str, model: str, prompt: str,
                       max_tokens: int) -> RequestTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "ignore_eos": True, "return_token_ids": True}
    started = time.perf_counter()
    last, ttft, itls, tokens = started, None, [], 0
    async with session.post(f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for raw in response.content:
            line = raw.strip()
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            new = sum(len(c.get("token_ids") or ()) for c in chunk.get("choices", ()))
            if not new:
                continue
            now = time.perf_counter()
            if ttft is None:
                ttft = now - started
            else:
                # A chunk carrying n tokens (the API server fell behind) spreads its gap over them.
                itls += [(now - last) / new] * new
            last, tokens = now, tokens + new
    if tokens != max_tokens:
        logger.warning("request got %d tokens, expected %d (ignore_eos) for %r", tokens, max_tokens, prompt)
    return RequestTiming(ttft, itls, tokens)


async def _run_round(url: str, model: str, workload: Workload) -> dict:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for prompt in workload.prompts:
        queue.put_nowait(prompt)
    timings: list[RequestTiming] = []
    connector = aiohttp.TCPConnector(limit=workload.concurrency)
    timeout = aiohttp.ClientTimeout(total=1800)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def client() -> None:
            while not queue.empty():
                timings.append(await _stream_one(session, url, model, queue.get_nowait(), workload.max_tokens))

        started = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(workload.concurrency)))
        elapsed = time.perf_counter() - started
    return summarize(timings, elapsed)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    at = (len(ordered) - 1) * q
    low = int(at)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (at - low)


def summarize(timings: list[RequestTiming], elapsed: float) -> dict:
    ttfts = [t.ttft for t in timings]
    itls = [gap for t in timings for gap in t.itls]
    tokens = sum(t.tokens for t in timings)
    return {
        "requests": len(timings), "short_responses": sum(t.tokens != max(x.tokens for x in timings) for t in timings),
        "output_tokens": tokens, "seconds": elapsed, "tokens_per_s": tokens / elapsed,
        "ttft_p50_ms": 1e3 * percentile(ttfts, 0.5), "ttft_p99_ms": 1e3 * percentile(ttfts, 0.99),
        "itl_p50_ms": 1e3 * percentile(itls, 0.5), "itl_p99_ms": 1e3 * percentile(itls, 0.99),
    }


ROUTING_SECONDS = "memoir:routing_step_seconds_total"  # the plugin's own time, rank 0


def run_round(server: VllmServer, workload: Workload, plugin: bool = False) -> dict:
    """One round; for the plugin also the time its routing op took (its own counter, rank 0)."""
    if not plugin:
        return asyncio.run(_run_round(server.url, server.served_model, workload))
    from vllm_memoir.server_process import metric_value

    before = metric_value(server.metrics(), ROUTING_SECONDS)
    result = asyncio.run(_run_round(server.url, server.served_model, workload))
    result["routing_op_seconds"] = metric_value(server.metrics(), ROUTING_SECONDS) - before
    # The worker is busy for nearly the whole round at this concurrency, so this share is
    # the overhead the op itself adds, read without the other server's noise.
    result["routing_op_share"] = result["routing_op_seconds"] / result["seconds"]
    return result



# --- servers ---------------------------------------------------------------------------------

def served_model_id(server: VllmServer) -> str:
    return server.client().models.list().data[0].id


def serve_args(max_model_len: int, eager: bool, extra: list[str], engine_defaults: bool = False) -> list[str]:
    """Both servers' flags: vLLM's defaults (prefix caching, chunked prefill on), or both off."""
    routing_flags = [] if engine_defaults else ROUTING_FLAGS
    args = ["--dtype", "float32", "--max-model-len", str(max_model_len), *routing_flags, *extra]
    return args + (["--enforce-eager"] if eager else [])


def hf_overrides(config: dict, artifact: Path | None) -> list[str]:
    """One --hf-overrides flag: model config overrides (both servers) plus, for the plugin, MEMOIR's."""
    merged = dict(config)
    if artifact is not None:
        merged.update(json.loads(hf_overrides_args(artifact.resolve())[1]))
    return ["--hf-overrides", json.dumps(merged)] if merged else []


def server(model_dir: Path, args: list[str], log: Path, env: dict[str, str]) -> VllmServer:
    return VllmServer(model_dir, args, log, env=env, startup_timeout=900)


def start(*servers: VllmServer) -> None:
    """Start servers concurrently (start-up is mostly single-threaded imports and compiling)."""
    start_all(list(servers))
    for one in servers:
        one.served_model = served_model_id(one)
        logger.info("%s up in %.0f s", one.log_path.name, one.startup_seconds)


def worker_pid(server: VllmServer) -> int | None:
    """The process that runs the model (VLLM::Worker, else VLLM::EngineCore) of a server."""
    out = subprocess.run(["ps", "-o", "pid=,pgid=,comm=", "-e"], capture_output=True, text=True).stdout
    pgid = os.getpgid(server.process.pid)
    found = {}
    for line in out.splitlines():
        pid, group, name = line.split(None, 2)
        if int(group) == pgid:
            found.setdefault(name.strip(), int(pid))
    return next((pid for name, pid in found.items() if "Worker" in name),
                next((pid for name, pid in found.items() if "EngineCore" in name), None))


def median_of(rounds: list[dict]) -> dict:
    keys = [k for k in rounds[0] if isinstance(rounds[0][k], float)]
    return {k: statistics.median(r[k] for r in rounds) for k in keys}


@dataclass
class Scenario:
    model: str
    artifact: str
    num_edits: int
    routed_prompts_share: float | None = None
    plain_rounds: list[dict] = field(default_factory=list)
    plugin_rounds: list[dict] = field(default_factory=list)
    plugin_startup_s: float | None = None
    routed_requests: float | None = None
    unrouted_requests: float | None = None
    profile: dict | None = None

    def result(self) -> dict:
        plain, plugin = median_of(self.plain_rounds), median_of(self.plugin_rounds)
        out = asdict(self)
        out.update(plain=plain, plugin=plugin, ratio_tokens_per_s=plugin["tokens_per_s"] / plain["tokens_per_s"])
        return out


def signal_server(server: VllmServer, signum: int) -> None:
    """Signal the server's whole process group (API server, engine core, worker: it was started
    in a session of its own)."""
    if server.process is not None and server.process.poll() is None:
        os.killpg(server.process.pid, signum)


@contextlib.contextmanager
def others_paused(active: VllmServer, servers: tuple[VllmServer, ...]):
    """Stop (SIGSTOP) every server but `active` while it runs a round: vLLM's CPU workers of both
    servers bind to the same core here, and an idle server's threads still took time from the
    measured one (rounds of one server swung 3-6x with both running)."""
    idle = [server for server in servers if server is not active]
    for server in idle:
        signal_server(server, signal.SIGSTOP)
    try:
        yield
    finally:
        for server in idle:
            signal_server(server, signal.SIGCONT)


def compare(plain: VllmServer, plugin: VllmServer, workload: Workload, warmup: Workload, rounds: int,
            scenario: Scenario, profile_dir: Path | None, vocabulary: list[str] | None = None,
            prefix: str | None = None) -> None:
    """ABAB rounds; with `vocabulary`, every round sends fresh prompts (see fresh_variant); with
    `prefix`, every prompt starts with it (see shared_prefix_variant)."""
    for server in (plain, plugin):
        run_round(server, warmup)
    try:
        for i in range(rounds):
            this_round = workload if vocabulary is None else fresh_variant(workload, i, vocabulary)
            if prefix:
                this_round = shared_prefix_variant(this_round, prefix)
            # Alternate which goes first so neither always follows the other's cache state.
            order = [(plain, scenario.plain_rounds), (plugin, scenario.plugin_rounds)]
            for server, sink in (order if i % 2 == 0 else order[::-1]):
                with others_paused(server, (plain, plugin)):
                    sink.append(run_round(server, this_round, plugin=server is plugin))
            logger.info("%s/%s round %d: plain %.0f tok/s, plugin %.0f tok/s", scenario.model, scenario.artifact,
                        i + 1, scenario.plain_rounds[-1]["tokens_per_s"], scenario.plugin_rounds[-1]["tokens_per_s"])
    finally:
        for server in (plain, plugin):
            signal_server(server, signal.SIGCONT)
    from vllm_memoir.server_process import metric_value

    text = plugin.metrics()
    scenario.routed_requests = metric_value(text, "memoir:routed_requests_total")
    scenario.unrouted_requests = metric_value(text, "memoir:unrouted_requests_total")
    if profile_dir is not None:
        scenario.profile = profile(plugin, workload, profile_dir / f"profile_{args_label(scenario)}")


PROFILED = ("_model_forward", "add_routed_residual", "_decide", "decode_step", "add_picked_residual",
            "add_residual", "record", "sum_before", "current_layout", "update_state", "best_overlaps")


def args_label(scenario: "Scenario") -> str:
    return f"{scenario.model}_{scenario.artifact}{PROFILE_SUFFIX[0]}"


PROFILE_SUFFIX = [""]  # set from --label so before/after profiles do not overwrite each other


def profile(server: VllmServer, workload: Workload, stem: Path) -> dict | None:
    """One extra round with py-spy sampling the model's process; raw stacks + shares per function."""
    pid = worker_pid(server)
    if pid is None:
        logger.warning("no worker process found to profile")
        return None
    stem.parent.mkdir(parents=True, exist_ok=True)
    raw = stem.with_suffix(".txt")
    spy = subprocess.Popen(["py-spy", "record", "--pid", str(pid), "--rate", "200", "--format", "raw",
                            "--output", str(raw), "--nonblocking"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(2.0)
    run_round(server, workload)
    spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    spy.wait(timeout=120)
    return {"raw": str(raw), **profile_shares(raw)}


def profile_shares(raw: Path) -> dict:
    """Samples (py-spy raw format: 'frame;frame;... count') whose stack holds each PROFILED function."""
    total, hits = 0, dict.fromkeys(PROFILED, 0)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        total += int(count)
        for name in PROFILED:
            if f"{name} (" in stack:
                hits[name] += int(count)
    forward = hits["_model_forward"] or 1
    return {"samples": total, "samples_by_function": hits,
            "routing_share_of_forward": hits["add_routed_residual"] / forward}


# --- models and artifacts --------------------------------------------------------------------

def facts_records() -> list[dict]:
    return json.loads(FACTS_DATA.read_text())


def real_facts_artifact(workdir: Path, edits: int) -> Path:
    from edit_tools.editor import run_edit_job
    from edit_tools.hparams import MemoirHyperParams

    import hashlib

    # Named after the hyperparameters, so a changed config makes a new artifact.
    digest = hashlib.sha256(FACTS_HPARAMS.read_bytes()).hexdigest()[:8]
    out = workdir / f"facts-real-{edits}-{digest}"
    run_edit_job(FACTS_MODEL, FACTS_DATA, MemoirHyperParams.from_yaml(FACTS_HPARAMS), out, limit=edits, progress=False)
    return out


def cached(path: Path, num_edits: int, build) -> Path:
    manifest = path / "manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("num_edits") == num_edits:
        return path
    build()
    return path


def build_large_model(workdir: Path, hidden: int, intermediate: int, layers: int) -> Path:
    """A random-weight Llama with the facts model's tokenizer (so the same prompts tokenize)."""
    from transformers import AutoTokenizer

    from edit_tools.tiny_models import build_tiny_llama

    out = workdir / f"llama-h{hidden}-i{intermediate}-l{layers}"
    if not (out / "config.json").exists():
        build_tiny_llama(out, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers,
                         num_heads=hidden // 64, init_std=0.02, tokenizer=AutoTokenizer.from_pretrained(FACTS_MODEL))
    return out


def model_plan(args, workdir: Path, records: list[dict]) -> list[tuple]:
    """[(model label, model dir, max_model_len, config overrides, [(artifact label, dir, num edits)])].

    The facts model was trained on 64 positions; 64 new tokens after a prompt need more, so
    both its servers get max_position_embeddings=128 (RoPE extends; only speed is measured).
    """
    edit_prompts = [r["src"] for r in records[:args.edits]]
    background = [r["loc"] for r in records[args.edits:]]
    counts = [a for a in args.artifacts.split(",") if a != "real"]
    plan = []
    if args.model:
        model_dirs = [("custom", Path(args.model), args.max_model_len, {})]
    else:
        model_dirs = []
        if "facts" in args.models:
            model_dirs.append(("facts", FACTS_MODEL, 96, {"max_position_embeddings": 128}))
        if "large" in args.models:
            hidden, inter, layers = (int(v) for v in args.large.split(":"))
            model_dirs.append((f"llama-h{hidden}", build_large_model(workdir, hidden, inter, layers), args.max_model_len, {}))
    for label, model_dir, max_len, config in model_dirs:
        artifacts = []
        real = None
        if label == "facts":
            real = real_facts_artifact(workdir, args.edits)
            if "real" in args.artifacts.split(","):
                artifacts.append(("real", real, args.edits))
        for count in counts:
            n = int(count)
            out = workdir / (f"{label}-synthetic-{n}" if real is None else f"{real.name}-synthetic-{n}")
            if real is not None:
                build = lambda out=out, n=n: synthetic_artifact(model_dir, out, n, like=real)  # noqa: E731
            else:
                # At the last decoder layer, which vLLM's defaults (prefix caching, chunked
                # prefill) can serve; the same layer for both engine settings.
                last = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"] - 1
                out = out.with_name(f"{out.name}-layer{last}")
                build = lambda out=out, n=n, md=model_dir, last=last: synthetic_artifact(  # noqa: E731
                    md, out, n, layer=last, route_prompts=edit_prompts, background_texts=background)
            started = time.perf_counter()
            cached(out, n, build)
            logger.info("artifact %s ready (%.1f s)", out, time.perf_counter() - started)
            artifacts.append((str(n), out, n))
        plan.append((label, model_dir, max_len, config, artifacts))
    return plan


# --- report ----------------------------------------------------------------------------------

def table(results: list[dict]) -> str:
    """Medians over rounds; ratio = plugin / plain output tokens/s."""
    head = ("| model | edits | server | tokens/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | ratio "
            "| routing op share |\n|---|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in results:
        for name in ("plain", "plugin"):
            m = r[name]
            ratio = f"{r['ratio_tokens_per_s']:.3f}" if name == "plugin" else ""
            share = f"{100 * m['routing_op_share']:.2f}%" if "routing_op_share" in m else ""
            edits = r["num_edits"] if name == "plugin" else ""
            lines.append(f"| {r['model']} | {edits} | {name} | {m['tokens_per_s']:.0f} | {m['ttft_p50_ms']:.0f} | "
                         f"{m['ttft_p99_ms']:.0f} | {m['itl_p50_ms']:.1f} | {m['itl_p99_ms']:.1f} | {ratio} | {share} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="facts,large", help="comma list of: facts, large")
    parser.add_argument("--model", help="serve this checkpoint directory instead (synthetic artifacts only)")
    parser.add_argument("--large", default="1024:4096:4", help="hidden:intermediate:layers of the random Llama")
    parser.add_argument("--artifacts", default="real,1000,100000", help="real (facts model only) and/or edit counts")
    parser.add_argument("--edits", type=int, default=8, help="real edits (facts model), also the routed prompts")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per server, alternating plain/plugin")
    parser.add_argument("--max-model-len", type=int, default=256)
    parser.add_argument("--eager", action="store_true", help="serve with --enforce-eager (default: compiled)")
    parser.add_argument("--serve-arg", action="append", default=[], help="extra flag for both servers (repeatable)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench")
    parser.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "serving_overhead.json")
    parser.add_argument("--profile-dir", type=Path, help="also record a py-spy profile of each plugin server")
    parser.add_argument("--label", default="", help="free text stored with the results (e.g. 'before')")
    parser.add_argument("--table", type=Path, help="only print the markdown table of a results JSON")
    parser.add_argument("--engine-defaults", action="store_true",
                        help="serve both with vLLM's defaults (prefix caching and chunked prefill on; the plugin "
                             "serves them exactly for edits at the last layer) instead of both turned off")
    parser.add_argument("--fresh-prompts", action="store_true",
                        help="new prompts every round, so the decision cache never answers (see fresh_variant)")
    parser.add_argument("--shared-prefix", type=int, default=0, metavar="WORDS",
                        help="start every prompt with the same WORDS-word prefix (prefix-cache hits; see "
                             "shared_prefix_variant)")
    args = parser.parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())["results"]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.workdir = args.workdir.resolve()
    PROFILE_SUFFIX[0] = f"_{args.label}" if args.label else ""
    args.workdir.mkdir(parents=True, exist_ok=True)

    records = facts_records()
    workload = build_workload(records, args.edits, args.prompts, args.max_tokens, args.concurrency)
    warmup = build_workload(records, args.edits, args.concurrency, args.max_tokens, args.concurrency, seed=1)
    env: dict[str, str] = {}
    results = []
    for label, model_dir, max_len, config, artifacts in model_plan(args, args.workdir, records):
        common = serve_args(max_len, args.eager, args.serve_arg, args.engine_defaults)
        plain = server(model_dir, common + hf_overrides(config, None), args.workdir / "logs" / f"{label}-plain.log", env)
        try:
            for name, artifact, num_edits in artifacts:
                scenario = Scenario(label, name, num_edits)
                plugin = server(model_dir, common + hf_overrides(config, artifact),
                                args.workdir / "logs" / f"{label}-plugin-{name}.log", env)
                try:
                    start(plugin) if plain.process is not None else start(plain, plugin)
                    scenario.plugin_startup_s = plugin.startup_seconds
                    compare(plain, plugin, workload, warmup, args.rounds, scenario, args.profile_dir,
                            prompt_vocabulary(records) if args.fresh_prompts else None,
                            shared_prefix(prompt_vocabulary(records), args.shared_prefix) if args.shared_prefix else None)
                finally:
                    plugin.stop()
                results.append(scenario.result())
                print(table(results[-1:]), flush=True)
        finally:
            plain.stop()
    report = {
        "label": args.label,
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other jobs",
        "command": command_line(Path(sys.argv[0]).name, argv if argv is not None else sys.argv[1:]),
        "workload": {"prompts": args.prompts, "max_tokens": args.max_tokens, "concurrency": args.concurrency,
                     "mix": "1/4 edit prompts, 1/4 paraphrases, 1/2 unrelated", "rounds": args.rounds,
                     "compiled": not args.eager, "fresh_prompts": args.fresh_prompts,
                     "shared_prefix_words": args.shared_prefix,
                     "engine": "vLLM defaults" if args.engine_defaults else "prefix caching and chunked prefill off"},
        "results": results,
        "client_retries": RETRIES[0],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
