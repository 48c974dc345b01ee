"""Batches and loss for answer-only training: the prompt teaches nothing, the answer and its EOS are learned.

Rows are left-padded so every answer ends at the last position; the model then computes logits over the
answer window only, which is where the loss reads.
"""

from __future__ import annotations

from components.literal_text import encoded

IGNORE_INDEX = -100


def answer_rows(examples: list[dict], tok) -> list[dict]:
    """Each example as model input: prompt tokens get IGNORE_INDEX labels; the answer and its EOS are learned."""
    prompts, answers = encoded(tok, examples)  # a text holding a special-token string: data prep's literal ids
    return [
        {"input_ids": p + a, "attention_mask": [1] * (len(p) + len(a)), "labels": [IGNORE_INDEX] * len(p) + a}
        for p, a in zip(prompts, answers)
    ]


def tokenize(examples: list[dict], tok):
    """answer_rows as a datasets.Dataset, which the Trainer takes."""
    from datasets import Dataset

    return Dataset.from_list(answer_rows(examples, tok))


class AnswerBatches:
    """Left-pads a batch so every answer ends at the last position, and asks the model for logits over the
    answer window only. The LM head is ~20% of a small model's FLOPs, and full-sequence logits over a 49k
    vocabulary dominate its activation memory; the loss reads none outside the answers."""

    def __init__(self, tok):
        from transformers import DataCollatorForSeq2Seq

        tok.padding_side = "left"
        self.pad = DataCollatorForSeq2Seq(tok, padding="longest", label_pad_token_id=IGNORE_INDEX)

    def __call__(self, features):
        batch = self.pad(features)
        # positions as if unpadded, so a row is computed the same whatever its batch
        batch["position_ids"] = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
        batch["logits_to_keep"] = logits_window(batch["labels"])
        return batch


def logits_window(labels) -> int:
    """The positions that need logits: from the one before the batch's first answer token to the end."""
    learned = (labels != IGNORE_INDEX).any(0).nonzero()
    first = int(learned[0]) if len(learned) else labels.shape[1] - 1
    return labels.shape[1] - first + 1


def rows_per_forward(rows: int, width: int, max_tokens: int | None) -> int:
    """The rows of one forward when a batch of `rows` padded to `width` may put at most max_tokens
    (train.micro_batch_tokens) through one: as few equal parts as keep under it, one row at the least."""
    if not max_tokens or rows * width <= max_tokens:
        return rows
    parts = -(-rows // max(1, max_tokens // width))
    return -(-rows // parts)


def split_batch(batch: dict, max_tokens: int | None) -> list[dict]:
    """A collated batch as the micro-batches max_tokens allows, or the batch itself when it fits. Each part takes
    rows of like length, drops the padding columns none of its rows needs, and gets its own logits window; the
    rows keep their position ids, so each is computed as in the whole batch."""
    rows, width = batch["input_ids"].shape
    per = rows_per_forward(rows, width, max_tokens)
    if per >= rows:
        return [batch]
    order = batch["attention_mask"].sum(-1).argsort(descending=True, stable=True)
    parts = []
    for chosen in order.split(per):
        part = {k: v[chosen] for k, v in batch.items() if k != "logits_to_keep"}
        used = int(part["attention_mask"].any(0).nonzero()[0])  # left padding: the columns before are all pad
        part = {k: v[:, used:] for k, v in part.items()}
        part["logits_to_keep"] = logits_window(part["labels"])
        parts.append(part)
    return parts


def answer_tokens(labels) -> int:
    """The tokens the loss learns (the logits window holds them all): what answer_loss divides by when the Trainer
    gives no count, and what a batch split in parts divides each part's loss by."""
    return int((labels != IGNORE_INDEX).sum())


def answer_loss(outputs, labels, num_items_in_batch=None):
    """Token-level cross-entropy over the kept logits window; normalized by the Trainer's token count, so
    gradient accumulation and data parallelism weigh every answer token alike."""
    import torch.nn.functional as F

    logits = outputs.logits[:, :-1].float()
    targets = labels[:, labels.shape[1] - logits.shape[1] :].to(logits.device)
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return total / (num_items_in_batch if num_items_in_batch is not None else answer_tokens(labels))
