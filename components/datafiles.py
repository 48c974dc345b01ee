"""Read rows from JSONL, CSV, Parquet files and saved Hugging Face dataset directories.

Every row comes out as (row number, record) or (row number, RowProblem); a problem that spoils
the whole file (missing, unreadable, unknown type) raises DataError naming the file.
Row numbers are 1-based data rows: the CSV header is not counted, and a CSV record whose quoted
field spans lines is still one row.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BAD_BYTES = re.compile("[\udc80-\udcff]")
# Lone surrogates: the bytes escaped by surrogateescape, and "\\ud800"-style JSON escapes. Either would
# crash the UTF-8 writers downstream (train.jsonl, rejects.jsonl), so such a row is rejected here.
NOT_UNICODE = re.compile("[\ud800-\udfff]")
NOT_TEXT = "is this a UTF-8 text CSV file?"
DEFAULT_MAX_ROW_CHARS = 1_000_000
# Where an over-long CSV line was: the parser carries it into whichever record it belongs to.
OVERSIZE = "\x00llmops-oversize-line\x00"
csv.field_size_limit(sys.maxsize)  # the lines feeding the parser are capped instead (capped_lines)


class DataError(ValueError):
    """A problem with the input that stops the stage; the message names file, row and field."""


@dataclass(frozen=True)
class RowProblem:
    field: str
    reason: str
    kind: str = "malformed"  # the counter name in stats and MLflow: empty, unknown-label, undecodable, ...


def _bad_text(value, where: str) -> str | None:
    """The path of the first string (key or value, at any depth) that is not valid Unicode."""
    if isinstance(value, str):
        return where if NOT_UNICODE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and NOT_UNICODE.search(key):
            return where or "<row>"  # the key itself cannot be printed: name its parent
        if found := _bad_text(item, name):
            return found
    return None


def _decoded(record: dict) -> dict | RowProblem:
    """Files are read with surrogateescape so one bad byte rejects one row, not the file."""
    if field := _bad_text(record, ""):
        return RowProblem(field, "undecodable bytes or lone surrogates (not UTF-8 text)", "undecodable")
    return record


def _csv_header(reader, path: Path) -> list[str] | None:
    try:
        header = next(reader)
    except StopIteration:
        return None
    except csv.Error as err:
        raise DataError(f"{path}: row 0 (header): cannot read the CSV header: {err}; {NOT_TEXT}") from err
    header = [h.strip().lstrip("\ufeff") for h in header]
    for column, name in enumerate(header, start=1):
        if NOT_UNICODE.search(name):  # a binary or non-UTF-8 file: no row of it can be read by name
            raise DataError(f"{path}: row 0 (header), column {column}: undecodable bytes (not UTF-8); {NOT_TEXT}")
    return header


def _csv_error(err: csv.Error, first_line: int, reader) -> RowProblem:
    if "unexpected end of data" in str(err):  # strict mode: a quote opened and never closed
        lines = reader.line_num - first_line + 1
        return RowProblem(
            "<row>",
            f"malformed CSV: unterminated quoted field from line {first_line} to the end of the file ({lines} lines)",
        )
    return RowProblem("<row>", f"malformed CSV: {err} (line {reader.line_num})")


def capped_lines(fh, limit: int, marker: str | None = None) -> Iterator[str | None]:
    """The file's lines, none held longer than `limit` characters. An over-long line is read past in chunks; it
    comes out as None, or with a `marker` as the marker and the line's last characters: a CSV record's closing
    quote and its other fields are there, so the parser still finds where the record ends."""
    while line := fh.readline(limit + 1):
        if len(line) <= limit or line.endswith("\n"):
            yield line
            continue
        tail = line
        while not tail.endswith("\n") and (chunk := fh.readline(limit)):
            tail = (tail + chunk)[-limit:]  # never more than twice the limit held
        yield None if marker is None else marker + tail.lstrip('"')  # a cut quote pair must not flip the quoting


def _oversize(limit: int) -> RowProblem:
    return RowProblem("<row>", f"a line over data.max_row_chars={limit} characters; not read", "over-size")


def _read_csv(path: Path, limit: int) -> Iterator[tuple[int, dict | RowProblem]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        # strict: a stray quote is an error on its row; the lenient default would instead let an
        # unclosed quote swallow every following line into one field and keep the row.
        reader = csv.reader(capped_lines(fh, limit, OVERSIZE), strict=True)
        header = _csv_header(reader, path)
        if header is None:
            return
        row = 0
        while True:
            row += 1
            first_line = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield row, _csv_error(err, first_line, reader)
                continue
            if any(OVERSIZE in v for v in values):
                yield row, _oversize(limit)
            elif not any(v.strip() for v in values):
                yield row, RowProblem("<row>", "blank row", "blank")
            elif len(values) != len(header):
                yield row, RowProblem("<row>", f"has {len(values)} fields, the header has {len(header)}")
            else:
                yield row, _decoded(dict(zip(header, values)))


def _read_jsonl(path: Path, limit: int) -> Iterator[tuple[int, dict | RowProblem]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for row, line in enumerate(capped_lines(fh, limit), start=1):
            if line is None:
                yield row, _oversize(limit)
                continue
            if not line.strip():
                yield row, RowProblem("<row>", "blank line", "blank")
                continue
            if BAD_BYTES.search(line):
                yield row, RowProblem("<row>", "undecodable bytes (not UTF-8)", "undecodable")
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                yield row, RowProblem("<row>", f"invalid JSON: {err.msg} at column {err.colno}")
                continue
            if not isinstance(record, dict):
                yield row, RowProblem("<row>", f"expected a JSON object, got {type(record).__name__}")
            else:
                yield row, _decoded(record)  # JSON may escape lone surrogates ("\\ud800")


def _over_long_field(record: dict, limit: int) -> dict | RowProblem:
    """Columnar files arrive a table at a time; a text field over the limit still rejects its row."""
    for field, value in record.items():
        if isinstance(value, str) and len(value) > limit:
            return RowProblem(field, f"over data.max_row_chars={limit} characters", "over-size")
    return record


def _read_parquet(path: Path, limit: int) -> Iterator[tuple[int, dict | RowProblem]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {err}") from err
    for row, record in enumerate(table.to_pylist(), start=1):
        yield row, _over_long_field(record, limit)


def _read_hf_dir(path: Path, limit: int) -> Iterator[tuple[int, dict | RowProblem]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: not a saved Hugging Face dataset: {err}") from err
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for row, record in enumerate(ds, start=1):
        yield row, _over_long_field(record, limit)


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet}


def read_rows(path: Path, max_row_chars: int = DEFAULT_MAX_ROW_CHARS) -> Iterator[tuple[int, dict | RowProblem]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_hf_dir(path, max_row_chars)
        raise DataError(f"{path}: a directory, but not a saved Hugging Face dataset (no dataset_info.json)")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .csv, .parquet)")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err.strerror}") from err
    return reader(path, max_row_chars)
