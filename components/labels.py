"""Label tasks scored against the known label set: greedy decoding constrained to the labels.

Free generation can answer with text that is no label at all (or a label with extra words), which
exact match counts as wrong without saying why. Constrained decoding walks a token trie of the labels,
each followed by EOS, so every answer is a label: the greedy choice among labels, in one batched pass.
"""

from __future__ import annotations


class LabelTrie:
    """Token-id prefix tree of `label + EOS` sequences, tokenized the way training saw the answers."""

    def __init__(self, tok, labels: list[str]):
        self.eos = tok.eos_token_id
        self.root: dict = {}
        self.by_ids: dict[tuple[int, ...], str] = {}
        for label in labels:
            ids = tok(label + tok.eos_token, add_special_tokens=False)["input_ids"]
            node = self.root
            for token in ids:
                node = node.setdefault(token, {})
            self.by_ids[tuple(ids)] = label

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.by_ids)

    def allowed(self, prefix: list[int]) -> list[int]:
        node = self.root
        for token in prefix:
            if token not in node:
                return [self.eos]  # a finished row (EOS, then padding): anything valid keeps it finished
            node = node[token]
        return list(node) or [self.eos]

    def label_of(self, ids: list[int]) -> str | None:
        if self.eos in ids:
            ids = ids[: ids.index(self.eos) + 1]
        return self.by_ids.get(tuple(ids))


def predict(model, tok, prompts: list[str], labels: list[str], batch_size: int, trie: LabelTrie | None = None) -> list[str]:
    """The constrained greedy label for each prompt; batches of similar length, left padding."""
    import torch

    trie = trie or LabelTrie(tok, labels)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: dict[int, str] = {}
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
            width = enc["input_ids"].shape[1]
            # use_cache explicitly: during training the model's config may have it off, which would
            # recompute the whole prompt at every generated token
            ids = model.generate(**enc, max_new_tokens=trie.longest, do_sample=False, pad_token_id=tok.pad_token_id,
                                 use_cache=True,
                                 eos_token_id=tok.eos_token_id,
                                 prefix_allowed_tokens_fn=lambda row, seq: trie.allowed(seq[width:].tolist()))
            for i, row in zip(idx, ids[:, width:].tolist()):
                out[i] = trie.label_of(row)
    missing = [i for i, label in out.items() if label is None]
    if missing:  # the trie admits only whole labels, so this means the tokenizer split a label two ways
        raise RuntimeError(f"constrained decoding left {len(missing)} answers outside the label set")
    return [out[i] for i in range(len(prompts))]


def accuracy(predictions: list[str], answers: list[str]) -> float:
    return sum(p == a for p, a in zip(predictions, answers)) / max(len(answers), 1)
