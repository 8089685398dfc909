"""Edit sets in ZsRE (MEND) format drawn from the facts world.

    python -m edit_tools.facts.edit_sets --out data/facts [--model models/facts-llama]
    python -m edit_tools.facts.edit_sets --out data/facts/broad --model models/facts-broad --design broad --seed 11

Each record edits one fact of a different subject: `src` is a trained question, `rephrase`
the fact's held-out phrasing, `alt` another valid value of the relation. Two locality prompts,
both about subjects that no record edits:
  - `loc` / `loc_ans`: unrelated, a question of another relation (ZsRE's `loc` is an
    unrelated NQ question; this world has no other kind of text);
  - `loc_neighbour` / `loc_neighbour_ans`: the edit's own question (same relation, same
    template) about another subject, which must keep its own answer.
With --model, `pred` is the model's greedy answer and locality prompts are taken from those the
model answers correctly; without it, `pred` is the true value. Files hold the first T records
of one shuffled list, so T10 is a prefix of T1000 (and of T10000 for the broad design). The random draws of the edits themselves
(subject, src, rephrase, alt) are those of the earlier sets, whose `loc` was any question about
a spare subject: only the locality fields changed.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

from edit_tools.facts.designs import DESIGNS, world_of
from edit_tools.facts.world import CLASSIC, DEFAULT_SEED, Fact, World

log = logging.getLogger(__name__)

SIZES = CLASSIC.edit_set_sizes


def question_template(fact: Fact, rng: random.Random) -> int:
    """A trained, subject-first question phrasing of the fact (the answer follows after a space).

    Subject-first, like the held-out rephrase: those are the phrasings whose masks are about
    the subject (benchmarks/mask_overlap.py).
    """
    questions = [i for i in fact.training_templates() if fact.is_question(i) and fact.is_subject_first(i)]
    return rng.choice(questions)


def question_prompt(fact: Fact, rng: random.Random) -> str:
    return fact.prompt(question_template(fact, rng))


def _cycle_pick(candidates: list[int], cursor: dict, key) -> int:
    """The next of `candidates` (indices) in turn for `key`, so locality prompts spread evenly."""
    position = cursor.get(key, 0)
    cursor[key] = position + 1
    return candidates[position % len(candidates)]


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
    src_templates = [question_template(fact, rng) for fact in edits]
    src = [fact.prompt(t) for fact, t in zip(edits, src_templates)]
    loc_facts = [fact for subject in spare for fact in by_subject[subject]]
    loc = [question_prompt(fact, rng) for fact in loc_facts]
    # Neighbours: every spare fact under every template of its relation (a few thousand prompts).
    neighbour_keys = sorted({(f.relation, t) for f, t in zip(edits, src_templates)})
    neighbours = {key: [f for f in loc_facts if f.relation == key[0]] for key in neighbour_keys}
    if model_answers is not None:
        predicted = model_answers(src)
        known = [a == f.answer for a, f in zip(model_answers(loc), loc_facts)]
        loc_facts = [f for f, ok in zip(loc_facts, known) if ok]
        loc = [p for p, ok in zip(loc, known) if ok]
        log.info("%d of %d locality facts are answered correctly; using those", len(loc), len(known))
        for (relation, template), facts in neighbours.items():
            answers = model_answers([f.prompt(template) for f in facts])
            neighbours[(relation, template)] = [f for f, a in zip(facts, answers) if a == f.answer]
    else:
        predicted = [fact.answer for fact in edits]

    cursor: dict = {}
    records = []
    for fact, template, prompt, pred in zip(edits, src_templates, src, predicted):
        choices = [v for v in world.values[fact.relation] if v not in (fact.answer, pred)]
        alt = rng.choice(choices)
        unrelated = [i for i, f in enumerate(loc_facts) if f.relation != fact.relation]
        loc_index = _cycle_pick(unrelated, cursor, "unrelated")
        same_question = neighbours[(fact.relation, template)]
        if not same_question:
            raise ValueError(f"no spare subject answers {fact.relation!r} template {template} correctly: no neighbour for {prompt!r}")
        neighbour = same_question[_cycle_pick(list(range(len(same_question))), cursor, (fact.relation, template))]
        records.append({
            "subject": fact.subject,
            "src": prompt,
            "rephrase": fact.prompt(fact.heldout_template),
            "alt": alt,
            "pred": pred,
            "answers": [fact.answer],
            "loc": loc[loc_index],
            "loc_ans": loc_facts[loc_index].answer,
            "loc_neighbour": neighbour.prompt(template),
            "loc_neighbour_ans": neighbour.answer,
            "cond": f"{pred} >> {alt} || {prompt}",
            "relation": fact.relation,
        })
    return records


EDIT_FIELDS = ("subject", "src", "rephrase", "alt", "pred", "answers", "cond", "relation")


def keep_edits(records: list[dict], earlier: list[dict]) -> list[dict]:
    """`records` with the edit fields of `earlier` (an earlier T1000 set of the same world and seed).

    The locality fields do not depend on `pred`, so this regenerates them for the same edits even
    where the current model answers an edit prompt differently from the model that made `earlier`.
    """
    if [r["subject"] for r in records] != [r["subject"] for r in earlier[:len(records)]]:
        raise ValueError("--keep-edits-from: that file edits other subjects (another world seed?)")
    return [{**record, **{key: old[key] for key in EDIT_FIELDS}} for record, old in zip(records, earlier)]


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
    parser.add_argument("--design", default=CLASSIC.name, choices=sorted(DESIGNS),
                        help="world design (as used to train the model)")
    parser.add_argument("--keep-edits-from", type=Path,
                        help="an earlier zsre-facts-T1000.json: keep its edits, regenerate only the locality fields")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")

    world = world_of(args.seed, args.design)
    sizes = world.design.edit_set_sizes
    model_answers = None
    if args.model is not None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from edit_tools.facts.answers import greedy_answers

        torch.set_num_threads(2)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        model_answers = lambda prompts: greedy_answers(model, tokenizer, prompts)  # noqa: E731
    records = build_records(world, max(sizes), seed=args.seed + 1, model_answers=model_answers)
    if args.keep_edits_from is not None:
        records = keep_edits(records, json.loads(args.keep_edits_from.read_text()))
    for path in write_sets(records, args.out, sizes):
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()
