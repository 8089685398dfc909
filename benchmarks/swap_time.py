"""Live-swap time of a running memoir-serve, for artifacts of 1,000 and 100,000 edits.

Starts one server (MEMOIR_ADMIN=1) of the facts model, then POSTs /memoir/artifact with
synthetic artifacts of each size (benchmarks/synthetic_artifact.py: a real artifact padded
with random edits of the right shapes) and records the phases the server reports:

  load    the workers read and check the artifact and build their share, on a loader
          thread, while the server keeps serving;
  drain   new requests are held, requests already running finish under the old edits;
  commit  the new edits are put in place (engine idle);
  paused  drain + commit: how long new requests waited.

Each size is swapped `--repeats` times idle and `--repeats` times under traffic (clients
sending short greedy completions back to back), alternating two artifacts of the size so
every swap changes the served version. Under traffic it also records the longest request
latency seen while a swap was loading versus without any swap, which shows whether
loading stalls serving.

    python benchmarks/swap_time.py --like runs/bench/facts-real --json benchmarks/results/swap_time.json \
        --markdown benchmarks/results/swap_time.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from report_paths import command_line, repo_relative  # noqa: E402
from synthetic_artifact import synthetic_artifact  # noqa: E402

from vllm_memoir.core import read_manifest  # noqa: E402
from vllm_memoir.engine_requirements import ROUTING_FLAGS, hf_overrides_args  # noqa: E402
from vllm_memoir.server_process import VllmServer  # noqa: E402

logger = logging.getLogger("swap_time")
ADMIN_KEY = "swap-benchmark"


def real_artifact(model: Path, out: Path, edits: int) -> Path:
    """A small real artifact of the model (the routing settings and memory the padding keeps)."""
    from edit_tools.datasets import load_edit_dataset
    from edit_tools.editor import run_edit_job
    from edit_tools.hparams import MemoirHyperParams

    hp = MemoirHyperParams.from_yaml(REPO / "configs" / "facts-llama.yaml")
    requests = load_edit_dataset(REPO / "data" / "facts" / "zsre-facts-T10.json")[:edits]
    run_edit_job(model, requests, hp, out, progress=False)
    return out


class Traffic:
    """Clients sending short completions back to back; latencies kept with their start times."""

    def __init__(self, url: str, model: str, prompts: list[str], clients: int):
        self.url, self.model, self.prompts = url, model, prompts
        self.samples: list[tuple[float, float]] = []  # (start, seconds)
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(clients)]

    def _run(self, index: int) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as http:
            i = index
            while not self._stop.is_set():
                body = {"model": self.model, "prompt": self.prompts[i % len(self.prompts)], "max_tokens": 8,
                        "temperature": 0.0, "ignore_eos": True}
                started = time.monotonic()
                try:
                    http.post("/v1/completions", json=body).raise_for_status()
                    self.samples.append((started, time.monotonic() - started))
                except Exception as exc:  # noqa: BLE001 -- counted and reported
                    self.errors.append(repr(exc))
                i += 1

    def __enter__(self) -> "Traffic":
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join()


def swap(admin: httpx.Client, path: Path) -> dict:
    started = time.monotonic()
    response = admin.post("/memoir/artifact", json={"path": str(path)})
    response.raise_for_status()
    return {**response.json(), "http_seconds": round(time.monotonic() - started, 4), "started": started}


def summarize(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def run(args) -> dict:
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    like = args.like or real_artifact(args.model, work / "real", 4)
    artifacts = {}
    for size in args.sizes:
        for variant in (0, 1):
            out = work / f"synthetic-{size}-{variant}"
            started = time.monotonic()
            if not (out / "manifest.json").exists():
                synthetic_artifact(args.model, out, size, like=like, seed=variant + 1)
            logger.info("%s ready (%.1f s)", out, time.monotonic() - started)
            artifacts[(size, variant)] = out
    size_on_disk = {size: sum(f.stat().st_size for f in artifacts[(size, 0)].iterdir()) for size in args.sizes}

    serve_args = ["--dtype", "float32", "--max-model-len", "64", *ROUTING_FLAGS,
                  *hf_overrides_args(artifacts[(args.sizes[0], 1)])]
    if args.eager:
        serve_args.append("--enforce-eager")
    env = {"MEMOIR_ADMIN": "1", "MEMOIR_ADMIN_KEY": ADMIN_KEY}
    prompts = [r["src"] for r in json.loads((REPO / "data" / "facts" / "zsre-facts-T10.json").read_text())]
    results: dict = {"sizes": {}}
    with VllmServer(args.model, serve_args, work / "server.log", env=env, startup_timeout=900) as server:
        results["server_startup_seconds"] = round(server.startup_seconds, 1)
        admin = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=900)
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        for size in args.sizes:
            runs = {"idle": [], "traffic": []}
            for i in range(args.repeats):
                runs["idle"].append(swap(admin, artifacts[(size, i % 2)]))
            with Traffic(server.url, model, prompts, args.clients) as traffic:
                time.sleep(3.0)
                for i in range(args.repeats):
                    runs["traffic"].append(swap(admin, artifacts[(size, (i + 1) % 2)]))
                    time.sleep(2.0)
            loading = [s for s in traffic.samples if any(r["started"] <= s[0] <= r["started"] + r["load_seconds"]
                                                         for r in runs["traffic"])]
            quiet = [s for s in traffic.samples if not any(r["started"] - 1 <= s[0] <= r["started"] + r["http_seconds"]
                                                           for r in runs["traffic"])]
            entry = {"edits": size, "artifact_mb": round(size_on_disk[size] / 2**20, 2)}
            for mode, swaps in runs.items():
                entry[mode] = {phase: summarize([s[f"{phase}_seconds"] for s in swaps])
                               for phase in ("load", "drain", "commit", "paused", "http")}
                entry[mode]["versions"] = [s["version"] for s in swaps]
            entry["traffic"]["requests"] = len(traffic.samples)
            entry["traffic"]["failed_requests"] = len(traffic.errors)
            entry["traffic"]["max_latency_while_loading"] = round(max((s[1] for s in loading), default=0.0), 4)
            entry["traffic"]["max_latency_without_swap"] = round(max((s[1] for s in quiet), default=0.0), 4)
            entry["traffic"]["median_latency_without_swap"] = round(
                statistics.median([s[1] for s in quiet]) if quiet else 0.0, 4)
            for name, params in (("list_all", {}), ("list_page_100", {"limit": 100})):
                started = time.monotonic()
                listing = admin.get("/memoir/edits", params=params)
                listing.raise_for_status()
                entry[name] = {"seconds": round(time.monotonic() - started, 4), "bytes": len(listing.content),
                               "edits": len(listing.json()["edits"])}
            results["sizes"][str(size)] = entry
            logger.info("%d edits: %s", size, json.dumps(entry))
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                          "note": args.machine_note}
    results["args"] = {"model": repo_relative(args.model), "like": repo_relative(like), "sizes": args.sizes,
                       "repeats": args.repeats, "clients": args.clients, "eager": args.eager,
                       "like_edits": read_manifest(like).num_edits}
    return results


def markdown(results: dict, command: str) -> str:
    lines = ["# Live swap time (POST /memoir/artifact)", "",
             f"Machine: {results['machine']['note']} ({results['machine']['platform']}). "
             f"Server start-up {results['server_startup_seconds']} s. Medians (min-max) over "
             f"{results['args']['repeats']} swaps each, in seconds.", "",
             "Phases as the server reports them: **load** (every worker reads and checks the artifact and builds "
             "its share on a loader thread, while serving goes on), **drain** (engine paused in vLLM's wait mode: "
             "new requests queue, running ones finish under the old edits; includes vLLM's fixed 0.02 s settle "
             "sleep), **commit** (new edits put in place, engine idle), **new requests held** = drain + commit. "
             f"Artifacts: the facts model's real {results['args'].get('like_edits', 4)}-edit artifact padded with "
             "random edits "
             "(benchmarks/synthetic_artifact.py), two of each size swapped in turn.", "",
             "| edits | artifact MB | mode | load (serving) | drain | commit | new requests held | HTTP call |",
             "|---:|---:|---|---|---|---|---|---|"]

    def cell(stats: dict) -> str:
        return f"{stats['median']:.3f} ({stats['min']:.3f}-{stats['max']:.3f})"

    for size, entry in results["sizes"].items():
        for mode in ("idle", "traffic"):
            e = entry[mode]
            lines.append(f"| {int(size):,} | {entry['artifact_mb']} | {mode} | {cell(e['load'])} | {cell(e['drain'])} | "
                         f"{cell(e['commit'])} | {cell(e['paused'])} | {cell(e['http'])} |")
    lines += ["", "Under traffic (clients sending 8-token greedy completions back to back):", ""]
    for size, entry in results["sizes"].items():
        t = entry["traffic"]
        lines.append(f"- {int(size):,} edits: {t['requests']} requests, {t['failed_requests']} failed; longest request "
                     f"while a swap was loading {t['max_latency_while_loading']} s, without a swap "
                     f"{t['max_latency_without_swap']} s (median {t['median_latency_without_swap']} s).")
    lines += ["", "GET /memoir/edits after the swaps:", ""]
    for size, entry in results["sizes"].items():
        full, page = entry["list_all"], entry["list_page_100"]
        lines.append(f"- {int(size):,} edits: all {full['edits']:,} edits {full['seconds']} s ({full['bytes'] / 2**20:.1f} MB); "
                     f"a page of {page['edits']} {page['seconds']} s.")
    lines += ["", "Command:", "", "```bash", command, "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=REPO / "models" / "facts-llama")
    parser.add_argument("--like", type=Path, help="a real artifact of --model to pad (default: made with 4 edits)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 100000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--eager", action="store_true", help="--enforce-eager (default: compiled)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "swap-bench")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--machine-note", default="2 shared CPU cores, no GPU")
    args = parser.parse_args(argv)
    args.model = args.model.resolve()
    args.workdir = args.workdir.resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    results = run(args)
    command = "python " + command_line("benchmarks/swap_time.py", argv if argv is not None else sys.argv[1:])
    results["command"] = command
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(results, command))


if __name__ == "__main__":
    main()
