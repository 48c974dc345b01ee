"""Data prep: read, validate, reject, de-duplicate, split and render with the base model's chat template.

Run as: `llmops stage prepare-data [data.key=value]` (alone, on a local run's base model), or a task of
`llmops run`.

Outputs (in out_dir): train.jsonl, eval.jsonl, rejects.jsonl (every dropped row with file, row,
field and reason), labels.json for label tasks, and stats.json. kept + rejected == rows read.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np

from components import literal_text, reports
from components.artifacts import PreparedData, record_config
from components.config import DEMO_DATA, DataSection
from components.datafiles import DataError, RowProblem, read_rows
from components.jsonl import write_jsonl
from components.literal_text import encoded, fill, holds_special, special_strings, with_placeholders
from components.prompt_contract import label_prefix, make_contract
from components.util import console, file_sha256, heading, text_sha256, tree_sha256, write_json

LABEL_FIELDS = ("label", "category", "intent")


def locate_source(cfg: DataSection, work_dir: Path) -> Path:
    if cfg.path == DEMO_DATA:
        from components.demo_data import write_demo

        return write_demo(Path(work_dir) / "demo")
    if cfg.path.startswith("s3://"):
        from components.storage import download_file

        return download_file(cfg.path, Path(work_dir) / "source" / Path(cfg.path).name)
    return Path(cfg.path).expanduser()


def detect_format(cfg: DataSection, columns: set[str], source: Path, row: int = 1) -> tuple[str, str | None]:
    """Returns (format, label field)."""
    label_field = cfg.label_field or next((f for f in LABEL_FIELDS if f in columns), None)
    if cfg.format != "auto":
        fmt = cfg.format
    elif "messages" in columns:
        fmt = "chat"
    elif "instruction" in columns:
        fmt = "alpaca"
    elif cfg.text_field in columns and label_field:
        fmt = "label"
    else:
        raise DataError(
            f"{source}: cannot tell the format from columns {sorted(columns)}; "
            f"expected messages, instruction/output, or {cfg.text_field}/label"
        )
    required = {"chat": ["messages"], "alpaca": ["instruction"], "label": [cfg.text_field, label_field or "label"]}
    missing = [c for c in required[fmt] if c not in columns]
    if fmt == "alpaca" and not ({"output", "instances"} & columns):
        missing.append("output")
    if missing:
        raise DataError(
            f"{source}: row {row}: missing field(s) {missing} for format {fmt!r} (columns: {sorted(columns)})"
        )
    return fmt, label_field


def load_labels(cfg: DataSection, source: Path) -> list[str] | None:
    if cfg.labels:
        return list(cfg.labels)
    beside = (PreparedData.labels_file, "categories.json")  # as prepare_data and demo-data write it, or BANKING77's
    candidates = [Path(cfg.labels_file)] if cfg.labels_file else [source.parent / n for n in beside]
    for path in candidates:
        if path.is_file():
            labels = json.loads(path.read_text())
            if not (isinstance(labels, list) and all(isinstance(x, str) and x for x in labels)):
                raise DataError(f"{path}: expected a JSON list of non-empty label strings")
            console.print(f"labels from {path} ({len(labels)})")
            return labels
    if cfg.labels_file:
        raise DataError(f"{cfg.labels_file}: labels file not found")
    return None


def reject(source: Path, row: int, problem: RowProblem) -> dict:
    return {"file": str(source), "row": row, "field": problem.field, "kind": problem.kind, "reason": problem.reason}


def _text(record: dict, field: str) -> str | RowProblem:
    value = record.get(field)
    if value is None or (isinstance(value, str) and not value.strip()):
        return RowProblem(field, "empty field", "empty")
    return str(value).strip()


def label_prompt(text: str, labels: list[str], with_list: bool, instruction: str) -> str:
    return label_prefix(labels, with_list, instruction) + text


def lists_labels(cfg: DataSection, labels: list[str] | None) -> bool:
    if not labels:
        return False
    return len(labels) <= cfg.label_list_max if cfg.label_list_in_prompt == "auto" else cfg.label_list_in_prompt


def to_examples(record: dict, fmt: str, cfg: DataSection, labels, label_field) -> list[tuple[list, str]] | RowProblem:
    """One record becomes (prompt messages, answer) pairs; Alpaca seed tasks carry several instances."""
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if fmt == "label":
        text, label = _text(record, cfg.text_field), _text(record, label_field)
        for value in (text, label):
            if isinstance(value, RowProblem):
                return value
        if labels is not None and label not in labels:
            return RowProblem(label_field, f"unknown label {label!r}", "unknown-label")
        user = label_prompt(text, labels or [], lists_labels(cfg, labels), cfg.label_instruction)
        return [(system + [{"role": "user", "content": user}], label)]
    if fmt == "alpaca":
        instruction = _text(record, "instruction")
        if isinstance(instruction, RowProblem):
            return instruction
        instances = record.get("instances") or [{"input": record.get("input", ""), "output": record.get("output")}]
        if not isinstance(instances, list) or not all(isinstance(i, dict) for i in instances):
            return RowProblem("instances", "expected a list of {input, output} objects")
        pairs = []
        for inst in instances:
            output = _text(inst, "output")
            if isinstance(output, RowProblem):
                return output
            extra = str(inst.get("input") or "").strip()
            user = f"{instruction}\n\n{extra}" if extra else instruction
            pairs.append((system + [{"role": "user", "content": user}], output))
        return pairs
    messages = record.get("messages")
    if not isinstance(messages, list) or len(messages) < 2:
        return RowProblem("messages", "expected a list of at least two {role, content} messages")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or msg.get("role") not in ("system", "user", "assistant"):
            return RowProblem(f"messages[{i}].role", "role must be system, user or assistant")
        if not isinstance(msg.get("content"), str) or not msg["content"].strip():
            return RowProblem(f"messages[{i}].content", "empty field", "empty")
    if messages[-1]["role"] != "assistant":
        return RowProblem(f"messages[{len(messages) - 1}].role", "the last message must be the assistant's answer")
    prompt = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
    if prompt[0]["role"] != "system":
        prompt = system + prompt
    return [(prompt, messages[-1]["content"].strip())]


def render(tok, prompt_msgs: list, answer: str, specials: list[str] = ()) -> tuple[str, str, list | None, list | None]:
    """Prompt up to the generation prompt; completion = answer and the end-of-turn (EOS) token.

    A row whose text holds a special-token string also gets its token ids, with that text encoded literally
    (components/literal_text.py); other rows get None and are encoded from their strings.
    """
    literal = holds_special([m["content"] for m in prompt_msgs] + [answer], specials)
    msgs, answer_in, texts = with_placeholders(prompt_msgs, answer) if literal else (prompt_msgs, answer, [])
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": answer_in}], tokenize=False)
    if not full.startswith(prompt):
        raise DataError("the chat template does not extend the prompt with the answer; cannot mask the prompt")
    completion = full[len(prompt) :]
    cut = completion.rfind(tok.eos_token)  # the template's own EOS: a text's is a placeholder by now
    completion = completion[: cut + len(tok.eos_token)] if cut >= 0 else completion + tok.eos_token
    if not literal:
        return prompt, completion, None, None
    ids = (literal_text.encode(tok, prompt, texts), literal_text.encode(tok, completion, texts))
    return fill(prompt, texts), fill(completion, texts), *ids


def _stats(values: list[int]) -> dict:
    arr = np.asarray(values or [0])
    return {
        "min": int(arr.min()),
        "mean": round(float(arr.mean()), 2),
        "p50": int(np.percentile(arr, 50)),
        "p95": int(np.percentile(arr, 95)),
        "max": int(arr.max()),
    }


def collect(cfg: DataSection, source: Path, tok) -> tuple[list[dict], list[dict], dict]:
    """Validate and render every row. Returns (kept examples, rejects, info)."""
    rows = list(read_rows(source, cfg.max_row_chars))
    fmt, label_field, labels = None, None, None
    kept, rejects = [], []
    name = source.name
    for row, record in rows:
        if isinstance(record, RowProblem):
            rejects.append(reject(source, row, record))
            continue
        if fmt is None:
            fmt, label_field = detect_format(cfg, set(record), source, row)
            labels = load_labels(cfg, source) if fmt == "label" else None
        result = to_examples(record, fmt, cfg, labels, label_field)
        if isinstance(result, RowProblem):
            rejects.append(reject(source, row, result))
            continue
        for k, (prompt_msgs, answer) in enumerate(result):
            ex_id = f"{name}:{row}" + (f".{k + 1}" if len(result) > 1 else "")
            kept.append({"id": ex_id, "row": row, "messages": prompt_msgs, "answer": answer})
    if fmt == "label" and labels is None:
        labels = sorted({ex["answer"] for ex in kept})
    return kept, rejects, {"format": fmt, "labels": labels, "label_field": label_field, "rows_read": len(rows)}


def tokenize_and_filter(kept: list[dict], rejects: list[dict], cfg: DataSection, tok, source: Path) -> list[dict]:
    specials = special_strings(tok)
    for ex in kept:
        ex["prompt"], ex["completion"], p_ids, c_ids = render(tok, ex.pop("messages"), ex["answer"], specials)
        if p_ids is not None:
            ex["prompt_ids"], ex["completion_ids"] = p_ids, c_ids
    for ex, p, c in zip(kept, *encoded(tok, kept)):
        ex["prompt_tokens"], ex["completion_tokens"] = len(p), len(c)
    if literal := sum("prompt_ids" in e for e in kept):
        console.print(f"{literal} rows hold special-token strings in their text: encoded as text, not as control")
    out, seen = [], {}
    for ex in kept:
        total = ex["prompt_tokens"] + ex["completion_tokens"]
        key = text_sha256(ex["prompt"] + "\x00" + ex["completion"])
        if total > cfg.max_tokens:
            reason = f"over-length: {total} tokens > data.max_tokens={cfg.max_tokens}"
            rejects.append(reject(source, ex["row"], RowProblem("<rendered>", reason, "over-length")))
        elif key in seen:
            rejects.append(reject(source, ex["row"], RowProblem("<row>", f"duplicate of row {seen[key]}", "duplicate")))
        else:
            seen[key] = ex["row"]
            out.append(ex)
    return out


def split(examples: list[dict], cfg: DataSection) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, eval, validation): eval is for the evaluate stage only; validation steers training."""
    order = list(range(len(examples)))
    random.Random(cfg.seed).shuffle(order)
    n_eval = min(cfg.max_eval_examples, max(1, round(cfg.eval_fraction * len(examples))))
    n_val = min(cfg.val_examples, max(0, len(examples) - n_eval - 1))
    eval_set = [examples[i] for i in sorted(order[:n_eval])]
    val = [examples[i] for i in sorted(order[n_eval : n_eval + n_val])]
    train = [examples[i] for i in sorted(order[n_eval + n_val :])]
    if cfg.max_train_examples:
        train = train[: cfg.max_train_examples]
    return train, eval_set, val


def run(cfg: DataSection, base_dir: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer

    from components.tracking import stage_run

    heading("prepare data")
    out_dir = Path(out_dir)
    out = PreparedData(out_dir)
    record_config(out_dir, "prepare_data", cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = locate_source(cfg, out_dir)
    tok = AutoTokenizer.from_pretrained(base_dir)
    with stage_run("prepare_data", cfg.model_dump()) as tracker:
        kept, rejects, info = collect(cfg, source, tok)
        examples = tokenize_and_filter(kept, rejects, cfg, tok, source)
        write_jsonl(out.rejects_file, rejects)
        reasons = Counter(r["kind"] for r in rejects)
        if len(examples) < 2:  # the counts still go out, so the user sees what was rejected and why
            write_json(
                out.stats_file,
                {
                    "source": str(source),
                    "rows_read": info["rows_read"],
                    "examples": len(examples),
                    "rejected": len(rejects),
                    "reject_reasons": dict(reasons),
                },
            )
            raise DataError(
                f"{source}: nothing usable: {info['rows_read']} rows read, {len(examples)} kept, "
                f"{len(rejects)} rejected ({dict(reasons)}); see {out.rejects_file}"
            )
        train, eval_set, val = split(examples, cfg)
        write_jsonl(out.train_file, train)
        write_jsonl(out.eval_file, eval_set)
        if val:
            write_jsonl(out.val_file, val)
        if info["labels"]:
            write_json(out.labels_file, info["labels"])
        prefix = label_prefix(info["labels"] or [], lists_labels(cfg, info["labels"]), cfg.label_instruction)
        write_json(
            out.contract_file,
            make_contract(
                info["format"], cfg.system_prompt, prefix if info["format"] == "label" else "", info["labels"]
            ),
        )
        stats = {
            "source": str(source),
            "source_sha256": file_sha256(source) if source.is_file() else tree_sha256(source),
            "format": info["format"],
            "rows_read": info["rows_read"],
            "examples": len(examples),
            "rejected": len(rejects),
            "reject_reasons": dict(reasons),
            "train": len(train),
            "eval": len(eval_set),
            "validation": len(val),
            "label_list_in_prompt": lists_labels(cfg, info["labels"]),
            "rows_kept": len({e["row"] for e in examples}),  # an Alpaca row with several instances is one row
            "num_labels": len(info["labels"] or []),
            "prompt_tokens": _stats([e["prompt_tokens"] for e in examples]),
            "completion_tokens": _stats([e["completion_tokens"] for e in examples]),
            "total_tokens": _stats([e["prompt_tokens"] + e["completion_tokens"] for e in examples]),
        }
        splits = (out.train_file, out.eval_file, out.val_file)
        stats["prepared_sha256"] = text_sha256("".join(file_sha256(path) for path in splits if path.exists()))
        reports.Data.model_validate(stats).write(out.stats_file)  # checked where it crosses
        tracker.log_stats(stats, prefix="data")
        tracker.set_tags(
            {
                "data.source_sha256": stats["source_sha256"],
                "data.prepared_sha256": stats["prepared_sha256"],
                "data.format": stats["format"],
            }
        )
        tracker.log_artifact(out.rejects_file)
    console.print(
        f"{stats['rows_read']} rows → {len(train)} train, {len(eval_set)} eval, {len(rejects)} rejected "
        f"{dict(reasons) or ''}"
    )
    return stats
