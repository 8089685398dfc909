"""The shipped facts model, its world and its edit sets (fast: one small model, no vLLM)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edit_tools.facts.answers import answer_accuracy
from edit_tools.facts.train import sample_prompts
from edit_tools.facts.world import generate_world

REPO = Path(__file__).resolve().parents[1]
MODEL_DIR = REPO / "models" / "facts-llama"
EDIT_DIR = REPO / "data" / "facts"


@pytest.fixture(scope="module")
def report() -> dict:
    return json.loads((MODEL_DIR / "facts_model.json").read_text())


@pytest.fixture(scope="module")
def world(report):
    return generate_world(report["settings"]["seed"])


@pytest.fixture(scope="module")
def model_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()
    return model, tokenizer


def test_world_is_deterministic_and_matches_the_shipped_one(world, report):
    again = generate_world(report["settings"]["seed"])
    assert again.facts == world.facts and again.subjects == world.subjects
    assert json.loads((MODEL_DIR / "world.json").read_text()) == json.loads(json.dumps(world.to_json()))
    assert generate_world(report["settings"]["seed"] + 1).facts != world.facts
    assert len(world.facts) >= 1500
    assert len(set(world.subjects)) == len(world.subjects)


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


def test_checkpoint_is_small():
    size = sum(path.stat().st_size for path in MODEL_DIR.iterdir())
    assert size < 30 * 2**20


@pytest.mark.parametrize("size", [1, 10, 100, 1000])
def test_edit_sets_are_valid(world, size):
    records = json.loads((EDIT_DIR / f"zsre-facts-T{size}.json").read_text())
    assert len(records) == size
    assert records == json.loads((EDIT_DIR / "zsre-facts-T1000.json").read_text())[:size]
    truth = {(f.subject, f.relation): f for f in world.facts}
    values = world.values
    edited = {r["subject"] for r in records}
    assert len(edited) == size, "each edit must be on a different subject"
    for r in records:
        for field in ("subject", "src", "rephrase", "alt", "pred", "answers", "loc", "loc_ans", "cond"):
            assert r.get(field), f"record on {r.get('subject')} lacks {field}"
        assert r["subject"] in r["src"] and r["subject"] in r["rephrase"]
        assert r["src"] != r["rephrase"] and r["src"].endswith(" ?")
        fact = truth[(r["subject"], r["relation"])]
        assert r["answers"] == [fact.answer] == [r["pred"]]
        assert r["src"] in [fact.prompt(t) for t in fact.training_templates()], "src must be a trained phrasing"
        assert r["rephrase"] == fact.prompt(fact.heldout_template), "rephrase must be the held-out phrasing"
        assert r["alt"] in values[r["relation"]] and r["alt"] not in (r["answers"][0], r["pred"])
        assert not any(subject in r["loc"] for subject in edited), "loc prompts must be about unedited subjects"


def test_edit_sets_load_with_the_project_reader():
    from edit_tools.datasets import load_edit_dataset

    requests = load_edit_dataset(EDIT_DIR / "zsre-facts-T100.json")
    assert len(requests) == 100 and requests[0].rephrase and requests[0].loc
