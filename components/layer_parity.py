"""The merge's parity check one decoder layer at a time, for a model the host cannot hold whole.

The trained model and the merge run side by side, teacher-forced on the eval prompts followed by their answers:
the trained model as `merge.adapter_on_base` computes it (the base's NF4 rounding in float32, the adapter unmerged:
y = xWᵀ + s·(xAᵀ)Bᵀ), and the merge as written (its stored 16-bit weights, computed in float32). Both are one
skeleton built on the meta device; for each block (the embedding, each decoder layer, the head) the weights of
one model are read from its checkpoint, applied to that model's hidden states, and dropped before the other's
are read. What is held is one block in float32 (3.4 GB for a 70B decoder layer) and two batches of hidden
states, not the model (141 GB in 16 bits).

At each answer position the two next-token choices (argmax) are compared. Where they agree at every position of
an answer, greedy decoding along that answer chooses the same tokens from both models; `parity` is the share of
prompts for which they do, the greedy parity measured on the eval answers instead of on each model's own output.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

from components.memory_plan import model_shape
from components.streaming_merge import lora_deltas, nf4_rounding, shard_files


class Checkpoint:
    """A safetensors checkpoint read one tensor at a time (every shard opened, nothing read ahead)."""

    def __init__(self, model_dir: Path, stack: ExitStack):
        from safetensors import safe_open

        self.where = {}
        for shard in shard_files(Path(model_dir)):
            handle = stack.enter_context(safe_open(shard, framework="pt"))
            self.where.update({name: handle for name in handle.keys()})

    def get(self, name: str):
        return self.where[name].get_tensor(name)

    def __contains__(self, name: str) -> bool:
        return name in self.where


def _skeleton(model_dir: Path):
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    config._attn_implementation = "sdpa"  # a causal mask of its own: batches are padded on the right
    with init_empty_weights():  # parameters on the meta device; buffers (the rotary frequencies) real
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _fill(model, prefix: str, weight) -> None:
    """Give the block at `prefix` real float32 weights: weight(name) for each of its parameters."""
    from accelerate.utils import set_module_tensor_to_device

    block = model.get_submodule(prefix)
    for local, _ in block.named_parameters():
        name = f"{prefix}.{local}"
        set_module_tensor_to_device(model, name, "cpu", value=weight(name).float())


def _empty(model, prefix: str) -> None:
    model.get_submodule(prefix).to("meta")


def _lora_hooks(model, prefix: str, deltas: dict, scaling: float) -> list:
    """The adapter, unmerged, on the linear modules of the block at `prefix`: out + s·(xAᵀ)Bᵀ."""
    hooks = []
    for name, (lora_a, lora_b) in deltas.items():
        module_name = name.removesuffix(".weight")
        if module_name.startswith(prefix + "."):

            def add(module, args, out, a=lora_a, b=lora_b):
                return out + (args[0] @ a.T) @ b.T * scaling

            hooks.append(model.get_submodule(module_name).register_forward_hook(add))
    return hooks


def next_token_choices(
    model_dir: Path, batches: list[tuple], weight, deltas: dict | None = None, scaling: float = 1.0
) -> list:
    """For each (ids, answer positions) batch: the argmax and the logits at the answer positions, computed one
    block at a time with weights from weight(name); `deltas` adds an adapter unmerged."""
    import torch

    model = _skeleton(model_dir)
    inner, config = model.model, model.config
    _fill(model, "model.embed_tokens", weight)
    with torch.no_grad():
        hidden = [inner.embed_tokens(ids) for ids, _ in batches]
        _empty(model, "model.embed_tokens")
        positions = [torch.arange(h.shape[1]).unsqueeze(0) for h in hidden]
        rotary = [inner.rotary_emb(h, p) for h, p in zip(hidden, positions)]  # the same for every layer
        for i in range(config.num_hidden_layers):
            prefix = f"model.layers.{i}"
            _fill(model, prefix, weight)
            hooks = _lora_hooks(model, prefix, deltas or {}, scaling)
            for k, h in enumerate(hidden):
                out = inner.layers[i](h, position_ids=positions[k], position_embeddings=rotary[k])
                hidden[k] = out[0] if isinstance(out, tuple) else out
            for hook in hooks:
                hook.remove()
            _empty(model, prefix)
        _fill(model, "model.norm", weight)
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        head_weight = weight(head).float()
        results = []
        for h, (_, where) in zip(hidden, batches):
            rows, cols = where
            logits = inner.norm(h)[rows, cols] @ head_weight.T
            results.append((logits.argmax(-1), logits))
    return results


def teacher_forced_batches(prompts: list[list[int]], answers: list[list[int]], pad: int, size: int) -> list[tuple]:
    """Right-padded batches of prompt+answer ids, with the (row, column) of each position that predicts an answer
    token: the prompt's last token through the answer's second to last."""
    import torch

    batches = []
    for start in range(0, len(prompts), size):
        pairs = list(zip(prompts[start : start + size], answers[start : start + size]))
        width = max(len(p) + len(a) for p, a in pairs)
        ids = torch.full((len(pairs), width), pad)
        rows, cols = [], []
        for r, (p, a) in enumerate(pairs):
            ids[r, : len(p) + len(a)] = torch.tensor(p + a)
            rows += [r] * len(a)
            cols += range(len(p) - 1, len(p) + len(a) - 1)
        batches.append((ids, (torch.tensor(rows), torch.tensor(cols))))
    return batches


def layerwise_parity(
    base_dir: Path, adapter_dir: Path, merged_dir: Path, examples: list[dict], tok, nf4: dict | None, size: int = 8
) -> dict:
    """Parity of the merge with the trained model, teacher-forced on the examples' answers, one block at a time.
    `nf4` ({"double_quant", "dtype"}): the base's NF4 rounding the adapter trained against; None: the 16-bit base."""
    import torch

    from components.literal_text import encoded

    prompts, answers = encoded(tok, examples)
    batches = teacher_forced_batches(prompts, answers, tok.pad_token_id, size)
    rounded = model_shape(base_dir).linear_weights if nf4 else frozenset()
    deltas, scaling = lora_deltas(adapter_dir)
    with ExitStack() as stack:
        base, merged = Checkpoint(base_dir, stack), Checkpoint(merged_dir, stack)

        def trained(name: str):
            weight = base.get(name)
            return (
                nf4_rounding(weight, getattr(torch, nf4["dtype"]), nf4["double_quant"]) if name in rounded else weight
            )

        reference = next_token_choices(base_dir, batches, trained, deltas, scaling)
        candidate = next_token_choices(merged_dir, batches, merged.get)
    agree, gap = [], 0.0
    for (ids, (rows, _)), (ref, ref_logits), (got, got_logits) in zip(batches, reference, candidate):
        same = ref == got
        agree += [bool(same[rows == r].all()) for r in range(ids.shape[0])]
        gap = max(gap, (ref_logits - got_logits).abs().max().item())
    return {"parity": sum(agree) / max(len(agree), 1), "max_logit_gap": gap, "positions": sum(len(a) for a in answers)}
