"""The routing op's own cost per forward, in isolation: the edited layer's down_proj with and
without its routing, on hand-made batches of the facts model's shape (no vLLM server).

Three kinds of forward, each as vLLM's defaults (prefix caching, chunked prefill) make them:

  * decode: R rows of one token each, `--routed` of them routed (per-block sums recorded,
    the residual on the routed rows);
  * deciding: R - 1 decode rows plus a new prompt of `--prompt-tokens` tokens whose last
    token is in the forward (its route decided on the device, then the step as above);
  * prefill rows after it: the same batch once the prompt is decided (nothing to decide).

The op's time is the layer's time minus the base down_proj's (median of `--repeats` calls,
one torch thread). Synthetic edits (random masks) of the facts model's width:

    python benchmarks/routing_step.py --json benchmarks/results/routing_step.json

`--routing-span last_user_message` serves the span rule of chat artifacts instead: each prompt
holds a user message (markers of made-up token ids), whose tails and heads are recorded too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))  # the tests' synthetic artifact builder

BLOCK = 16
USER_START, MESSAGE_END = (90001, 90002), (90003,)  # marker ids for --routing-span


def build_layer(hidden: int, dim: int, top_k: int, edits: int):
    """A RowParallelLinear (random weights) wrapped in a MemoirDownProj, prefix caching on."""
    from helpers import init_single_rank_vllm, synthetic_artifact
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.linear import RowParallelLinear

    from vllm_memoir.routing.layer import MemoirDownProj

    config = VllmConfig()
    config.cache_config.block_size = BLOCK
    config.cache_config.enable_prefix_caching = True
    with set_current_vllm_config(config):
        init_single_rank_vllm()
        artifact, _ = synthetic_artifact(edits=edits, hidden=hidden, dim=dim, top_k=top_k, aggregation="mean")
        base = RowParallelLinear(input_size=dim, output_size=hidden, bias=False, prefix="model.layers.5.mlp.down_proj")
        base.quant_method.process_weights_after_loading(base)
        return MemoirDownProj(base, artifact)


class Batch:
    """A RequestRoutes fed by hand and the layout the op reads, installed as the active ones."""

    def __init__(self, rows: int, routed: int, prompt_tokens: int, dim: int, span=None):
        from vllm_memoir.core.routing import RouteDecision
        from vllm_memoir.routing import requests, step
        from vllm_memoir.routing.layout import TokenLayout
        from vllm_memoir.routing.requests import RequestRoutes

        self.routes = RequestRoutes(route_span=span)
        requests._ACTIVE = self.routes
        self.prompt_tokens = prompt_tokens
        self.last = rows - 1
        for row in range(rows):
            ids = list(range(1, prompt_tokens)) + [row]  # prompt_tokens ids
            if span is not None:  # a user message from mid-block 1 to mid-block 2
                ids[BLOCK + 3:BLOCK + 5], ids[2 * BLOCK + 5] = USER_START, MESSAGE_END[0]
            self.routes.add(row, ids, is_new_request=True)
        self.routes.set_batch(rows)
        for row in range(rows):
            self.routes.record(row, RouteDecision(row if row < routed else -1, 0, 0.9))
        blocks = (prompt_tokens + 64) // BLOCK + 1
        table = torch.arange(rows * blocks, dtype=torch.int32).reshape(rows, blocks) + 1
        decode_position = prompt_tokens + 20
        decode_slots = table[:, decode_position // BLOCK].long() * BLOCK + decode_position % BLOCK
        self.decode = TokenLayout(torch.arange(rows + 1, dtype=torch.int32), torch.full((rows,), decode_position + 1),
                                  decode_slots, table)
        starts = list(range(rows)) + [rows - 1 + prompt_tokens]
        seq = torch.cat([torch.full((rows - 1,), decode_position + 1), torch.tensor([prompt_tokens])])
        slots = torch.cat([decode_slots[:-1], table[-1, 0].long() * BLOCK + torch.arange(prompt_tokens)])
        self.mixed = TokenLayout(torch.tensor(starts, dtype=torch.int32), seq, slots, table)
        self.x_decode = torch.randn(rows, dim)
        self.x_mixed = torch.randn(rows - 1 + prompt_tokens, dim)
        self.now = self.decode
        step.current_layout = lambda: self.now

    def make_last_pending(self) -> None:
        from vllm_memoir.routing.requests import PENDING

        self.routes.settle()
        self.routes.take_new_decisions()
        slot = self.last
        self.routes._set(slot, PENDING, self.prompt_tokens, None, tuple(self.routes.slot_span[slot].tolist()),
                         self.routes._boundaries[slot])
        self.routes.publish()


def median_us(call, repeats: int, before=None) -> float:
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            if before is not None:
                before()
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(layer, batch: Batch, repeats: int) -> dict:
    def base_only(x):
        rows, batch.routes.num_rows = batch.routes.num_rows, 0
        try:
            return median_us(lambda: layer(x), repeats)
        finally:
            batch.routes.num_rows = rows

    result = {}
    batch.now = batch.decode
    median_us(lambda: layer(batch.x_decode), 20)
    base = base_only(batch.x_decode)
    result["decode"] = {"base_us": base, "op_us": median_us(lambda: layer(batch.x_decode), repeats) - base}
    batch.now = batch.mixed
    base = base_only(batch.x_mixed)
    median_us(lambda: layer(batch.x_mixed), 10, batch.make_last_pending)
    deciding = median_us(lambda: layer(batch.x_mixed), repeats, batch.make_last_pending)
    result["deciding"] = {"base_us": base, "op_us": deciding - base}
    decided = median_us(lambda: layer(batch.x_mixed), repeats)
    result["prefill_rows_decided"] = {"base_us": base, "op_us": decided - base}
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--dim", type=int, default=1024, help="intermediate size")
    parser.add_argument("--top-k", type=int, default=384)
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--rows", type=int, default=32, help="requests in the batch")
    parser.add_argument("--routed", default="0,8,32", help="comma list: routed rows among them")
    parser.add_argument("--prompt-tokens", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--routing-span", choices=["prompt", "last_user_message"], default="prompt")
    parser.add_argument("--label", default="")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    layer = build_layer(args.hidden, args.dim, args.top_k, args.edits)
    span = None
    if args.routing_span != "prompt":
        from vllm_memoir.core.route_span import RouteSpan

        span = RouteSpan(args.routing_span, USER_START, MESSAGE_END)
        layer.step.serve_span_rule(whole_prompt=False)
    rows = []
    for routed in (int(r) for r in args.routed.split(",")):
        batch = Batch(args.rows, routed, args.prompt_tokens, args.dim, span)
        row = {"routed_rows": routed, **measure(layer, batch, args.repeats)}
        rows.append(row)
        print(f"{routed:3d} of {args.rows} rows routed: decode op {row['decode']['op_us']:6.0f} us "
              f"(base {row['decode']['base_us']:.0f}); deciding step op {row['deciding']['op_us']:6.0f} us; "
              f"after it {row['prefill_rows_decided']['op_us']:6.0f} us (base {row['deciding']['base_us']:.0f})")
    if args.json:
        report = {"label": args.label, "command": "routing_step.py " + " ".join(argv or sys.argv[1:]),
                  "shape": {"hidden": args.hidden, "intermediate": args.dim, "top_k": args.top_k, "edits": args.edits,
                            "rows": args.rows, "prompt_tokens": args.prompt_tokens, "block_size": BLOCK,
                            "routing_span": args.routing_span},
                  "torch_threads": 1, "results": rows}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
