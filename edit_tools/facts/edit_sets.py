"""Edit sets in ZsRE (MEND) format drawn from the facts world.

    python -m edit_tools.facts.edit_sets --out data/facts [--model models/facts-llama]

Each record edits one fact of a different subject: `src` is a trained question, `rephrase`
the fact's held-out phrasing, `alt` another valid value of the relation. `loc` asks about a
subject that no record edits. With --model, `pred` is the model's greedy answer and locality
facts are taken from those the model answers correctly; without it, `pred` is the true value.
Files hold the first T records of one shuffled list, so T10 is a prefix of T1000.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from edit_tools.facts.world import DEFAULT_SEED, Fact, World, generate_world

log = logging.getLogger(__name__)

SIZES = (1, 10, 100, 1000)


def question_prompt(fact: Fact, rng: random.Random) -> str:
    """A trained, subject-first question phrasing of the fact (the answer follows after a space).

    Subject-first, like the held-out rephrase: those are the phrasings whose masks are about
    the subject (benchmarks/mask_overlap.py).
    """
    questions = [i for i in fact.training_templates() if fact.is_question(i) and fact.is_subject_first(i)]
    return fact.prompt(rng.choice(questions))


def build_records(world: World, count: int, seed: int, model_answers=None) -> list[dict]:
    """`count` edits on distinct subjects; locality facts from the subjects left over.

    model_answers: optional callable prompts -> greedy answers, to fill `pred` and to keep
    only locality facts the model gets right.
    """
    rng = random.Random(seed)
    subjects = list(world.subjects)
    rng.shuffle(subjects)
    if count >= len(subjects):
        raise ValueError(f"{count} edits need more than {len(subjects)} subjects (some are kept for locality)")
    edited, spare = subjects[:count], subjects[count:]
    by_subject: dict[str, list[Fact]] = {}
    for fact in world.facts:
        by_subject.setdefault(fact.subject, []).append(fact)

    edits = [rng.choice(by_subject[subject]) for subject in edited]
    src = [question_prompt(fact, rng) for fact in edits]
    loc_facts = [fact for subject in spare for fact in by_subject[subject]]
    loc = [question_prompt(fact, rng) for fact in loc_facts]
    if model_answers is not None:
        predicted = model_answers(src)
        known = [a == f.answer for a, f in zip(model_answers(loc), loc_facts)]
        loc_facts = [f for f, ok in zip(loc_facts, known) if ok]
        loc = [p for p, ok in zip(loc, known) if ok]
        log.info("%d of %d locality facts are answered correctly; using those", len(loc), len(known))
    else:
        predicted = [fact.answer for fact in edits]

    records = []
    for index, (fact, prompt, pred) in enumerate(zip(edits, src, predicted)):
        choices = [v for v in world.values[fact.relation] if v not in (fact.answer, pred)]
        alt = rng.choice(choices)
        loc_index = index % len(loc)  # loc prompts cycle when there are fewer than edits
        records.append({
            "subject": fact.subject,
            "src": prompt,
            "rephrase": fact.prompt(fact.heldout_template),
            "alt": alt,
            "pred": pred,
            "answers": [fact.answer],
            "loc": loc[loc_index],
            "loc_ans": loc_facts[loc_index].answer,
            "cond": f"{pred} >> {alt} || {prompt}",
            "relation": fact.relation,
        })
    return records


def write_sets(records: list[dict], out: Path, sizes=SIZES) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for size in sizes:
        path = out / f"zsre-facts-T{size}.json"
        path.write_text(json.dumps(records[:size], indent=1) + "\n")
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for zsre-facts-T{1,10,100,1000}.json")
    parser.add_argument("--model", type=Path, help="facts model directory: fills `pred` with its answers")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="world seed (as used to train the model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    world = generate_world(args.seed)
    model_answers = None
    if args.model is not None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edit_tools.facts.answers import greedy_answers

        torch.set_num_threads(2)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model_answers = lambda prompts: greedy_answers(model, tokenizer, prompts)  # noqa: E731
    records = build_records(world, max(SIZES), seed=args.seed + 1, model_answers=model_answers)
    for path in write_sets(records, args.out):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
