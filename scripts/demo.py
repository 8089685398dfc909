"""The main job: edit the embedded facts model, serve it with vLLM + MEMOIR, ask through `openai`.

    python scripts/demo.py [--edits 6] [--workdir runs/demo]

1. applies the first N edits of data/facts/zsre-facts-T10.json with the edit tools
   (resumed, not redone, when the artifact already holds them);
2. starts `vllm serve` twice, concurrently: the base model, and the same model with the
   MEMOIR plugin and the artifact;
3. asks both servers, through the unchanged `openai` client, each edited question, its
   held-out paraphrase and an unrelated question, and prints the answers side by side;
4. stops the servers. Exits 1 when an edited question is not answered with its new target.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from vllm_memoir.server_process import VllmServer, start_all
from vllm_memoir.engine_requirements import hf_overrides_args

REPO = Path(__file__).resolve().parents[1]
# vLLM's defaults otherwise (prefix caching, chunked prefill): the facts config edits the last layer.
SERVE_ARGS = ["--dtype", "float32", "--max-model-len", "64", "--enforce-eager"]


def edit(args) -> list[dict]:
    from edit_tools.editor import run_edit_job
    from edit_tools.hparams import MemoirHyperParams

    records = json.loads(Path(args.data).read_text())[: args.edits]
    hp = MemoirHyperParams.from_yaml(args.hparams)
    artifact = run_edit_job(args.model, args.data, hp, args.workdir / "artifact", limit=args.edits, progress=True)
    print(f"artifact {args.workdir / 'artifact'}: {artifact.manifest.num_edits} edits at {artifact.manifest.module_path}")
    return records


def answer(client, prompt: str) -> str:
    response = client.completions.create(model=client.served_model, prompt=prompt, max_tokens=3, temperature=0.0)
    return response.choices[0].text.strip()


def connect(server: VllmServer):
    client = server.client()
    client.served_model = client.models.list().data[0].id
    return client


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(REPO / "models" / "facts-llama"))
    parser.add_argument("--data", default=str(REPO / "data" / "facts" / "zsre-facts-T10.json"))
    parser.add_argument("--hparams", default=str(REPO / "configs" / "facts-llama.yaml"))
    parser.add_argument("--edits", type=int, default=6)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "demo")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    records = edit(args)
    logs = args.workdir / "logs"
    base = VllmServer(args.model, SERVE_ARGS, logs / "base.log")
    memoir = VllmServer(args.model, [*SERVE_ARGS, *hf_overrides_args(args.workdir / "artifact")], logs / "memoir.log")
    print("starting vllm serve (base model) and vllm serve + MEMOIR, logs in", logs)
    try:
        start_all([base, memoir])
        print(f"servers up: base {base.startup_seconds:.0f} s, memoir {memoir.startup_seconds:.0f} s")
        clients = {"base": connect(base), "memoir": connect(memoir)}
        questions = []
        for r in records:
            questions += [("edited", r["src"], r["alt"], r["pred"]), ("paraphrase", r["rephrase"], r["alt"], r["pred"]),
                          ("unrelated", r["loc"], r["loc_ans"], r["loc_ans"])]
        with ThreadPoolExecutor(16) as pool:
            answers = {name: list(pool.map(lambda q, c=client: answer(c, q[1]), questions))
                       for name, client in clients.items()}
    finally:
        base.stop()
        memoir.stop()

    width = max(len(q[1]) for q in questions)
    print(f"\n{'kind':<11} {'question':<{width}}  {'before':<12} {'after':<12} expected")
    hits = {"edited": 0, "paraphrase": 0, "unrelated": 0}
    for (kind, question, new, old), before, after in zip(questions, answers["base"], answers["memoir"]):
        ok = after.split()[:1] == new.split()[:1] if kind != "unrelated" else after == before
        hits[kind] += ok
        expected = new if kind != "unrelated" else "unchanged"
        print(f"{kind:<11} {question:<{width}}  {before:<12} {after:<12} {expected} {'ok' if ok else 'MISS'}")
    n = len(records)
    print(f"\nedited questions answered with the new fact: {hits['edited']}/{n}; paraphrases: {hits['paraphrase']}/{n}; "
          f"unrelated questions unchanged: {hits['unrelated']}/{n}")
    return 0 if hits["edited"] == n else 1


if __name__ == "__main__":
    sys.exit(main())
