"""Text from the data is text: a `<|im_end|>` typed into a message is never encoded as the control token.

A tokenizer encodes every special-token string it meets as that token, wherever it stands. Rendered through
the chat template, a message holding `<|im_end|>` or `<|im_start|>system` would end its turn or open a forged
system turn, and training would teach the model that structure. So a row whose text holds a special-token
string is rendered with placeholders in place of its texts, the template's own pieces are encoded as usual,
and each text is encoded with `split_special_tokens=True`: the same characters, as ordinary tokens. Those
rows carry their token ids (`prompt_ids`, `completion_ids`), which training and evaluation use instead of
re-encoding the strings. Every other row is encoded from its string, as before and as servers do.
"""

from __future__ import annotations

import re

PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: in no real text, and no template touches them
_SLOT = re.compile("\ue000(\\d+)\ue001")


def special_strings(tok) -> list[str]:
    """Every string the tokenizer encodes as a special token (its named ones and added special tokens)."""
    added = [t.content for t in tok.added_tokens_decoder.values() if t.special]
    return sorted({*tok.all_special_tokens, *added} - {""}, key=len, reverse=True)


def holds_special(texts: list[str], specials: list[str]) -> bool:
    return any(s in text for text in texts for s in specials)


def with_placeholders(messages: list[dict], answer: str) -> tuple[list[dict], str, list[str]]:
    """The messages and the answer with each text replaced by a numbered placeholder, and the texts in order."""
    texts = [m["content"] for m in messages] + [answer]
    held = [{**m, "content": PLACEHOLDER.format(i)} for i, m in enumerate(messages)]
    return held, PLACEHOLDER.format(len(messages)), texts


def fill(rendered: str, texts: list[str]) -> str:
    return _SLOT.sub(lambda m: texts[int(m.group(1))], rendered)


def encode(tok, rendered: str, texts: list[str]) -> list[int]:
    """Token ids of `rendered` (holding placeholders) with the template's pieces encoded as usual and each text
    encoded literally, special-token strings included."""
    ids, at = [], 0
    for slot in _SLOT.finditer(rendered):
        ids += tok(rendered[at : slot.start()], add_special_tokens=False)["input_ids"]
        ids += tok(texts[int(slot.group(1))], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        at = slot.end()
    return ids + tok(rendered[at:], add_special_tokens=False)["input_ids"]


def model_input(example: dict) -> str | list[int]:
    """What a model is given for an example's prompt: its literal ids where data prep made them, else the string."""
    return example.get("prompt_ids") or example["prompt"]


def encoded(tok, examples: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
    """Each example's prompt and completion ids: data prep's literal ids where it made them, else its strings
    encoded (the strings of all such rows in one call)."""
    prompts = [e.get("prompt_ids") for e in examples]
    completions = [e.get("completion_ids") for e in examples]
    plain = [i for i, ids in enumerate(prompts) if ids is None]
    if plain:
        p = tok([examples[i]["prompt"] for i in plain], add_special_tokens=False)["input_ids"]
        c = tok([examples[i]["completion"] for i in plain], add_special_tokens=False)["input_ids"]
        for i, prompt, completion in zip(plain, p, c):
            prompts[i], completions[i] = prompt, completion
    return prompts, completions
