"""Bad input never sinks data prep silently: each bad row is a counted rejection naming file, row, field and
reason, and a file that cannot be read at all stops the stage with a DataError naming the file.

Every case checks the books from what prepare_data wrote: stats.json and rejects.jsonl account for every
input row (kept + rejected == rows in the file), and train.jsonl + eval.jsonl hold exactly the kept ones.
"""

import gzip
import json
import random

import pytest

from components.config import DataSection
from components.datafiles import DataError
from components.jsonl import read_jsonl
from components.stages import prepare_data

pytestmark = pytest.mark.unit
LABELS = ["card_lost", "refund_request"]
GOOD = [
    ("I lost my card", "card_lost"),
    ("refund my order", "refund_request"),
    ("where is my refund", "refund_request"),
]
HUGE = " ".join(f"word{i % 997}" for i in range(200_000))  # ~1.7 MB in one field


def csv_bytes(*lines: str | bytes) -> bytes:
    return b"text,label\n" + b"".join((x if isinstance(x, bytes) else x.encode()) + b"\n" for x in lines)


def jsonl_bytes(*records) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


def good_csv(n: int = 3) -> list[str]:
    return [f"{text},{label}" for text, label in GOOD[:n]]


def good_json(n: int = 3) -> list[dict]:
    return [{"text": text, "label": label} for text, label in GOOD[:n]]


def chat(*turns) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in turns]}


GOOD_CHAT = [
    chat(("user", "hi"), ("assistant", "hello")),
    chat(("user", "card gone"), ("assistant", "card_lost")),
    chat(("user", "refund"), ("assistant", "refund_request")),
]
GOOD_ALPACA = [
    {"instruction": "Say yes", "input": "", "output": "yes"},
    {"instruction": "Say no", "output": "no"},
    {"instruction": "Count", "input": "1 2", "output": "2"},
]

# id, file name, bytes, rows in the file, expected rejects [(row, field, kind)]
CASES = [
    ("csv-empty-text", "d.csv", csv_bytes(*good_csv(), ",card_lost"), 4, [(4, "text", "empty")]),
    ("csv-empty-label", "d.csv", csv_bytes(*good_csv(), "my card is gone,"), 4, [(4, "label", "empty")]),
    (
        "csv-unknown-label",
        "d.csv",
        csv_bytes(*good_csv(), "my card is gone,gift_cards"),
        4,
        [(4, "label", "unknown-label")],
    ),
    (
        "csv-over-length",
        "d.csv",
        csv_bytes(*good_csv(), "card " * 400 + ",card_lost"),
        4,
        [(4, "<rendered>", "over-length")],
    ),
    ("csv-duplicate", "d.csv", csv_bytes(*good_csv(), good_csv()[0]), 4, [(4, "<row>", "duplicate")]),
    ("csv-blank-row", "d.csv", csv_bytes(good_csv()[0], "", *good_csv()[1:]), 4, [(2, "<row>", "blank")]),
    ("csv-field-count", "d.csv", csv_bytes(*good_csv(), "a,b,c"), 4, [(4, "<row>", "malformed")]),
    (
        "csv-stray-quote",
        "d.csv",
        csv_bytes(good_csv()[0], '"x"y,card_lost', *good_csv()[1:]),
        4,
        [(2, "<row>", "malformed")],
    ),
    (
        "csv-undecodable",
        "d.csv",
        csv_bytes(*good_csv(), b"bad \xff\xfe bytes,card_lost"),
        4,
        [(4, "text", "undecodable")],
    ),
    (
        "csv-huge-row",
        "d.csv",
        csv_bytes(good_csv()[0], f"{HUGE},card_lost", *good_csv()[1:]),
        4,
        [(2, "<row>", "over-size")],  # over data.max_row_chars: rejected before it is read whole
    ),
    (
        "csv-quoted-newlines",
        "d.csv",
        csv_bytes('"line one\nline two",card_lost', *good_csv(), '"a\nb",gift_cards'),
        5,
        [(5, "label", "unknown-label")],
    ),  # rows are records, not lines: the bad one is row 5 on lines 7-8
    ("jsonl-blank-line", "d.jsonl", jsonl_bytes(good_json()[0], b"", *good_json()[1:]), 4, [(2, "<row>", "blank")]),
    ("jsonl-invalid-json", "d.jsonl", jsonl_bytes(*good_json(), b"{not json"), 4, [(4, "<row>", "malformed")]),
    ("jsonl-not-an-object", "d.jsonl", jsonl_bytes(*good_json(), b"[1, 2]"), 4, [(4, "<row>", "malformed")]),
    (
        "jsonl-undecodable",
        "d.jsonl",
        jsonl_bytes(*good_json(), b'{"text": "\xc3\x28", "label": "card_lost"}'),
        4,
        [(4, "<row>", "undecodable")],
    ),
    (
        "jsonl-lone-surrogate",
        "d.jsonl",
        jsonl_bytes(*good_json(), b'{"text": "bad \\ud800", "label": "card_lost"}'),
        4,
        [(4, "text", "undecodable")],
    ),
    (
        "jsonl-null-label",
        "d.jsonl",
        jsonl_bytes(*good_json(), {"text": "lost it", "label": None}),
        4,
        [(4, "label", "empty")],
    ),
    ("jsonl-missing-text", "d.jsonl", jsonl_bytes(*good_json(), {"label": "card_lost"}), 4, [(4, "text", "empty")]),
    (
        "jsonl-huge-line",
        "d.jsonl",
        jsonl_bytes(*good_json(), {"text": HUGE, "label": "card_lost"}),
        4,
        [(4, "<row>", "over-size")],
    ),
    ("chat-not-a-list", "c.jsonl", jsonl_bytes(*GOOD_CHAT, {"messages": "hi"}), 4, [(4, "messages", "malformed")]),
    (
        "chat-bad-role",
        "c.jsonl",
        jsonl_bytes(*GOOD_CHAT, chat(("user", "q"), ("bot", "a"))),
        4,
        [(4, "messages[1].role", "malformed")],
    ),
    (
        "chat-empty-content",
        "c.jsonl",
        jsonl_bytes(*GOOD_CHAT, chat(("user", "q"), ("assistant", " "))),
        4,
        [(4, "messages[1].content", "empty")],
    ),
    (
        "chat-no-answer",
        "c.jsonl",
        jsonl_bytes(*GOOD_CHAT, chat(("user", "q"), ("user", "again"))),
        4,
        [(4, "messages[1].role", "malformed")],
    ),
    (
        "chat-surrogate-deep",
        "c.jsonl",
        jsonl_bytes(
            *GOOD_CHAT, b'{"messages": [{"role": "user", "content": "\\udc80"}, {"role": "assistant", "content": "a"}]}'
        ),
        4,
        [(4, "messages[0].content", "undecodable")],
    ),
    (
        "alpaca-empty-instruction",
        "a.jsonl",
        jsonl_bytes(*GOOD_ALPACA, {"instruction": "", "output": "x"}),
        4,
        [(4, "instruction", "empty")],
    ),
    (
        "alpaca-empty-output",
        "a.jsonl",
        jsonl_bytes(*GOOD_ALPACA, {"instruction": "Say", "output": None}),
        4,
        [(4, "output", "empty")],
    ),
]


def prep(tmp_path, tiny_base, name: str, raw: bytes, **cfg):
    source = tmp_path / name
    source.write_bytes(raw)
    out = tmp_path / "out"
    prepare_data.run(DataSection(path=str(source), **{"labels": LABELS, "max_tokens": 256, **cfg}), tiny_base, out)
    return source, out


def assert_every_row_accounted(source, out, rows: int) -> tuple[dict, list[dict]]:
    """kept + rejected == rows in the file, by stats.json, by rejects.jsonl and by the written splits."""
    stats = json.loads((out / "stats.json").read_text())
    rejects = read_jsonl(out / "rejects.jsonl")
    kept = read_jsonl(out / "train.jsonl") + read_jsonl(out / "eval.jsonl")
    assert stats["rows_read"] == rows
    assert stats["examples"] + stats["rejected"] == rows
    assert len(rejects) == stats["rejected"] == sum(stats["reject_reasons"].values())
    assert len(kept) == stats["examples"]
    assert sorted([ex["row"] for ex in kept] + [r["row"] for r in rejects]) == list(range(1, rows + 1))
    for r in rejects:
        assert r["file"] == str(source) and r["field"] and r["reason"] and r["kind"]
    return stats, rejects


@pytest.mark.parametrize("name, raw, rows, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_bad_row_is_one_counted_rejection(tmp_path, tiny_base, name, raw, rows, expected):
    source, out = prep(tmp_path, tiny_base, name, raw)
    _, rejects = assert_every_row_accounted(source, out, rows)
    assert [(r["row"], r["field"], r["kind"]) for r in rejects] == expected


def test_many_bad_rows_mixed_with_good_ones(tmp_path, tiny_base):
    bad = ["", ",card_lost", "x,", "x,gift_cards", "a,b,c", '"x"y,card_lost', good_csv()[0], f"{HUGE},card_lost"]
    lines = [line for pair in zip(good_csv(3) + ["lost again,card_lost"] * 5, bad) for line in pair]
    source, out = prep(tmp_path, tiny_base, "mixed.csv", csv_bytes(*lines))
    stats, rejects = assert_every_row_accounted(source, out, 16)
    assert stats["examples"] == 4  # the three good rows and the first "lost again" (its repeats are duplicates)
    assert stats["reject_reasons"] == {
        "blank": 1,
        "empty": 2,
        "unknown-label": 1,
        "malformed": 2,
        "duplicate": 5,
        "over-size": 1,
    }


def test_unterminated_quote_is_one_rejection_that_names_the_swallowed_lines(tmp_path, tiny_base):
    source, out = prep(
        tmp_path,
        tiny_base,
        "q.csv",
        csv_bytes(*good_csv(), '"never closed,card_lost', "more,card_lost", "and more,refund_request"),
    )
    _, rejects = assert_every_row_accounted(source, out, 4)
    assert [(r["row"], r["field"], r["kind"]) for r in rejects] == [(4, "<row>", "malformed")]
    assert "unterminated quoted field from line 5 to the end of the file (3 lines)" in rejects[0]["reason"]


@pytest.mark.parametrize(
    "name, raw, rows",
    [
        ("bad.csv", csv_bytes(",card_lost", "x,gift_cards", ",", "a,b,c", b"\xff,card_lost"), 5),
        ("bad.jsonl", jsonl_bytes(b"{nope", b"[]", {"text": "", "label": "card_lost"}, b"\xfe\xff"), 4),
    ],
)
def test_all_bad_file_stops_with_a_summary_and_writes_every_reject(tmp_path, tiny_base, name, raw, rows):
    with pytest.raises(DataError) as err:
        prep(tmp_path, tiny_base, name, raw)
    assert f"{tmp_path / name}: nothing usable: {rows} rows read, 0 kept, {rows} rejected" in str(err.value)
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert sorted(r["row"] for r in rejects) == list(range(1, rows + 1))


def binary_lines(n: int) -> bytes:
    """n lines of random bytes (no line breaks inside), so the row count is known."""
    rng = random.Random(0)
    return b"\n".join(bytes(b for b in rng.randbytes(300) if b not in b"\r\n") for _ in range(n)) + b"\n"


@pytest.mark.parametrize(
    "name, raw, message",
    [
        ("random.csv", binary_lines(8), "row 0 (header)"),
        ("gzipped.csv", gzip.compress(csv_bytes(*good_csv()), mtime=0), "row 0 (header)"),
        ("utf16.csv", csv_bytes(*good_csv()).decode().encode("utf-16"), "row 0 (header), column 1: undecodable bytes"),
        ("random.parquet", binary_lines(8), "not a readable Parquet file"),
        ("random.jsonl", binary_lines(8), "nothing usable: 8 rows read, 0 kept, 8 rejected"),
    ],
)
def test_binary_file_is_a_clear_error_naming_the_file(tmp_path, tiny_base, name, raw, message):
    with pytest.raises(DataError) as err:
        prep(tmp_path, tiny_base, name, raw)
    assert str(err.value).startswith(f"{tmp_path / name}: ") and message in str(err.value)
    if name.endswith(".csv"):
        assert "is this a UTF-8 text CSV file?" in str(err.value)


def test_binary_jsonl_rejects_every_line_with_a_reason(tmp_path, tiny_base):
    with pytest.raises(DataError):
        prep(tmp_path, tiny_base, "random.jsonl", binary_lines(8))
    rejects = read_jsonl(tmp_path / "out" / "rejects.jsonl")
    assert [r["row"] for r in rejects] == list(range(1, 9))
    assert {r["kind"] for r in rejects} <= {"undecodable", "malformed"} and all(r["reason"] for r in rejects)


def test_binary_rows_inside_a_text_csv_are_rejected_alone(tmp_path, tiny_base):
    source, out = prep(
        tmp_path, tiny_base, "d.csv", csv_bytes(*good_csv(), binary_lines(1).rstrip(b"\n") + b",card_lost")
    )
    _, rejects = assert_every_row_accounted(source, out, 4)
    assert [(r["row"], r["kind"]) for r in rejects] in ([(4, "undecodable")], [(4, "malformed")])


def test_alpaca_instances_of_the_wrong_type_are_a_rejection(tmp_path, tiny_base):
    raw = jsonl_bytes(*GOOD_ALPACA, {"instruction": "Count", "instances": "1 2 3"})
    source, out = prep(tmp_path, tiny_base, "a.jsonl", raw)
    _, rejects = assert_every_row_accounted(source, out, 4)
    assert [(r["row"], r["field"]) for r in rejects] == [(4, "instances")]
