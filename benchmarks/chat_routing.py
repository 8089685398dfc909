"""Do edits fire through chat templates? Routing and Rel/Gen/Loc per endpoint shape and routing span.

A small chat model is built and trained here: a tiny BPE Llama with a Llama-3-style template
(edit_tools/chat_models.py) taught the facts world's questions (data/facts edit set: each edit's
question and paraphrase with the true answer, each unrelated question with its answer), raw
and under the template, with and without system prompts and earlier turns. Then MEMOIR edits
the facts four ways (the edit prompts raw or wrapped in the template with `use_chat_template`,
times `routing_span` prompt or last_user_message) and every artifact is queried the ways a
server receives questions:

  raw     /v1/completions with the bare question
  chat    /v1/chat/completions, the question as the only message
  short   the same after a one-line system prompt
  long    the same after a ~200-token system prompt
  turn2   the question as the second user turn, after another edited fact's question and
          (new) answer

Per cell: own = share of edit prompts routed to their own edit, wrong = routed to another
edit, gen_own = paraphrases routed to their own edit, loc_routed = unrelated questions routed
to any edit; Rel / Gen = teacher-forced token accuracy of the new target after the edit prompt /
paraphrase; Loc = share of unrelated answers' tokens whose argmax is unchanged by the edits;
base = the unedited model's token accuracy on the unrelated answers (how well the model
answers in that shape at all). Everything runs on the transformers reference, which the
served model matches token for token (tests/test_chat_routing_server.py).

    python benchmarks/chat_routing.py                    # ~5-10 min on 2 shared cores
    python benchmarks/chat_routing.py --edits 20 --epochs 20 --out /tmp/try

Writes <out>/chat_routing.json and <out>/chat_routing.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path
from statistics import mean

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))  # report_paths, when run as a script

from edit_tools.chat_markers import route_span_for  # noqa: E402
from edit_tools.chat_models import (LONG_SYSTEM_PROMPT, SHORT_SYSTEM_PROMPT, build_chat_llama,  # noqa: E402
                                    messages, train_chat_model)
from edit_tools.datasets import EditRequest  # noqa: E402
from edit_tools.editor import run_edit_job  # noqa: E402
from edit_tools.facts.edit_sets import question_prompt  # noqa: E402
from edit_tools.facts.world import generate_world  # noqa: E402
from edit_tools.hf_model import MemoirHFModel  # noqa: E402
from edit_tools.hparams import MemoirHyperParams  # noqa: E402
from report_paths import command_line, repo_relative  # noqa: E402

log = logging.getLogger("chat_routing")

DEFAULT_DATA = REPO / "data" / "facts" / "zsre-facts-T100.json"
QUERY_MODES = ("raw", "chat", "short", "long", "turn2")
SPANS = ("prompt", "last_user_message")
SWEEP = (0.6, 0.65, 0.7, 0.75, 0.8, 0.85)


def load_records(path: Path, count: int) -> list[dict]:
    records = json.loads(path.read_text())[:count]
    if len(records) < count:
        raise SystemExit(f"--data {path}: {len(records)} records, --edits asks for {count}")
    return records


def model_settings(args, records: list[dict]) -> dict:
    return {"edits": len(records), "data": repo_relative(args.data), "epochs": args.epochs, "seed": args.seed,
            "layers": 4, "hidden": 128, "intermediate": 1024, "threads": args.threads, "target_pairs": True}


def chat_model(args, records: list[dict]) -> tuple[Path, dict]:
    """The trained chat model in --model-dir, built (or rebuilt when its settings changed)."""
    settings = model_settings(args, records)
    stamp = args.model_dir / "chat_model.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("settings") == settings:
        log.info("reusing the chat model in %s", args.model_dir)
        return args.model_dir, json.loads(stamp.read_text())
    if args.model_dir.exists():
        shutil.rmtree(args.model_dir)
    texts = [r[k] for r in json.loads(args.data.read_text()) for k in ("src", "rephrase", "loc", "alt", "loc_ans")]
    build_chat_llama(args.model_dir, texts, num_layers=4, hidden_size=128, intermediate_size=1024, seed=args.seed,
                     init_std=0.02)
    pairs = [(r["src"], r["pred"]) for r in records] + [(r["rephrase"], r["pred"]) for r in records] + \
            [(r["loc"], r["loc_ans"]) for r in records] + target_pairs(records, args.seed)
    training = train_chat_model(args.model_dir, pairs, epochs=args.epochs, seed=args.seed)
    report = {"settings": settings, "training": training}
    stamp.write_text(json.dumps(report, indent=2) + "\n")
    return args.model_dir, report


def target_pairs(records: list[dict], seed: int) -> list[tuple[str, str]]:
    """For each edit's new target, another subject's fact with that answer.

    A token the model never produced as an answer keeps a near-initial output embedding, and
    no residual at the last layer can make it the argmax (measured: the edit loss stalls at
    ~3.5); an instruct model knows its answer words.
    """
    rng = random.Random(seed)
    world = generate_world()
    asked = [r["src"] for r in records] + [r["loc"] for r in records]
    by_answer: dict[str, list] = {}
    for fact in world.facts:
        if not any(question.startswith(fact.subject + " ") for question in asked):  # subjects come first
            by_answer.setdefault(fact.answer, []).append(fact)
    pairs = []
    for record in records:
        facts = by_answer.get(record["alt"])
        if facts:
            fact = rng.choice(facts)
            pairs.append((question_prompt(fact, rng), fact.answer))
    return pairs


def encode(hf: MemoirHFModel, mode: str, question: str, target: str, earlier: tuple[str, str]) -> tuple[list[int], list[int]]:
    """(prompt ids, target ids) of `question` asked in `mode`, as the server would tokenize it."""
    tokenizer = hf.tokenizer
    if mode == "raw":
        prompt = tokenizer(question)["input_ids"]
        full = tokenizer(f"{question} {target}")["input_ids"]
    else:
        system = {"short": SHORT_SYSTEM_PROMPT, "long": LONG_SYSTEM_PROMPT}.get(mode)
        text = hf.chat_text(messages(question, system, [earlier] if mode == "turn2" else []))
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        full = tokenizer(text + target, add_special_tokens=False)["input_ids"]
    if full[:len(prompt)] != prompt or len(full) == len(prompt):
        raise ValueError(f"cannot split {question!r} + {target!r} in mode {mode}")
    return prompt, full[len(prompt):]


def agreement(before, after) -> float:
    return mean(sum(a == b for a, b in zip(x.predicted_ids, y.predicted_ids)) / len(x.predicted_ids)
                for x, y in zip(before, after))


def score_mode(hf: MemoirHFModel, records: list[dict], mode: str, base_loc) -> dict:
    """One cell of the table: routing and Rel/Gen/Loc of every record asked in `mode`."""
    n = len(records)
    earlier = [(records[i - 1]["src"], records[i - 1]["alt"]) for i in range(n)]  # the previous edit, as turn 1
    rel = [encode(hf, mode, r["src"], r["alt"], e) for r, e in zip(records, earlier)]
    gen = [encode(hf, mode, r["rephrase"], r["alt"], e) for r, e in zip(records, earlier)]
    loc = [encode(hf, mode, r["loc"], r["loc_ans"], e) for r, e in zip(records, earlier)]
    routes = {kind: hf.route_ids([p for p, _ in rows]) for kind, rows in (("rel", rel), ("gen", gen), ("loc", loc))}
    rel_rows, gen_rows, loc_rows = hf.score_ids(rel), hf.score_ids(gen), hf.score_ids(loc)
    own = [d.route == i for i, d in enumerate(routes["rel"])]
    return {
        "own": mean(own),
        "wrong": mean(d.routed and d.route != i for i, d in enumerate(routes["rel"])),
        "gen_own": mean(d.route == i for i, d in enumerate(routes["gen"])),
        "loc_routed": mean(d.routed for d in routes["loc"]),
        "rel": mean(r.accuracy for r in rel_rows),
        "gen": mean(r.accuracy for r in gen_rows),
        "loc": agreement(base_loc, loc_rows),
        "base": mean(r.accuracy for r in base_loc),
        "prompt_tokens": round(mean(len(p) for p, _ in rel), 1),
        # (best edit, overlap) per query, for the threshold sweep
        "overlaps": {kind: [[d.best_edit, round(d.overlap, 5)] for d in decisions] for kind, decisions in routes.items()},
    }


def base_scores(hf: MemoirHFModel, records: list[dict], mode: str):
    earlier = [(records[i - 1]["src"], records[i - 1]["alt"]) for i in range(len(records))]
    with hf.routing_off():
        return hf.score_ids([encode(hf, mode, r["loc"], r["loc_ans"], e) for r, e in zip(records, earlier)])


def sweep(cell: dict, n: int) -> list[dict]:
    """own / gen_own / loc_routed at other thresholds (best edits do not depend on the threshold)."""
    out = []
    for threshold in SWEEP:
        def rate(kind, own_only):
            hits = [(best == i or not own_only) and overlap >= threshold
                    for i, (best, overlap) in enumerate(cell["overlaps"][kind])]
            return round(sum(hits) / n, 3)
        out.append({"threshold": threshold, "own": rate("rel", True), "gen_own": rate("gen", True),
                    "loc_routed": rate("loc", False)})
    return out


def markdown(result: dict) -> str:
    hp = result["memoir"]
    lines = [
        "# Chat routing: edits through chat templates",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Model: tiny BPE Llama with a Llama-3-style chat template (4 layers, hidden 128, intermediate 1024), "
        f"trained {result['chat_model']['settings']['epochs']} epochs on the facts world's {result['edits']} edited "
        f"questions, their paraphrases, {result['edits']} unrelated questions and one question per new target (raw and "
        f"templated, with and without system prompts and earlier turns; final answer loss "
        f"{result['chat_model']['training']['final_loss']}). "
        f"{result['edits']} MEMOIR edits of `{hp['inner_params'][0]}` (the last layer), top_k {hp['top_k']}, irr_threshold "
        f"{hp['irr_threshold']}, {hp['prompt_feature_agg']}, edit_lr {hp['edit_lr']}, n_iter {hp['n_iter']}. "
        f"Machine: {result['machine']}, {result['threads']} torch thread(s); {result['seconds']:.0f} s in all.",
        "",
        "Queries: raw = /v1/completions with the bare question; chat = /v1/chat/completions, one user message; "
        "short / long = after a system prompt of "
        f"{result['system_prompt_tokens']['short']} / {result['system_prompt_tokens']['long']} tokens; turn2 = the "
        "second user turn, after another edited fact's question and new answer. own / wrong: edit prompts routed to "
        "their own / another edit; gen_own: paraphrases routed to their own edit; loc_routed: unrelated questions "
        "routed to any edit; Rel / Gen / Loc as in `memoir evaluate`; base: the unedited model's accuracy on the "
        "unrelated answers in that query shape.",
        "",
        "| edits made on | routing_span | query | prompt tokens | own | wrong | gen_own | loc_routed | Rel | Gen | Loc | base |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        lines.append(f"| {row['edits_made_on']} | {row['routing_span']} | {row['query']} | {row['prompt_tokens']} | "
                     f"{row['own']:.2f} | {row['wrong']:.2f} | {row['gen_own']:.2f} | {row['loc_routed']:.2f} | "
                     f"{row['rel']:.2f} | {row['gen']:.2f} | {row['loc']:.2f} | {row['base']:.2f} |")
    lines += ["", "Threshold sweep (routing only; best edit and overlap do not depend on the threshold): "
              "own / loc_routed at each irr_threshold.", "",
              "| edits made on | routing_span | query | " + " | ".join(f"{t}" for t in SWEEP) + " |",
              "|---|---|---|" + "---|" * len(SWEEP)]
    for row in result["rows"]:
        cells = " | ".join(f"{s['own']:.2f} / {s['loc_routed']:.2f}" for s in row["sweep"])
        lines.append(f"| {row['edits_made_on']} | {row['routing_span']} | {row['query']} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="facts edit set (ZsRE format with pred)")
    parser.add_argument("--edits", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=40, help="chat model training epochs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-k", type=int, default=384)
    parser.add_argument("--threshold", type=float, default=0.75)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model-dir", type=Path, default=REPO / "runs" / "chat-routing" / "model",
                        help="the trained chat model (reused when its settings match)")
    parser.add_argument("--work", type=Path, default=REPO / "runs" / "chat-routing", help="artifacts")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    records = load_records(args.data, args.edits)
    model_dir, model_report = chat_model(args, records)
    requests = [EditRequest(prompt=r["src"], target=r["alt"], rephrase=r["rephrase"], loc=r["loc"],
                            loc_ans=r["loc_ans"]) for r in records]
    rows, hp = [], None
    base_cache: dict[str, list] = {}
    for edits_made_on in ("raw prompts", "chat template"):
        for span in SPANS:
            hp = MemoirHyperParams(inner_params=["model.layers[3].mlp.down_proj.weight"], top_k=args.top_k,
                                   irr_threshold=args.threshold, prompt_feature_agg="mean_decentered", edit_lr=10.0,
                                   n_iter=30, weight_decay=0.0, use_chat_template=edits_made_on == "chat template",
                                   routing_span=span, seed=args.seed).validate()
            work = args.work / f"{'chat' if hp.use_chat_template else 'raw'}-{span}"
            if work.exists():
                shutil.rmtree(work)
            t0 = time.perf_counter()
            run_edit_job(model_dir, requests, hp, work, progress=False)
            edit_seconds = time.perf_counter() - t0
            hf = MemoirHFModel.from_pretrained(model_dir, artifact=work)
            assert hf.route_span == route_span_for(span, hf.tokenizer)
            for mode in QUERY_MODES:
                if mode not in base_cache:
                    base_cache[mode] = base_scores(hf, records, mode)
                cell = score_mode(hf, records, mode, base_cache[mode])
                cell["sweep"] = sweep(cell, len(records))
                rows.append({"edits_made_on": edits_made_on, "routing_span": span, "query": mode,
                             "edit_seconds": round(edit_seconds, 1), **cell})
                log.info("%s / %s / %s: own %.2f wrong %.2f loc_routed %.2f Rel %.2f Gen %.2f Loc %.2f",
                         edits_made_on, span, mode, cell["own"], cell["wrong"], cell["loc_routed"], cell["rel"],
                         cell["gen"], cell["loc"])
    tokenizer = hf.tokenizer
    system_tokens = {name: len(tokenizer(text, add_special_tokens=False)["input_ids"])
                     for name, text in (("short", SHORT_SYSTEM_PROMPT), ("long", LONG_SYSTEM_PROMPT))}
    result = {
        "command": command_line("python benchmarks/chat_routing.py", sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible, "
                   f"Python {platform.python_version()}, torch {torch.__version__}",
        "threads": args.threads,
        "edits": len(records),
        "data": repo_relative(args.data),
        "chat_model": model_report,
        "memoir": {k: v for k, v in hp.to_dict().items() if k not in ("use_chat_template", "routing_span")},
        "system_prompt_tokens": system_tokens,
        "seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "chat_routing.json").write_text(json.dumps(result, indent=1) + "\n")
    (args.out / "chat_routing.md").write_text(markdown(result))
    print(markdown(result))
    log.info("wrote %s and %s", args.out / "chat_routing.json", args.out / "chat_routing.md")


if __name__ == "__main__":
    main()
