import json

import pytest

from edit_tools.datasets import DatasetError, detect_kind, load_edit_dataset, load_text_pool


def test_real_reference_files(shared_data):
    with pytest.raises(DatasetError, match="record 54 field 'alt' is empty"):
        load_edit_dataset(shared_data / "zsre_mend_eval_head.json")
    zsre = load_edit_dataset(shared_data / "zsre_mend_eval_head.json", skip_invalid=True)  # 4 records have alt ""
    raw = json.loads((shared_data / "zsre_mend_eval_head.json").read_text())
    assert len(zsre) == 1196 and zsre[0].prompt == raw[0]["src"].strip() and zsre[0].target == raw[0]["alt"].strip()
    assert zsre[0].rephrase and zsre[0].loc.startswith("nq question:") and zsre[0].kind == "zsre"
    hall = load_edit_dataset(shared_data / "hallucination-edit.json")
    assert len(hall) == 600 and hall[0].kind == "hallucination" and hall[0].loc and hall[0].rephrase is None
    temporal = load_edit_dataset(shared_data / "temporal-edit.json")
    assert len(temporal) == 75 and temporal[0].kind == "temporal" and temporal[0].rephrase
    assert detect_kind(shared_data / "hallucination-train.json") == "hallucination"
    assert len(load_edit_dataset(shared_data / "zsre_mend_eval_head.json", limit=7)) == 7


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_plain_jsonl(tmp_path):
    path = _write(tmp_path, "e.jsonl", '{"prompt": " a b ", "target": "c"}\n\n{"prompt": "d", "target": "e", "loc": "f", "loc_ans": "g"}\n')
    first, second = load_edit_dataset(path)
    assert (first.prompt, first.target, first.loc) == ("a b", "c", None)
    assert (second.loc, second.loc_ans) == ("f", "g")


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("x.json", "", "empty"),
        ("x.json", "[]", "empty"),
        ("x.json", "{\"a\": 1}", "expected a JSON list"),
        ("x.json", "[{", "not valid JSON"),
        ("x.jsonl", '{"prompt": "a", "target": "b"}\n{oops\n', "line 2 is not valid JSON"),
        ("x.json", '[{"src": "a", "alt": "b"}, {"src": "c"}]', "record 1 is missing field 'alt'"),
        ("x.json", '[{"src": "a", "alt": 3}]', "record 0 field 'alt' must be a string"),
        ("x.json", '[{"src": "  ", "alt": "b"}]', "record 0 field 'src' is empty"),
        ("x.json", '[{"question": "a"}]', "cannot tell the format"),
        ("x.json", '[{"src": "a", "alt": "b"}, 5]', "record 1 is a int"),
    ],
)
def test_bad_files_name_the_problem(tmp_path, name, text, message):
    with pytest.raises(DatasetError, match=message):
        load_edit_dataset(_write(tmp_path, name, text))


def test_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_edit_dataset(tmp_path / "nope.json")


def test_text_pool(tmp_path):
    assert load_text_pool(_write(tmp_path, "t.txt", "one\n\ntwo\nthree\n"), limit=2) == ["one", "two"]
    pool = load_text_pool(_write(tmp_path, "d.jsonl", '{"prompt": "p", "target": "t", "loc": "l"}\n'))
    assert pool == ["l", "p"]
