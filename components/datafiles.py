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
csv.field_size_limit(sys.maxsize)


class DataError(ValueError):
    """A problem with the input that stops the stage; the message names file, row and field."""


@dataclass(frozen=True)
class RowProblem:
    field: str
    reason: str
    kind: str = "malformed"  # the counter name in stats and MLflow: empty, unknown-label, undecodable, ...


def _decoded(record: dict) -> dict | RowProblem:
    """Files are read with surrogateescape so one bad byte rejects one row, not the file."""
    for key, value in record.items():
        if isinstance(value, str) and BAD_BYTES.search(value):
            return RowProblem(str(key), "undecodable bytes (not UTF-8)", "undecodable")
    return record


def _read_csv(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            raise DataError(f"{path}: cannot read the CSV header: {err}") from err
        header = [h.strip().lstrip("\ufeff") for h in header]
        row = 0
        while True:
            row += 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield row, RowProblem("<row>", f"malformed CSV: {err}")
                continue
            if not any(v.strip() for v in values):
                yield row, RowProblem("<row>", "blank row", "blank")
            elif len(values) != len(header):
                yield row, RowProblem("<row>", f"has {len(values)} fields, the header has {len(header)}")
            else:
                yield row, _decoded(dict(zip(header, values)))


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as fh:
        for row, line in enumerate(fh, start=1):
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
                yield row, record


def _read_parquet(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(f"{path}: not a readable Parquet file: {err}") from err
    for row, record in enumerate(table.to_pylist(), start=1):
        yield row, record


def _read_hf_dir(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"{path}: not a saved Hugging Face dataset: {err}") from err
    if isinstance(ds, DatasetDict):
        ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
    for row, record in enumerate(ds, start=1):
        yield row, record


READERS = {".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".parquet": _read_parquet}


def read_rows(path: Path) -> Iterator[tuple[int, dict | RowProblem]]:
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _read_hf_dir(path)
        raise DataError(f"{path}: a directory, but not a saved Hugging Face dataset (no dataset_info.json)")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type {path.suffix!r} (use .jsonl, .csv, .parquet)")
    try:
        with open(path, "rb"):
            pass
    except OSError as err:
        raise DataError(f"{path}: cannot be read: {err.strerror}") from err
    return reader(path)
