"""An artifact's edit records, one JSON object per line of edits-vN.jsonl, held column by column.

EditRecord is one record; EditRecords holds all of them as the file's bytes plus numpy
columns (edit ids, enabled flags), parsing a record only when it is read, so that
1,000,000 records load in about a second and take a quarter of a gigabyte.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ArtifactError

try:  # msgspec (a vLLM dependency) reads 1,000,000 records' ids and flags in well under a second
    import msgspec
except ImportError:  # the core imports without vLLM; records are then read line by line
    msgspec = None


@dataclass(eq=False)
class EditRecord:
    edit_id: int
    prompt: str
    target: str
    enabled: bool = True
    rephrase: str | None = None
    subject: str | None = None
    # How the edit job's training of this edit ended: {"loss", "steps", "took"}; None in
    # records written before it was kept (and for edits not made by the edit job).
    outcome: dict[str, Any] | None = None

    @property
    def rolled_back(self) -> bool:
        """The edit job undid this edit's training, which did not take (hparams failed_edits
        "roll_back"): the memory holds nothing for it."""
        return bool((self.outcome or {}).get("rolled_back"))

    def enable_refusal(self) -> str | None:
        """Why this edit cannot be enabled, or None: a rolled-back edit's route would apply
        columns trained for other edits."""
        if not self.rolled_back:
            return None
        return (f"edit {self.edit_id} was rolled back when it was made (it did not take), so the memory holds "
                f"nothing for it and enabling it would answer its prompt from other edits' columns; "
                f"make the edit again (memoir edit --append) instead")

    def to_json(self) -> dict[str, Any]:
        """The record as its JSONL line's object. Not dataclasses.asdict, whose recursive copy
        made writing 1,000,000 records 3x slower (~70 s) for the same JSON."""
        return {name: getattr(self, name) for name in _RECORD_FIELDS}

    def __eq__(self, other: object) -> bool:
        # By fields, whatever the class: a record read from an EditRecords row (StoredEditRecord)
        # equals the EditRecord it was written from.
        if not isinstance(other, EditRecord):
            return NotImplemented
        return self.to_json() == other.to_json()

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str) -> "EditRecord":
        try:
            return cls(
                edit_id=int(obj["edit_id"]),
                prompt=str(obj["prompt"]),
                target=str(obj["target"]),
                enabled=bool(obj.get("enabled", True)),
                rephrase=obj.get("rephrase"),
                subject=obj.get("subject"),
                outcome=obj.get("outcome"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"{where}: bad edit record ({exc!r})") from exc


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(EditRecord))


class StoredEditRecord(EditRecord):
    """A record read from a row of an EditRecords: setting a field writes the row back, so code
    that changes a record it read (`record.enabled = False`) changes the store, as it changed
    the list of records before. Two objects read from one row do not see each other's changes."""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        owner = self.__dict__.get("_owner")
        if owner is not None and name in _RECORD_FIELDS:
            owner[0][owner[1]] = self


_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1
# Lines are scanned for newlines in blocks of this many bytes (a boolean copy of the whole
# 0.24 GB file at 1,000,000 records would double the load's peak memory).
_SCAN_BLOCK = 1 << 24


class EditRecords:
    """An artifact's edit records, column by column: edit ids and enabled flags as numpy arrays,
    each record's JSON line kept as bytes of one buffer and parsed only when the record is read.

    1,000,000 EditRecord objects cost 0.5 GB and most of a load; this holds the file's bytes and
    four arrays. It reads and writes the same edits-vN.jsonl lines and behaves as the list of
    EditRecord it replaces (len, index, slice, iterate, ==, append, item assignment), records
    read from it writing their changes back (StoredEditRecord). A row's line is the truth; the
    id and flag arrays mirror it.
    """

    def __init__(self, text: bytes, starts: np.ndarray, ends: np.ndarray, edit_ids: np.ndarray,
                 enabled: np.ndarray, where: str = "edit records"):
        self._text = text
        self._starts, self._ends = starts.astype(np.int64), ends.astype(np.int64)  # [start, end) of row lines
        self._ids, self._enabled = edit_ids.astype(np.int64), enabled.astype(bool)
        self._size = len(self._ids)
        self._lines: dict[int, bytes] = {}  # rows written since the text was read (changed or appended)
        self._num_enabled = int(self._enabled.sum())
        self._ids_increasing: bool | None = None  # lookups: known on first use
        self._sorted_rows: np.ndarray | None = None  # rows by edit id, when the ids do not increase
        self._sorted_ids: np.ndarray | None = None  # the ids in that order
        self.where = where

    # --- building ---------------------------------------------------------------------------

    @classmethod
    def from_records(cls, records: "Iterable[EditRecord]", where: str = "edit records") -> "EditRecords":
        records = list(records)
        lines = [json.dumps(r.to_json()).encode() for r in records]
        ends = np.cumsum([len(line) + 1 for line in lines], dtype=np.int64) - 1
        starts = ends - np.array([len(line) for line in lines], dtype=np.int64)
        ids = np.fromiter((r.edit_id for r in records), np.int64, len(lines))
        enabled = np.fromiter((bool(r.enabled) for r in records), bool, len(lines))
        return cls(b"".join(line + b"\n" for line in lines), starts, ends, ids, enabled, where)

    @classmethod
    def of(cls, edits: "EditRecords | Iterable[EditRecord]") -> "EditRecords":
        """`edits` itself when it is an EditRecords, else a store of the same records."""
        return edits if isinstance(edits, EditRecords) else cls.from_records(list(edits))

    # --- the columns and the lookup ---------------------------------------------------------

    @property
    def edit_ids(self) -> np.ndarray:
        """[N] int64 edit ids by row (read-only)."""
        return _read_only(self._ids[:self._size])

    @property
    def enabled(self) -> np.ndarray:
        """[N] bool enabled flags by row (read-only; set_enabled changes them)."""
        return _read_only(self._enabled[:self._size])

    @property
    def num_enabled(self) -> int:
        return self._num_enabled

    def id_at(self, row: int) -> int:
        return int(self._ids[:self._size][row])

    def row_of(self, edit_id: int) -> int | None:
        """The row of `edit_id` (its first, if listed twice), or None: a binary search, no dict."""
        if not _INT64_MIN <= edit_id <= _INT64_MAX:  # a client's id (an HTTP path) may be any integer
            return None
        rows = self.rows_of(np.array([edit_id], dtype=np.int64))
        return None if rows[0] < 0 else int(rows[0])

    def rows_of(self, edit_ids: np.ndarray) -> np.ndarray:
        """[M] int64 rows of `edit_ids`, -1 where an id is not stored."""
        edit_ids = np.asarray(edit_ids, dtype=np.int64)
        if not self._size:
            return np.full(len(edit_ids), -1, dtype=np.int64)
        order = self._lookup_order()
        sorted_ids = self.edit_ids if order is None else self._sorted_ids
        at = np.searchsorted(sorted_ids, edit_ids).clip(max=self._size - 1)
        rows = at if order is None else order[at]
        return np.where(sorted_ids[at] == edit_ids, rows, -1).astype(np.int64)

    def _lookup_order(self) -> np.ndarray | None:
        """None when the ids increase with the row (what edit jobs write), else rows sorted by id."""
        if self._ids_increasing is None:
            ids = self.edit_ids
            self._ids_increasing = bool(np.all(ids[1:] > ids[:-1]))
            self._sorted_rows = None if self._ids_increasing else np.argsort(ids, kind="stable")
            self._sorted_ids = None if self._ids_increasing else ids[self._sorted_rows]
        return self._sorted_rows

    def ids_by_row(self) -> "EditIdsByRow":
        return EditIdsByRow(self)

    def rows_by_id(self) -> "EditRowsById":
        """A read-only {edit_id: row} view (the lookup is prepared here, not on first use)."""
        self._lookup_order()
        return EditRowsById(self)

    def duplicate_id(self) -> int | None:
        """An edit id listed on two rows, or None."""
        ids = np.sort(self.edit_ids)
        twice = np.flatnonzero(ids[1:] == ids[:-1])
        return int(ids[twice[0]]) if len(twice) else None

    def set_enabled(self, row: int, enabled: bool) -> None:
        """Turn row `row` on or off (its line is rewritten: the line stays the truth)."""
        if bool(self._enabled[:self._size][row]) != enabled:
            record = self.record(row)
            record.enabled = enabled  # writes the row back

    # --- the lines --------------------------------------------------------------------------

    def line(self, row: int) -> bytes:
        """Row `row`'s JSON line, without its newline."""
        row = _row_index(row, self._size)
        written = self._lines.get(row)
        return written if written is not None else self._text[self._starts[row]:self._ends[row]]

    def record(self, row: int) -> StoredEditRecord:
        """Row `row`, parsed; setting one of its fields writes the row back."""
        row = _row_index(row, self._size)
        record = EditRecord.from_json(json.loads(self.line(row)), f"{self.where}: row {row}")
        record._owner = (self, row)
        record.__class__ = StoredEditRecord  # now, so building it wrote nothing back
        return record

    def json_objects(self, start: int, end: int) -> list[dict[str, Any]]:
        """Rows start..end-1 as their lines' JSON objects (unchecked dicts, no EditRecord): what
        a listing needs, parsed in one call. The fields are as written: convert with
        EditRecord.from_json where a field's type matters."""
        lines = [self.line(row) for row in range(*slice(start, end).indices(self._size))]
        if msgspec is None:
            return [json.loads(line) for line in lines]
        return msgspec.json.decode(b"[" + b",".join(lines) + b"]")

    def to_jsonl(self) -> bytes:
        """The edits-vN.jsonl text: one line per row, each ending in a newline. When the text
        holds the rows in order, it is copied in runs between the rewritten rows: a flag changed
        in 1,000,000 records costs a copy of the text, not a join of 1,000,000 lines."""
        if not self._size:
            return b""
        if not self._text_is_rows_in_order():
            return b"".join(self.line(row) + b"\n" for row in range(self._size))
        text, pieces, at = memoryview(self._text), [], 0
        for row in sorted(self._lines):
            pieces += [text[at:int(self._starts[row])], self._lines[row], b"\n"]
            at = int(self._ends[row]) + 1  # past the row and its newline
        last = self._size - 1
        if last not in self._lines:
            pieces += [text[at:int(self._ends[last])], b"\n"]
        return b"".join(pieces)

    def _text_is_rows_in_order(self) -> bool:
        starts, ends = self._starts[:self._size], self._ends[:self._size]
        return not self._size or (starts[0] == 0 and bool(np.all(starts[1:] == ends[:-1] + 1)))

    # --- a list of records --------------------------------------------------------------------

    def __len__(self) -> int:
        return self._size

    def __getitem__(self, index: int | slice) -> "StoredEditRecord | list[StoredEditRecord]":
        if isinstance(index, slice):
            return [self.record(row) for row in range(*index.indices(self._size))]  # only the slice's rows
        return self.record(index)

    def __iter__(self) -> "Iterator[StoredEditRecord]":
        return (self.record(row) for row in range(self._size))

    def __setitem__(self, row: int, record: EditRecord) -> None:
        self._store(_row_index(row, self._size), record)

    def append(self, record: EditRecord) -> None:
        self._reserve(self._size + 1)
        self._ids[self._size], self._enabled[self._size] = record.edit_id, False  # _store counts it in
        self._size += 1
        self._ids_increasing = None
        self._store(self._size - 1, record)

    def extend(self, records: "Iterable[EditRecord]") -> None:
        for record in records:
            self.append(record)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, (EditRecords, list, tuple)):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    __hash__ = None  # mutable, like the list it replaces

    def __repr__(self) -> str:
        return f"EditRecords({self._size} records, {self._num_enabled} enabled)"

    def _store(self, row: int, record: EditRecord) -> None:
        line = json.dumps(record.to_json()).encode()
        edit_id, enabled = int(record.edit_id), bool(record.enabled)
        if self._ids[row] != edit_id:
            self._ids_increasing = None
        self._num_enabled += int(enabled) - int(bool(self._enabled[row]))
        self._ids[row], self._enabled[row], self._lines[row] = edit_id, enabled, line

    def _reserve(self, size: int) -> None:
        """Room for `size` rows; capacity doubles, so appending N records copies O(N) in all."""
        if size <= len(self._ids):
            return
        capacity = max(size, 2 * len(self._ids), 16)
        self._ids, self._enabled = _grown(self._ids, capacity), _grown(self._enabled, capacity)
        self._starts, self._ends = _grown(self._starts, capacity), _grown(self._ends, capacity)


class EditIdsByRow:
    """The edit id of each row of an EditRecords, as Python ints (the list it replaces)."""

    def __init__(self, records: EditRecords):
        self._records = records

    def __getitem__(self, row: int) -> int:
        return self._records.id_at(row)

    def __len__(self) -> int:
        return len(self._records)


class EditRowsById:
    """{edit_id: row} over an EditRecords, by binary search: no 1,000,000-entry dict."""

    def __init__(self, records: EditRecords):
        self._records = records

    def get(self, edit_id: int, default: Any = None) -> Any:
        row = self._records.row_of(edit_id)
        return default if row is None else row

    def __getitem__(self, edit_id: int) -> int:
        row = self._records.row_of(edit_id)
        if row is None:
            raise KeyError(edit_id)
        return row

    def __contains__(self, edit_id: object) -> bool:
        return isinstance(edit_id, int) and self._records.row_of(edit_id) is not None

    def __len__(self) -> int:
        return len(self._records)


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False
    return view


def _grown(array: np.ndarray, capacity: int) -> np.ndarray:
    out = np.zeros(capacity, dtype=array.dtype)
    out[:len(array)] = array
    return out


def _row_index(row: int, size: int) -> int:
    row = operator.index(row)
    if not -size <= row < size:
        raise IndexError(f"edit record row {row} out of range (0..{size - 1})")
    return row + size if row < 0 else row


def edit_records_from_jsonl(text: bytes, where: str) -> EditRecords | None:
    """The store of an edits-vN.jsonl text read in one pass (msgspec), or None when it cannot be
    read that way (no msgspec, a line that is not a record as this build writes them, text
    that is not ASCII, blank-looking lines): the caller then reads it line by line, which gives
    the same records or names the bad line."""
    if msgspec is None or not text.isascii():
        return None
    starts, ends = _line_spans(text)
    try:
        heads = _RECORD_HEAD_DECODER.decode_lines(text)
    except msgspec.MsgspecError:
        return None
    if len(heads) != len(starts):  # a whitespace-only line: msgspec skips it, the spans do not
        return None
    try:
        ids = np.fromiter((h.edit_id for h in heads), np.int64, len(heads))
    except OverflowError:
        return None
    enabled = np.fromiter((h.enabled for h in heads), bool, len(heads))
    return EditRecords(text, starts, ends, ids, enabled, where)


def _line_spans(text: bytes) -> tuple[np.ndarray, np.ndarray]:
    """[start, end) of every non-empty line of `text` (ends exclude the newline)."""
    data = np.frombuffer(text, np.uint8)
    newlines = [np.flatnonzero(data[at:at + _SCAN_BLOCK] == 10) + at for at in range(0, len(data), _SCAN_BLOCK)]
    ends = np.concatenate([*newlines, np.array([len(text)], np.int64)]).astype(np.int64)
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    keep = ends > starts
    return starts[keep], ends[keep]


if msgspec is not None:
    class _RecordHead(msgspec.Struct, gc=False):
        """What a load needs of each line now: the id and flag, typed as EditRecord.to_json
        writes them, and that prompt and target are there (the rest is parsed on access).
        Untracked by the garbage collector (it holds no containers): 1,000,000 of them are
        built and dropped ~20% faster."""

        edit_id: int
        prompt: msgspec.Raw
        target: msgspec.Raw
        enabled: bool = True

    _RECORD_HEAD_DECODER = msgspec.json.Decoder(_RecordHead)


def edit_lines(edits: EditRecords | Iterable[EditRecord]) -> bytes:
    """The edits-vN.jsonl text of `edits`: one JSON object per line."""
    if isinstance(edits, EditRecords):
        return edits.to_jsonl()
    return "".join([json.dumps(e.to_json()) + "\n" for e in edits]).encode()
