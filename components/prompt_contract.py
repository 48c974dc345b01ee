"""The prompt contract: how training framed each example, so serving can frame a bare message the same way.

A label task trains on a system prompt and a user turn that may carry an instruction and the label list
before the message. An application sends the message alone. The contract travels with the data and the
registered version (`prompt_contract.json`), and the merged model's chat template applies it: a request
without a system message gets the trained one, and a user turn without the trained prefix gets it. TGI,
vLLM, `llmops serve`, `llmops chat`, `chat_model(...)` and plain OpenAI clients all render through that
template (TGI reads it from tokenizer_config.json), so each of them asks the model what it was trained on.
A request that already carries the prefix or its own system message is left as it is.
"""

from __future__ import annotations

import json
from pathlib import Path

from components.artifacts import CONTRACT_FILE

ANSWER_FORMATS = {"label": "one label from labels, then the end of the turn", "text": "free text"}


def label_prefix(labels: list[str], with_list: bool, instruction: str) -> str:
    """What precedes the message in a label task's user turn ("" when the message stands alone)."""
    if with_list:
        instruction = f"Classify the message into one of these labels: {', '.join(labels)}\nReply with the label only."
    return f"{instruction}\n\nMessage: " if instruction else ""


def make_contract(fmt: str, system_prompt: str, user_prefix: str, labels: list[str] | None) -> dict:
    return {
        "format": fmt,
        "system_prompt": system_prompt,
        "user_prefix": user_prefix,
        "labels": labels or [],
        "answer_format": ANSWER_FORMATS["label" if fmt == "label" else "text"],
    }


def read_contract(directory: Path) -> dict | None:
    path = Path(directory) / CONTRACT_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _literal(text: str) -> str:
    # JSON escapes (\n, \", \\) read the same in Jinja2 and in minijinja (TGI's template engine).
    return json.dumps(text, ensure_ascii=False)


def wrap_template(template: str, contract: dict) -> str:
    """`template` preceded by a rewrite of `messages` that applies the contract.

    Only constructs that Jinja2 (transformers, vLLM) and minijinja (TGI) share are used: namespace,
    slicing and `is string`, no Python string methods.
    """
    system, prefix = contract.get("system_prompt") or "", contract.get("user_prefix") or ""
    if not system and not prefix:
        return template
    return (
        "{#- llmops prompt contract: a bare message is framed the way training framed it -#}\n"
        f"{{%- set llmops_system = {_literal(system)} -%}}\n"
        f"{{%- set llmops_prefix = {_literal(prefix)} -%}}\n"
        "{%- set llmops = namespace(messages=[]) -%}\n"
        "{%- if llmops_system and (messages | length == 0 or messages[0]['role'] != 'system') -%}\n"
        "{%- set llmops.messages = [{'role': 'system', 'content': llmops_system}] -%}\n"
        "{%- endif -%}\n"
        "{%- for message in messages -%}\n"
        "{%- if llmops_prefix and message['role'] == 'user' and message['content'] is string"
        " and message['content'][:llmops_prefix | length] != llmops_prefix -%}\n"
        "{%- set llmops.messages = llmops.messages"
        " + [{'role': 'user', 'content': llmops_prefix ~ message['content']}] -%}\n"
        "{%- else -%}\n"
        "{%- set llmops.messages = llmops.messages + [message] -%}\n"
        "{%- endif -%}\n"
        "{%- endfor -%}\n"
        "{%- set messages = llmops.messages -%}\n" + template
    )
