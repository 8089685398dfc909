"""The columnar edit records (core.artifact.EditRecords) and what a GET /memoir/edits page costs.

The store must read and write the same edits-vN.jsonl lines as the list of EditRecord it
replaces, behave as that list for callers, and let a page of the admin listing touch only the
page's rows: the regression test below counts the rows parsed (no timing) with 200,000 records.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import make_artifact

from vllm_memoir.core import ArtifactError, EditRecord, load_artifact, save_artifact
from vllm_memoir.core import artifact as artifact_module
from vllm_memoir.core.edit_records import EditRecords, edit_records_from_jsonl

LARGE = 200_000


def jsonl(records: list[EditRecord]) -> bytes:
    return "".join(json.dumps(r.to_json()) + "\n" for r in records).encode()


def records(count: int, first_id: int = 0) -> list[EditRecord]:
    return [EditRecord(edit_id=first_id + i, prompt=f"prompt {i}", target=f"target {i}", rephrase=f"r {i}",
                       outcome={"loss": 0.5, "steps": i % 7, "took": True}) for i in range(count)]


def test_a_loaded_store_writes_back_the_same_bytes_and_equals_the_records(tmp_path):
    art = make_artifact(3)
    art.edits[1] = EditRecord(edit_id=7, prompt="p\u00e9 \"q\"", target="t", enabled=False, subject="s",
                              outcome={"loss": 0.5, "steps": 3, "took": False})
    save_artifact(art, tmp_path)
    written = next(tmp_path.glob("edits-v*.jsonl")).read_bytes()
    loaded = load_artifact(tmp_path)
    assert isinstance(loaded.edits, EditRecords) and loaded.edits == art.edits and list(loaded.edits) == art.edits
    assert loaded.edits.edit_ids.tolist() == [0, 7, 2] and loaded.enabled.tolist() == [True, False, True]
    assert loaded.edits.to_jsonl() == written
    save_artifact(loaded, tmp_path)
    assert next(tmp_path.glob("edits-v*.jsonl")).read_bytes() == written


def test_the_fast_read_gives_the_records_the_line_by_line_read_gives():
    text = jsonl(records(50)) + b"\n"  # a trailing blank line is skipped by both
    fast = edit_records_from_jsonl(text, "x")
    assert fast is not None
    assert list(fast) == artifact_module._read_edits_by_line(text, "x")


@pytest.mark.parametrize("line, rewritten", [
    (b'{"edit_id": "5", "prompt": "p", "target": "t"}', True),  # an id as a string: read leniently, as before
    (b'{"edit_id": 5, "prompt": 7, "target": "t", "enabled": 1}', True),
    (b'  \t ', True),  # a whitespace-only line
    # A key this build does not write is ignored when read, and kept when written back.
    (b'{"edit_id": 5, "prompt": "p", "target": "t", "extra": true}', False),
])
def test_odd_lines_read_as_the_line_by_line_reader_reads_them(tmp_path, line, rewritten):
    path = tmp_path / "edits-v1.jsonl"
    path.write_bytes(b'{"edit_id": 1, "prompt": "a", "target": "b"}\n' + line + b"\n")
    store = artifact_module._read_edits(path)
    expected = artifact_module._read_edits_by_line(path.read_bytes(), path)
    assert list(store) == expected
    # Lines the fast read refuses are written back as this build writes records.
    assert (store.to_jsonl() == jsonl(expected)) is rewritten


def test_a_bad_line_is_named_with_its_number(tmp_path):
    path = tmp_path / "edits-v1.jsonl"
    path.write_bytes(jsonl(records(3)) + b'{"prompt": "no id", "target": "t"}\n')
    with pytest.raises(ArtifactError, match=r"edits-v1\.jsonl:4: bad edit record"):
        artifact_module._read_edits(path)


def test_a_record_read_from_the_store_writes_its_changes_back():
    store = EditRecords.from_records(records(4))
    store[2].enabled = False
    record = store[3]
    record.target = "changed"
    assert store.enabled.tolist() == [True, True, False, True] and store.num_enabled == 3
    assert store[3].target == "changed" and store[2] == EditRecord(**{**records(4)[2].to_json(), "enabled": False})
    store.set_enabled(2, True)
    assert store.num_enabled == 4 and json.loads(store.line(2))["enabled"] is True
    with pytest.raises(ValueError):
        store.edit_ids[0] = 9  # the columns are read-only views


@pytest.mark.parametrize("rows", [(), (0,), (4,), (0, 4), (1, 2), (0, 1, 2, 3, 4)])
@pytest.mark.parametrize("trailing_newline", [True, False])
def test_a_store_with_rewritten_rows_writes_the_lines_a_list_would(rows, trailing_newline):
    """to_jsonl copies the text in runs between rewritten rows: first, last, neighbours, all,
    and a file whose last line has no newline."""
    listed = records(5)
    text = jsonl(listed)
    store = edit_records_from_jsonl(text if trailing_newline else text[:-1], "edits")
    for row in rows:
        store.set_enabled(row, False)
        listed[row].enabled = False
    assert store.to_jsonl() == jsonl(listed)
    store.set_enabled(0, True)  # and back: the rewritten line is the record's
    listed[0].enabled = True
    assert store.to_jsonl() == jsonl(listed)
    assert EditRecords.from_records([]).to_jsonl() == b""
    single = EditRecords.from_records([])
    single.append(listed[0])
    assert single.to_jsonl() == jsonl(listed[:1])


def test_append_item_assignment_and_lookups():
    store = EditRecords.from_records([EditRecord(edit_id=i, prompt="p", target="t") for i in (5, 3, 9)])
    assert store.rows_of(np.array([3, 9, 4, 5])).tolist() == [1, 2, -1, 0]
    store.append(EditRecord(edit_id=4, prompt="new", target="t", enabled=False))
    store[0] = EditRecord(edit_id=50, prompt="replaced", target="t")
    assert len(store) == 4 and store.row_of(4) == 3 and store.row_of(5) is None and store.row_of(50) == 0
    rows = store.rows_by_id()
    assert rows.get(9) == 2 and 3 in rows and 77 not in rows and rows.get(77, -1) == -1
    assert [store.ids_by_row()[row] for row in range(4)] == [50, 3, 9, 4] and store.num_enabled == 3
    assert store.to_jsonl() == jsonl(list(store)) and store.duplicate_id() is None
    store.append(EditRecord(edit_id=3, prompt="again", target="t"))
    assert store.duplicate_id() == 3


def test_duplicate_ids_are_refused_at_load(tmp_path):
    art = make_artifact(3)
    art.edits[2] = EditRecord(edit_id=0, prompt="p", target="t")
    save_artifact(art, tmp_path)
    with pytest.raises(ArtifactError, match=r"duplicate edit ids \(0 is listed twice\)"):
        load_artifact(tmp_path)


# --- a page of GET /memoir/edits costs O(page) on the server's path ---------------------------

class CountingRecords(EditRecords):
    """Counts the rows read; iterating all records fails the test."""

    parsed = 0

    def line(self, row):
        CountingRecords.parsed += 1
        return super().line(row)

    def __iter__(self):
        raise AssertionError("a page iterated every record")


class NoScan:
    """Stands for the router's enabled flags: a page must not count them."""

    def sum(self):
        raise AssertionError("a page counted every enabled flag")


def served_layer(count: int):
    """A stand-in of the edited layer with `count` columnar records, as LiveEdits reads it."""
    text = jsonl(records(count, first_id=1000))
    store = edit_records_from_jsonl(text, "served")
    store.__class__ = CountingRecords
    manifest = SimpleNamespace(version=3, files={"memoir-v3.safetensors": "a" * 64})
    return SimpleNamespace(records=store, manifest=manifest, router=SimpleNamespace(router=SimpleNamespace(
        enabled=NoScan())), tp_rank=0, unrouted_count=0, route_counts={1500: 2}, edit_rows=store.rows_by_id())


def test_a_page_through_the_worker_path_parses_only_its_rows():
    """EditControl.state -> collective_rpc (answers serialized, as between processes) -> the worker
    extension's memoir_state -> LiveEdits.state -> the layer's records: a page of 100 out of
    200,000 parses 100 rows, counts no flags, and its answer does not grow with the records."""
    from vllm_memoir.edit_control import EditControl
    from vllm_memoir.live_edits import LiveEdits
    from vllm_memoir.worker_extension import MemoirWorkerExtension

    live = LiveEdits.__new__(LiveEdits)
    live.layer, live.path = served_layer(LARGE), "/served"
    worker = MemoirWorkerExtension()
    worker._memoir_live_edits = live
    sizes = []

    class Engine:
        async def collective_rpc(self, method, args=()):
            # JSON here, never pickle: the answer must be plain data, and its size is what crosses.
            answer = json.dumps(getattr(worker, method)(*args)).encode()
            sizes.append(len(answer))
            return [json.loads(answer)]

    CountingRecords.parsed = 0
    page = asyncio.run(EditControl(Engine()).state(LARGE // 2, 100))
    assert CountingRecords.parsed == 100
    assert [e["edit_id"] for e in page["edits"]] == list(range(1000 + LARGE // 2, 1000 + LARGE // 2 + 100))
    assert page["num_edits"] == LARGE and page["num_enabled"] == LARGE
    assert all(e["routed_requests"] == 0 for e in page["edits"])
    assert sizes[0] < 100 * 200  # ~100 rows of JSON-like fields, nothing per stored record

    live.layer.records.set_enabled(0, False)
    CountingRecords.parsed = 0
    page = asyncio.run(EditControl(Engine()).state(0, 10))
    assert CountingRecords.parsed == 10 and page["num_enabled"] == LARGE - 1 and page["edits"][0]["enabled"] is False
    assert page["edits"][0]["edit_id"] == 1000
    page = asyncio.run(EditControl(Engine()).state(500, 1))
    assert page["edits"][0]["routed_requests"] == 2  # edit 1500's count, looked up by id


def test_a_whole_listing_is_asked_of_the_workers_a_chunk_at_a_time(monkeypatch):
    """GET /memoir/edits without a limit: every worker answer holds at most LISTING_CHUNK edits
    (no process holds a whole 1,000,000-edit answer), and the chunks add up to the listing."""
    from vllm_memoir import edit_control
    from vllm_memoir.edit_control import EditControl, EditControlError
    from vllm_memoir.live_edits import LiveEdits

    monkeypatch.setattr(edit_control, "LISTING_CHUNK", 70)
    live = LiveEdits.__new__(LiveEdits)
    live.layer, live.path = served_layer(250), "/served"
    answered = []

    class Engine:
        async def collective_rpc(self, method, args=()):
            answer = {"ok": True, **getattr(live, method.removeprefix("memoir_"))(*args)}
            answered.append(len(answer["edits"]))
            return [answer]

    listing = asyncio.run(EditControl(Engine()).state(20, None))
    assert answered == [70, 70, 70, 20] and listing["offset"] == 20 and listing["num_edits"] == 250
    assert [e["edit_id"] for e in listing["edits"]] == list(range(1020, 1250))
    answered.clear()
    assert len(asyncio.run(EditControl(Engine()).state(0, 150))["edits"]) == 150 and answered == [70, 70, 10]

    class SwappedMidway(Engine):
        async def collective_rpc(self, method, args=()):
            answers = await super().collective_rpc(method, args)
            live.layer.manifest.version += 1  # each chunk sees another version
            return answers

    with pytest.raises(EditControlError, match="changed .* while they were listed"):
        asyncio.run(EditControl(SwappedMidway()).state(0, None))


def test_lookups_of_unsorted_ids_and_of_ids_past_int64():
    store = EditRecords.from_records(EditRecord(edit_id=i, prompt="p", target="t") for i in (9, -4, 7, 1 << 40))
    assert [store.row_of(i) for i in (9, -4, 7, 1 << 40, 8)] == [0, 1, 2, 3, None]
    rows = store.rows_by_id()
    assert rows.get(1 << 80) is None and (1 << 80) not in rows and store.row_of(-(1 << 70)) is None
    with pytest.raises(KeyError):
        rows[1 << 80]
