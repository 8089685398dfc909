"""The shipped facts model, its world and its edit sets (fast: one small model, no vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edit_tools.facts.answers import answer_accuracy
from edit_tools.facts.train import sample_prompts
from edit_tools.facts.designs import world_of

REPO = Path(__file__).resolve().parents[1]
# The shipped facts models: (checkpoint, its edit sets, the edit-set sizes, checkpoint size bound).
SHIPPED = {
    "facts-llama": (REPO / "models" / "facts-llama", REPO / "data" / "facts", (1, 10, 100, 1000), 30 * 2**20),
    "facts-broad": (REPO / "models" / "facts-broad", REPO / "data" / "facts" / "broad", (1, 10, 100, 1000, 10000),
                    40 * 2**20),
}
MODEL_DIR, EDIT_DIR = SHIPPED["facts-llama"][:2]


@pytest.fixture(scope="module", params=sorted(SHIPPED))
def shipped(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def report(shipped) -> dict:
    return json.loads((SHIPPED[shipped][0] / "facts_model.json").read_text())


def _world_of(report: dict, seed_offset: int = 0):
    settings = report["settings"]
    return world_of(settings["seed"] + seed_offset, settings.get("design", "classic"))


@pytest.fixture(scope="module")
def world(report):
    return _world_of(report)


@pytest.fixture(scope="module")
def model_and_tokenizer(shipped):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(SHIPPED[shipped][0])
    model = AutoModelForCausalLM.from_pretrained(SHIPPED[shipped][0], dtype=torch.float32).eval()
    return model, tokenizer


def test_world_is_deterministic_and_matches_the_shipped_one(shipped, world, report):
    again = _world_of(report)
    assert again.facts == world.facts and again.subjects == world.subjects
    assert json.loads((SHIPPED[shipped][0] / "world.json").read_text()) == json.loads(json.dumps(world.to_json()))
    assert _world_of(report, seed_offset=1).facts != world.facts
    assert len(world.facts) >= 1500
    assert len(set(world.subjects)) == len(world.subjects)


def test_the_broad_world_has_what_routing_needs():
    """Issue 13 part 2: >= 15 phrasings per relation, questions and statements, the subject first
    and last, and enough people for 10,000 edits on distinct subjects plus locality prompts."""
    world = world_of(11, "broad")
    assert len(world.values) >= 6 and len(world.subjects) >= 10500
    for relation in world.design.relations:
        kinds = {(t.is_question, t.subject_first) for t in relation.templates}
        assert len(relation.templates) >= 15 and kinds == {(True, True), (True, False), (False, True), (False, False)}
        assert len({t.text.split()[1] for t in relation.templates if t.subject_first}) >= 5, "other words, not only order"
    with pytest.raises(ValueError, match="unknown world design 'wide'"):
        world_of(11, "wide")


def test_tokenizer_covers_every_prompt_and_adds_bos(world, model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    for fact in world.facts[:50]:
        for template in range(len(world.relation(fact.relation).templates)):
            ids = tokenizer(f"{fact.prompt(template)} {fact.answer}").input_ids
            assert ids[0] == tokenizer.bos_token_id
            assert tokenizer.unk_token_id not in ids
        assert len(tokenizer(fact.answer, add_special_tokens=False).input_ids) == 1, "answers are one token"
    text = f"what is the home city of {world.subjects[0]} ?"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True).split() == text.replace(" ?", "?").split()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert tokenizer(chat, add_special_tokens=False).input_ids == tokenizer(text).input_ids


@pytest.mark.parametrize("heldout, bar", [(False, 0.95), (True, 0.85)])
def test_model_knows_the_facts(world, model_and_tokenizer, heldout, bar):
    model, tokenizer = model_and_tokenizer
    prompts, answers = sample_prompts(world, heldout=heldout, count=300, seed=7)
    assert answer_accuracy(model, tokenizer, prompts, answers) >= bar


def test_checkpoint_is_small(shipped):
    model_dir, _, _, bound = SHIPPED[shipped]
    assert sum(path.stat().st_size for path in model_dir.iterdir()) < bound


def test_edit_sets_are_valid(shipped, world):
    _, edit_dir, sizes, _ = SHIPPED[shipped]
    largest = json.loads((edit_dir / f"zsre-facts-T{max(sizes)}.json").read_text())
    for size in sizes:
        records = json.loads((edit_dir / f"zsre-facts-T{size}.json").read_text())
        assert len(records) == size and records == largest[:size]
    assert len({r["subject"] for r in largest}) == len(largest), "each edit must be on a different subject"
    _check_records(world, largest[:1000], {r["subject"] for r in largest})


def _check_records(world, records: list[dict], edited: set[str]) -> None:
    truth = {(f.subject, f.relation): f for f in world.facts}
    values, subjects = world.values, set(world.subjects)
    # `pred` is the model's own answer: the true one wherever the model knows the fact.
    assert sum(r["pred"] == r["answers"][0] for r in records) >= 0.9 * len(records)
    for r in records:
        for field in ("subject", "src", "rephrase", "alt", "pred", "answers", "loc", "loc_ans", "cond"):
            assert r.get(field), f"record on {r.get('subject')} lacks {field}"
        assert r["subject"] in r["src"] and r["subject"] in r["rephrase"]
        assert r["src"] != r["rephrase"] and r["src"].endswith(" ?")
        fact = truth[(r["subject"], r["relation"])]
        assert r["answers"] == [fact.answer] and r["pred"] in values[r["relation"]]
        assert r["src"] in [fact.prompt(t) for t in fact.training_templates()], "src must be a trained phrasing"
        assert r["rephrase"] == fact.prompt(fact.heldout_template), "rephrase must be the held-out phrasing"
        assert r["alt"] in values[r["relation"]] and r["alt"] not in (r["answers"][0], r["pred"])
        loc_subject = " ".join(r["loc"].split()[:3])  # loc prompts put the three-word name first
        assert r["loc"].startswith(loc_subject + " ") and loc_subject not in edited, "loc prompts must be about unedited subjects"
        assert loc_subject in subjects


def test_edit_sets_load_with_the_project_reader():
    from edit_tools.datasets import load_edit_dataset

    requests = load_edit_dataset(EDIT_DIR / "zsre-facts-T100.json")
    assert len(requests) == 100 and requests[0].rephrase and requests[0].loc
