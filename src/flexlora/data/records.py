"""Reading instruction records from JSON / JSONL files, with file and line for every problem.

A bad record (not an object, a missing or empty instruction or output, a field of the wrong
type, a line that is not JSON) is reported as `file:line: reason` and either skipped or
turned into a DataError, per `data.bad_records`. All of it happens while loading, before any
training, so a run never stops halfway because of its data.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from flexlora.data.types import DataError, Example

log = logging.getLogger(__name__)

# Field names accepted for each part of a record (Alpaca style first, then Dolly style).
INSTRUCTION_FIELDS = ("instruction",)
INPUT_FIELDS = ("input", "context")
OUTPUT_FIELDS = ("output", "response")


class Issues:
    """Collects load-time problems; with policy 'error' the first bad record raises."""

    def __init__(self, policy: str = "skip"):
        if policy not in ("skip", "error"):
            raise ValueError(f"bad_records policy must be skip or error, got {policy!r}")
        self.policy = policy
        self.lines: list[str] = []

    def bad_record(self, reason: str, path, line: int | None) -> None:
        if self.policy == "error":
            raise DataError(f"{reason} (data.bad_records=skip skips such records)", str(path), line)
        self.lines.append(str(DataError(reason, str(path), line)))

    def note(self, message: str) -> None:
        """A problem that is not a record's fault (e.g. a client left without training data)."""
        self.lines.append(message)

    def error(self, message: str, path) -> DataError:
        """An error for data left with nothing to use, naming how many problems loading found and the first."""
        why = f" ({len(self.lines)} data issue(s), first: {self.lines[0]})" if self.lines else ""
        return DataError(f"{message}{why}", None if path is None else str(path))

    def log_summary(self, name: str) -> None:
        if self.lines:
            log.warning("%s: %d data issue(s), first: %s", name, len(self.lines), self.lines[0])


@dataclass(frozen=True)
class Record:
    """One raw JSON object and where it came from."""

    path: str
    line: int
    data: object
    index: int | None = None  # 1-based position in a JSON list (files are often one long line)


def _line_of(text: str, pos: int, cache: list[int]) -> int:
    """1-based line of text[pos]; cache = [last_pos, last_line] makes forward scans linear."""
    last_pos, last_line = cache
    if pos < last_pos:
        last_pos, last_line = 0, 1
    line = last_line + text.count("\n", last_pos, pos)
    cache[:] = [pos, line]
    return line


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def read_json_array(path: Path, issues: Issues) -> list[Record]:
    """Elements of a JSON list file, each with the line it starts on. A syntax error keeps the
    elements before it and reports the rest of the file as skipped."""
    text = path.read_text(encoding="utf-8")
    decoder = json.JSONDecoder()
    cache = [0, 1]
    i = _skip_ws(text, 0)
    if not text[i : i + 1] == "[":
        if i >= len(text):
            return []  # an empty file is an empty client, reported by the caller
        issues.bad_record("expected a JSON list of records", path, _line_of(text, i, cache))
        return []
    records = []
    i = _skip_ws(text, i + 1)
    if text[i : i + 1] == "]":
        return records
    while True:
        line = _line_of(text, i, cache)
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            issues.bad_record(f"invalid JSON ({e.msg}); the rest of the file is skipped", path, line)
            return records
        records.append(Record(str(path), line, obj, len(records) + 1))
        i = _skip_ws(text, i)
        if text[i : i + 1] == ",":
            i = _skip_ws(text, i + 1)
            continue
        if text[i : i + 1] == "]":
            return records
        issues.bad_record("invalid JSON (expected ',' or ']'); the rest of the file is skipped", path, _line_of(text, i, cache))
        return records


def read_jsonl(path: Path, issues: Issues) -> list[Record]:
    records = []
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                records.append(Record(str(path), number, json.loads(raw)))
            except json.JSONDecodeError as e:
                issues.bad_record(f"invalid JSON ({e.msg})", path, number)
    return records


def read_records(path: Path, issues: Issues) -> list[Record]:
    """A .jsonl file is one record a line; anything else must be a JSON list (a .json file
    whose first character is '{' is read as JSONL too, a common mislabelling)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found", str(path))
    if path.suffix == ".jsonl":
        return read_jsonl(path, issues)
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    return read_jsonl(path, issues) if head.startswith("{") else read_json_array(path, issues)


def _field(obj: dict, names: tuple[str, ...]):
    for name in names:
        if name in obj:
            return name, obj[name]
    return names[0], None


def report(issues: Issues, record: Record, reason: str) -> None:
    prefix = f"record {record.index}: " if record.index is not None else ""
    issues.bad_record(prefix + reason, record.path, record.line)


def to_example(record: Record, issues: Issues, category: str = "") -> Example | None:
    """An Example, or None (reported) if the record is unusable."""
    obj = record.data
    if not isinstance(obj, dict):
        report(issues, record, f"record is a {type(obj).__name__}, not a JSON object")
        return None
    values = {}
    for part, names, required in (
        ("instruction", INSTRUCTION_FIELDS, True),
        ("input", INPUT_FIELDS, False),
        ("output", OUTPUT_FIELDS, True),
    ):
        name, value = _field(obj, names)
        if value is None:
            if required:
                report(issues, record, f"missing field '{'/'.join(names)}'")
                return None
            value = ""
        if not isinstance(value, str):
            report(issues, record, f"field '{name}' is a {type(value).__name__}, expected a string")
            return None
        if required and not value.strip():
            report(issues, record, f"empty field '{name}'")
            return None
        values[part] = value
    cat = obj.get("category", category)
    if not isinstance(cat, str):
        report(issues, record, f"field 'category' is a {type(cat).__name__}, expected a string")
        return None
    return Example(values["instruction"], values["input"], values["output"], cat)
