"""Deterministic demo data: customer-support tickets labelled with one of a few intents.

Users have no shared data set, so `make run` trains on this. Rows are composed from templates
and slot values with a seeded RNG, so the same seed always gives the same file.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from components.artifacts import PreparedData

INTENTS: dict[str, list[str]] = {
    "card_lost": [
        "I lost my {card} {when}, what should I do?",
        "My {card} is missing, please block it",
        "Someone may have stolen my {card}",
        "I can't find my {card} anywhere since {when}",
    ],
    "refund_request": [
        "I want my money back for order {order}",
        "Please refund the {item} I returned {when}",
        "How do I get a refund for {item}?",
        "The {item} arrived broken, I'd like a refund",
    ],
    "delivery_status": [
        "Where is my order {order}?",
        "My {item} has not arrived yet, it was due {when}",
        "Can you track parcel {order} for me?",
        "How long until the {item} is delivered?",
    ],
    "change_address": [
        "I moved {when}, please update my address",
        "I need to change the delivery address for order {order}",
        "How can I update my home address?",
        "Please send the {item} to my new address instead",
    ],
    "cancel_subscription": [
        "Please cancel my {plan} subscription",
        "I don't want the {plan} plan anymore",
        "How do I stop the {plan} membership from renewing?",
        "End my {plan} subscription {when}",
    ],
    "password_reset": [
        "I forgot my password and can't log in",
        "The reset link for my password expired {when}",
        "How do I change my password on the {device}?",
        "I'm locked out of my account on my {device}",
    ],
}

SLOTS = {
    "card": ["credit card", "debit card", "card", "virtual card"],
    "when": ["yesterday", "last week", "this morning", "two days ago", "today"],
    "order": ["#1042", "#2231", "#7781", "#5530", "#9902", "#3147"],
    "item": ["headphones", "jacket", "coffee machine", "phone case", "book", "lamp"],
    "plan": ["premium", "family", "monthly", "annual"],
    "device": ["phone", "laptop", "tablet", "app"],
}


OPENERS = ["", "Hi, ", "Hello, ", "Urgent: ", "Good morning, "]
CLOSERS = ["", " Thanks.", " Please help.", " Thank you!"]

# A real export is never clean: these rows show the rejects file at work (empty text, an unknown
# label, an exact duplicate), and are counted in MLflow like any other reject.
FLAWED = [{"text": "", "label": "card_lost"}, {"text": "Do you sell gift cards?", "label": "gift_cards"}]


def _fill(template: str, rng: random.Random) -> str:
    values = {name: rng.choice(options) for name, options in SLOTS.items()}
    return rng.choice(OPENERS) + template.format(**values) + rng.choice(CLOSERS)


def generate_rows(n_rows: int = 360, seed: int = 7) -> list[dict]:
    """n_rows distinct tickets, balanced over the intents, plus the FLAWED rows and one duplicate."""
    rng = random.Random(seed)
    labels = sorted(INTENTS)
    rows, seen = [], set()
    while len(rows) < n_rows:
        label = labels[len(rows) % len(labels)]
        text = _fill(rng.choice(INTENTS[label]), rng)
        if text not in seen:
            seen.add(text)
            rows.append({"text": text, "label": label})
    rows += FLAWED + [dict(rows[0])]
    rng.shuffle(rows)
    return rows


def write_demo(out_dir: Path, n_rows: int = 360, seed: int = 7) -> Path:
    """Write tickets.csv and labels.json into out_dir; returns the CSV path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "tickets.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(generate_rows(n_rows, seed))
    (out_dir / PreparedData.labels_file).write_text(json.dumps(sorted(INTENTS), indent=2))
    return path
