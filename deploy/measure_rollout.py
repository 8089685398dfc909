"""Measure a rolling artifact swap on Ray Serve: deploy OLD, then redeploy with NEW under load.

    RAY_ADDRESS=HEAD:6379 python deploy/measure_rollout.py --model models/facts-llama \
        --old runs/facts-v1 --new runs/facts-v2 --prompt "an edit prompt only NEW holds" --replicas 2

A client thread sends one greedy completion of --prompt every --interval seconds for the
whole run. Printed as JSON: time to deploy OLD, time the redeploy took, failed requests,
the longest stretch without a successful answer, and the sequence of distinct answers
(answers of OLD and NEW replicas interleave while both serve; none is of a third kind).
Starts vLLM engines: run it by hand, not in the test suite.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time

logger = logging.getLogger("measure_rollout")


def app_args(args, artifact: str) -> dict:
    return {"model": args.model, "artifact": artifact, "model_id": "memoir", "num_replicas": args.replicas,
            "dtype": "float32", "engine_kwargs": {"max_model_len": 64, "enforce_eager": True},
            "env_vars": {"VLLM_CPU_KVCACHE_SPACE": "1"}}


class Prober(threading.Thread):
    """Sends the probe completion in a loop; records (seconds since start, answer or None)."""

    def __init__(self, url: str, prompt: str, interval: float):
        super().__init__(daemon=True)
        from openai import OpenAI

        self.client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=30, max_retries=0)
        self.prompt, self.interval = prompt, interval
        self.started = time.monotonic()
        self.samples: list[tuple[float, str | None]] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            try:
                text = self.client.completions.create(model="memoir", prompt=self.prompt, max_tokens=4,
                                                      temperature=0).choices[0].text
            except Exception as exc:  # a failed request is a data point, not an error of the script
                logger.info("request failed: %s", exc)
                text = None
            self.samples.append((time.monotonic() - self.started, text))
            time.sleep(self.interval)


def summarize(samples: list[tuple[float, str | None]], since: float) -> dict:
    during = [(t, text) for t, text in samples if t >= since]
    ok_times = [t for t, text in during if text is not None]
    gaps = [b - a for a, b in zip(ok_times, ok_times[1:])]
    answers: list[list] = []  # runs of the same answer: [answer, count]
    for _, text in during:
        if answers and answers[-1][0] == text:
            answers[-1][1] += 1
        else:
            answers.append([text, 1])
    return {"requests": len(during), "failed": sum(text is None for _, text in during),
            "longest_gap_s": round(max(gaps, default=0.0), 1), "answer_runs": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--old", required=True, help="artifact served first")
    parser.add_argument("--new", required=True, help="artifact rolled out under load")
    parser.add_argument("--prompt", required=True, help="a prompt whose answer differs between the two")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--settle", type=float, default=20, help="seconds to keep probing after the redeploy")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import ray
    from ray import serve

    from vllm_memoir.ray_app import build_app

    ray.init(log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        t0 = time.monotonic()
        serve.run(build_app(app_args(args, args.old)), name="memoir", route_prefix="/")
        deploy_s = time.monotonic() - t0
        logger.info("OLD deployed in %.0f s", deploy_s)
        prober = Prober(f"http://127.0.0.1:{args.port}", args.prompt, args.interval)
        prober.start()
        time.sleep(10)
        redeploy_at = time.monotonic() - prober.started
        t1 = time.monotonic()
        serve.run(build_app(app_args(args, args.new)), name="memoir", route_prefix="/")  # rolling update
        redeploy_s = time.monotonic() - t1
        logger.info("NEW rolled out in %.0f s", redeploy_s)
        time.sleep(args.settle)
        prober.stopped.set()
        prober.join(timeout=60)
        result = {"replicas": args.replicas, "deploy_old_s": round(deploy_s), "redeploy_s": round(redeploy_s),
                  "before": summarize([s for s in prober.samples if s[0] < redeploy_at], 0),
                  "from_redeploy": summarize(prober.samples, redeploy_at)}
        print(json.dumps(result, indent=1))
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
