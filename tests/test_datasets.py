"""Edit-dataset loaders: the real reference files, auto-detection, JSONL, and precise errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edit_tools.datasets import DatasetError, EditRequest, detect_kind, load_edit_dataset, load_text_pool

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture
def data_dir() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} is absent")
    return SHARED_DATA


def _raw(path: Path) -> list[dict]:
    return json.loads(path.read_text())


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _write_json(tmp_path: Path, records) -> Path:
    return _write(tmp_path, "data.json", json.dumps(records))


# ---------------------------------------------------------------- real reference files


def test_zsre_real_file(data_dir):
    path = data_dir / "zsre_mend_eval_head.json"
    raw = _raw(path)
    # Four records (54, 103, 1101, 1135) have alt "": an edit with nothing to teach.
    with pytest.raises(DatasetError, match=r"record 54 field 'alt' is empty"):
        load_edit_dataset(path)
    requests = load_edit_dataset(path, skip_invalid=True)
    assert len(requests) == 1196 and all(isinstance(r, EditRequest) for r in requests)
    first = requests[0]
    assert first.prompt == raw[0]["src"] and first.target == raw[0]["alt"]
    assert (first.subject, first.rephrase, first.loc, first.loc_ans) == (
        raw[0]["subject"], raw[0]["rephrase"], raw[0]["loc"], raw[0]["loc_ans"]
    )
    assert first.loc.startswith("nq question:") and first.kind == "zsre"
    # Some alts carry a leading space (record 19: " Clairmont-Mayer"); it is stripped.
    assert raw[19]["alt"] == " Clairmont-Mayer" and requests[19].target == "Clairmont-Mayer"


@pytest.mark.parametrize("name, count", [("hallucination-edit.json", 600), ("hallucination-train.json", 306)])
def test_hallucination_real_files(data_dir, name, count):
    raw = _raw(data_dir / name)
    requests = load_edit_dataset(data_dir / name)
    assert len(requests) == count and {r.kind for r in requests} == {"hallucination"}
    first = requests[0]
    assert first.prompt == raw[0]["prompt"].strip() and first.target == raw[0]["target_new"].strip()
    assert first.loc == raw[0]["locality_prompt"].strip() and first.loc_ans == raw[0]["locality_ground_truth"].strip()
    assert first.subject == raw[0]["subject"] and first.rephrase is None
    # A few locality answers are empty strings: kept as None, not an error (loc is optional).
    blank = [i for i, r in enumerate(raw) if not r["locality_ground_truth"].strip()]
    assert blank and all(requests[i].loc_ans is None for i in blank)


@pytest.mark.parametrize("name", ["temporal-edit.json", "temporal-train.json"])
def test_temporal_real_files(data_dir, name):
    raw = _raw(data_dir / name)
    requests = load_edit_dataset(data_dir / name)
    assert len(requests) == 75 and {r.kind for r in requests} == {"temporal"}
    assert requests[0].prompt == raw[0]["prompt"].strip() and requests[0].target == raw[0]["target_new"].strip()
    assert requests[0].rephrase == raw[0]["ood_rephrase"].strip() and requests[0].loc


def test_detect_kind_real_files(data_dir):
    assert detect_kind(data_dir / "zsre_mend_eval_head.json") == "zsre"
    assert detect_kind(data_dir / "hallucination-train.json") == "hallucination"
    assert detect_kind(data_dir / "temporal-edit.json") == "temporal"


def test_limit_takes_first_records(data_dir):
    path = data_dir / "zsre_mend_eval_head.json"
    requests = load_edit_dataset(path, limit=7)  # record 54's empty alt lies beyond the limit
    assert [r.prompt for r in requests] == [r["src"] for r in _raw(path)[:7]]
    assert load_edit_dataset(path, limit=0) == []
    assert len(load_edit_dataset(data_dir / "temporal-edit.json", limit=1000)) == 75


def test_explicit_kind_must_fit(data_dir):
    assert len(load_edit_dataset(data_dir / "temporal-edit.json", kind="hallucination")) == 75  # a superset
    with pytest.raises(DatasetError, match=r"record 0 field 'src' is missing"):
        load_edit_dataset(data_dir / "temporal-edit.json", kind="zsre")


def test_text_pool_real_file(data_dir):
    # The pool needs no targets, so the ZsRE file's empty alts do not matter here.
    raw = _raw(data_dir / "zsre_mend_eval_head.json")
    pool = load_text_pool(data_dir / "zsre_mend_eval_head.json")
    assert len(pool) == 2 * len(raw) and pool[:2] == [raw[0]["loc"], raw[0]["src"]]
    assert len(load_text_pool(data_dir / "hallucination-train.json", limit=50)) == 50


# ---------------------------------------------------------------- JSONL and auto-detection


def test_jsonl_with_optional_fields(tmp_path):
    path = _write(
        tmp_path, "edits.jsonl",
        '{"prompt": "  The capital of X is ", "target": " Y\\n", "extra": 1}\n'
        "\n"
        '{"prompt": "p", "target": "t", "rephrase": "r", "loc": "l", "loc_ans": "a", "subject": "s"}\n'
        '{"prompt": "q", "target": "u", "rephrase": null, "loc": "   "}\n',
    )
    assert detect_kind(path) == "jsonl"
    first, second, third = load_edit_dataset(path)
    assert first == EditRequest(prompt="The capital of X is", target="Y", kind="jsonl")
    assert second == EditRequest("p", "t", subject="s", rephrase="r", loc="l", loc_ans="a", kind="jsonl")
    assert (third.rephrase, third.loc) == (None, None)


def test_zsre_with_loc_neighbour_and_without(tmp_path):
    # The facts edit sets add loc_neighbour / loc_neighbour_ans to the ZsRE format; files
    # without them (the public ZsRE) read as before.
    with_neighbour = {"src": "a ?", "alt": "b", "loc": "c ?", "loc_ans": "d", "loc_neighbour": "e ?",
                      "loc_neighbour_ans": "f"}
    path = _write_json(tmp_path, [with_neighbour, {"src": "g ?", "alt": "h", "loc": "i ?", "loc_ans": "j"}])
    first, second = load_edit_dataset(path)
    assert (first.loc, first.loc_ans, first.loc_neighbour, first.loc_neighbour_ans) == ("c ?", "d", "e ?", "f")
    assert (second.loc, second.loc_neighbour, second.loc_neighbour_ans) == ("i ?", None, None)
    assert load_text_pool(path) == ["c ?", "a ?", "i ?", "g ?"]  # background texts: `loc` only, as before
    with pytest.raises(DatasetError, match="record 0 field 'loc_neighbour' must be a string"):
        load_edit_dataset(_write_json(tmp_path, [{**with_neighbour, "loc_neighbour": 3}]))


@pytest.mark.parametrize(
    "record, kind",
    [
        ({"src": "a", "alt": "b"}, "zsre"),
        ({"prompt": "a", "target_new": "b"}, "hallucination"),
        ({"prompt": "a", "target_new": "b", "ood_rephrase": "c"}, "temporal"),
        ({"prompt": "a", "target": "b"}, "jsonl"),
    ],
)
def test_auto_detection_from_keys(tmp_path, record, kind):
    path = _write_json(tmp_path, [record])
    assert detect_kind(path) == kind
    assert load_edit_dataset(path)[0].kind == kind


def test_zsre_records_inside_jsonl(tmp_path):
    path = _write(tmp_path, "z.jsonl", '{"src": "a", "alt": "b", "loc": "nq question: c", "loc_ans": "d"}\n')
    (request,) = load_edit_dataset(path)
    assert (request.kind, request.prompt, request.target, request.loc_ans) == ("zsre", "a", "b", "d")


def test_undetectable_format_names_keys_and_formats(tmp_path):
    with pytest.raises(DatasetError) as info:
        load_edit_dataset(_write_json(tmp_path, [{"question": "a", "answer": "b"}]))
    message = str(info.value)
    assert "['answer', 'question']" in message
    assert all(kind in message for kind in ("zsre", "hallucination", "temporal", "jsonl"))


def test_skip_invalid_logs_each_record(tmp_path, caplog):
    path = _write_json(tmp_path, [{"src": "a", "alt": "b"}, {"src": "c", "alt": ""}, {"src": "d", "alt": "e"}])
    with caplog.at_level(logging.WARNING, logger="edit_tools.datasets"):
        assert [r.prompt for r in load_edit_dataset(path, skip_invalid=True)] == ["a", "d"]
    assert "record 1 field 'alt' is empty" in caplog.text


# ---------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "name, text, pattern",
    [
        ("x.json", "", r"x\.json: the file is empty"),
        ("x.json", "  \n", r"x\.json: the file is empty"),
        ("x.jsonl", "\n\n", r"x\.jsonl: the file is empty"),
        ("x.json", "[]", r"x\.json: the file holds no records"),
        ("x.json", '{"src": "a", "alt": "b"}', r"expected a JSON list of records, found a dict"),
        ("x.json", "[{", r"x\.json: not valid JSON .*line 1"),
        ("x.json", '{"prompt": "a", "target": "b"}\n{"prompt": "c", "target": "d"}\n', r"not valid JSON .*\.jsonl"),
        ("x.jsonl", '{"prompt": "a", "target": "b"}\n\n{oops\n', r"x\.jsonl: line 3 \(record 1\) is not valid JSON"),
    ],
)
def test_unreadable_files(tmp_path, name, text, pattern):
    with pytest.raises(DatasetError, match=pattern):
        load_edit_dataset(_write(tmp_path, name, text))


@pytest.mark.parametrize(
    "records, pattern",
    [
        ([{"src": "a", "alt": "b"}, {"src": "c"}], r"record 1 field 'alt' is missing"),
        ([{"src": "a", "alt": "b"}, {"src": None, "alt": "b"}], r"record 1 field 'src' is null"),
        ([{"src": "a", "alt": ["b"]}], r"record 0 field 'alt' must be a string, found list"),
        ([{"src": "a", "alt": 3}], r"record 0 field 'alt' must be a string, found int"),
        ([{"src": "a", "alt": "b", "loc_ans": 7}], r"record 0 field 'loc_ans' must be a string, found int"),
        ([{"src": "  \n", "alt": "b"}], r"record 0 field 'src' is empty"),
        ([{"prompt": "a", "target_new": "b"}] * 12 + [{"prompt": "", "target_new": "b"}], r"record 12 field 'prompt' is empty"),
        ([{"prompt": "a", "target_new": "b", "ood_rephrase": {"x": 1}}], r"record 0 field 'ood_rephrase' must be a string"),
        ([{"src": "a", "alt": "b"}, 5], r"record 1 is a int, expected a JSON object"),
        (["just a string"], r"record 0 is a str, expected a JSON object"),
    ],
)
def test_bad_records_name_path_index_and_field(tmp_path, records, pattern):
    path = _write_json(tmp_path, records)
    with pytest.raises(DatasetError, match=pattern) as info:
        load_edit_dataset(path)
    assert str(path) in str(info.value)


def test_bad_jsonl_record_names_its_line(tmp_path):
    path = _write(tmp_path, "e.jsonl", '{"prompt": "a", "target": "b"}\n\n{"prompt": "c", "target": 4}\n')
    with pytest.raises(DatasetError, match=r"record 1 \(line 3\) field 'target' must be a string, found int"):
        load_edit_dataset(path)


def test_missing_file_and_bad_arguments(tmp_path):
    with pytest.raises(DatasetError, match=r"nope\.json: dataset file not found"):
        load_edit_dataset(tmp_path / "nope.json")
    with pytest.raises(DatasetError, match="not found"):
        detect_kind(tmp_path / "nope.jsonl")
    with pytest.raises(DatasetError, match="not a file"):
        load_edit_dataset(tmp_path)
    path = _write_json(tmp_path, [{"src": "a", "alt": "b"}])
    with pytest.raises(DatasetError, match=r"unknown dataset kind 'mend'.*zsre"):
        load_edit_dataset(path, kind="mend")
    with pytest.raises(ValueError, match="limit"):
        load_edit_dataset(path, limit=-1)


def test_not_utf8(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b'[{"src": "\xff", "alt": "b"}]')
    with pytest.raises(DatasetError, match=r"x\.json: not UTF-8"):
        load_edit_dataset(path)


# ---------------------------------------------------------------- text pool


def test_text_pool_from_txt(tmp_path):
    path = _write(tmp_path, "t.txt", "  one \n\ntwo\nthree\n")
    assert load_text_pool(path) == ["one", "two", "three"]
    assert load_text_pool(path, limit=2) == ["one", "two"]
    with pytest.raises(DatasetError, match="empty"):
        load_text_pool(_write(tmp_path, "blank.txt", "\n \n"))


def test_text_pool_from_datasets(tmp_path):
    jsonl = _write(tmp_path, "d.jsonl", '{"prompt": "p", "target": "t", "loc": "l"}\n{"prompt": "q", "target": ""}\n')
    assert load_text_pool(jsonl) == ["l", "p", "q"]  # targets are neither read nor required
    hall = _write_json(tmp_path, [{"prompt": "p", "target_new": "t", "locality_prompt": "lp"}])
    assert load_text_pool(hall) == ["lp", "p"]
    with pytest.raises(DatasetError, match=r"record 0 field 'prompt' must be a string"):
        load_text_pool(_write_json(tmp_path, [{"prompt": 1, "target": "t"}]))


# ---------------------------------------------------------------- every format, every fault

_VALID = {
    "zsre": {"src": "where does X live ?", "alt": "Y", "rephrase": "X lives where ?", "loc": "nq question: z", "loc_ans": "w",
             "subject": "X"},
    "hallucination": {"prompt": "who wrote X ?", "target_new": "Y", "subject": "X", "locality_prompt": "z",
                      "locality_ground_truth": "w"},
    "temporal": {"prompt": "what is X ?", "target_new": "Y", "subject": "X", "ood_rephrase": "X is what ?",
                 "locality_prompt": "z", "locality_ground_truth": "w"},
    "jsonl": {"prompt": "where does X live ?", "target": "Y", "rephrase": "r", "loc": "l", "loc_ans": "a"},
}
_KEYS = {"zsre": ("src", "alt", "rephrase"), "hallucination": ("prompt", "target_new", "locality_prompt"),
         "temporal": ("prompt", "target_new", "ood_rephrase"), "jsonl": ("prompt", "target", "rephrase")}


def _dataset(tmp_path: Path, kind: str, records: list) -> Path:
    """Records written as the format's own file: a JSON list, or one object per line for JSONL."""
    if kind == "jsonl":
        return _write(tmp_path, "bad.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    return _write(tmp_path, f"{kind}.json", json.dumps(records))


def _faults(kind: str) -> dict[str, tuple]:
    prompt, target, optional = _KEYS[kind]
    valid = _VALID[kind]

    def without(key):
        return {k: v for k, v in valid.items() if k != key}

    return {
        "missing-prompt": (without(prompt), rf"field '{prompt}' is missing"),
        "missing-target": (without(target), rf"field '{target}' is missing"),
        "null-prompt": ({**valid, prompt: None}, rf"field '{prompt}' is null"),
        "empty-target": ({**valid, target: ""}, rf"field '{target}' is empty"),
        "blank-prompt": ({**valid, prompt: " \t"}, rf"field '{prompt}' is empty"),
        "target-wrong-type": ({**valid, target: 42}, rf"field '{target}' must be a string, found int"),
        "prompt-wrong-type": ({**valid, prompt: ["a"]}, rf"field '{prompt}' must be a string, found list"),
        "optional-wrong-type": ({**valid, optional: {"x": 1}}, rf"field '{optional}' must be a string, found dict"),
        "not-an-object": ("just text", r"is a str, expected a JSON object"),
    }


@pytest.mark.parametrize("fault", sorted(_faults("jsonl")))
@pytest.mark.parametrize("kind", sorted(_VALID))
def test_bad_record_in_every_format_names_file_record_and_field(tmp_path, kind, fault):
    record, message = _faults(kind)[fault]
    # The bad record is the third: the error must say which one, not just that one is bad.
    path = _dataset(tmp_path, kind, [_VALID[kind], _VALID[kind], record])
    with pytest.raises(DatasetError, match=message) as info:
        load_edit_dataset(path)
    where = "record 2 (line 3)" if kind == "jsonl" else "record 2"
    assert str(info.value).startswith(f"{path}: {where}"), str(info.value)
    # The valid records alone load, as their own format.
    assert [r.kind for r in load_edit_dataset(path, limit=2)] == [kind, kind]


@pytest.mark.parametrize("kind", sorted(_VALID))
def test_empty_and_invalid_files_in_every_format(tmp_path, kind):
    suffix = ".jsonl" if kind == "jsonl" else ".json"
    for text, message in [("", "the file is empty"), ("\n \n", "the file is empty")]:
        with pytest.raises(DatasetError, match=message):
            load_edit_dataset(_write(tmp_path, f"empty{suffix}", text), kind=kind)
    good = json.dumps(_VALID[kind])
    broken = good[:-1]  # the closing brace lost: truncated on copy
    if kind == "jsonl":
        path, message = _write(tmp_path, "cut.jsonl", good + "\n" + broken + "\n"), r"line 2 \(record 1\) is not valid JSON"
    else:
        path, message = _write(tmp_path, "cut.json", "[" + good + ", " + broken + "]"), r"not valid JSON \(.* at line 1, column"
    with pytest.raises(DatasetError, match=message) as info:
        load_edit_dataset(path, kind=kind)
    assert str(path) in str(info.value)
    if kind != "jsonl":
        with pytest.raises(DatasetError, match="the file holds no records"):
            load_edit_dataset(_write(tmp_path, "none.json", "[]"), kind=kind)


@pytest.mark.parametrize("kind", ["zsre", "hallucination", "temporal"])
def test_a_record_of_another_format_is_named(tmp_path, kind):
    other = _VALID["jsonl"]
    path = _dataset(tmp_path, kind, [_VALID[kind], other])
    prompt = _KEYS[kind][0]
    missing = prompt if prompt not in other else _KEYS[kind][1]
    with pytest.raises(DatasetError, match=rf"{path.name}: record 1 field '{missing}' is missing"):
        load_edit_dataset(path)


@pytest.mark.parametrize("folder, seed, design", [("", None, "classic"), ("wide", 7, "classic"), ("broad", 11, "broad")])
def test_facts_edit_sets_have_unrelated_and_neighbour_locality(folder, seed, design):
    from edit_tools.facts.designs import world_of
    from edit_tools.facts.world import DEFAULT_SEED

    world = world_of(DEFAULT_SEED if seed is None else seed, design)
    facts = {(f.subject, f.relation): f for f in world.facts}
    subjects = sorted(world.subjects, key=len, reverse=True)  # longest first: no name is a prefix match
    path = Path(__file__).resolve().parents[1] / "data" / "facts" / folder / "zsre-facts-T1000.json"
    records = _raw(path)
    edited = {r["subject"] for r in records}

    def fact_asked(prompt: str, answer: str):
        subject = next(s for s in subjects if prompt.startswith(s + " "))
        return next(f for (s, _), f in facts.items() if s == subject and f.answer == answer), subject

    for r in records:
        unrelated, loc_subject = fact_asked(r["loc"], r["loc_ans"])
        neighbour, neighbour_subject = fact_asked(r["loc_neighbour"], r["loc_neighbour_ans"])
        assert loc_subject not in edited and neighbour_subject not in edited
        assert unrelated.relation != r["relation"], "loc asks another relation"
        assert neighbour.relation == r["relation"], "loc_neighbour asks the edit's relation"
        assert r["loc_neighbour"].replace(neighbour_subject, r["subject"]) == r["src"], "... in the edit's template"
    requests = load_edit_dataset(path, limit=3)
    assert all(q.loc_neighbour and q.loc_neighbour_ans for q in requests)
