"""Model inference shared by every stage that runs a model: loading, batched greedy and label-constrained
generation, response loss.

Evaluate, merge parity, quantize, the gate, the pyfunc and validation during training all decode through one
loop (`_greedy_batches`), so a fix to it reaches them all, and no stage imports another to get at it.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path

from components.environment import ONEDNN_CACHE
from components.progress import StageProgress


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip()).strip(" .").casefold()


def load_tokenizer(model_dir: Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = padding_side  # left for batched generation: new tokens follow the real text
    return tok


def load_model(
    model_dir: Path,
    dtype: str = "bfloat16",
    adapter_dir: Path | None = None,
    quantization=None,
    device: str | None = None,
):
    """device: None puts the model on the GPU when the stage's pod has one (evaluate, quantize), over all of them
    when it has several, else on the host.
    Given explicitly, also a quantized load stays there (bitsandbytes would otherwise pick the GPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    gpu = torch.cuda.is_available()
    # a pod with several GPUs and no device asked for: the layers split in order over them (accelerate's
    # device_map auto), for a model one GPU cannot hold (llmops plan: a 70B evaluated on 2 x 24 GB)
    device_map = "auto" if device is None and torch.cuda.device_count() > 1 else None
    device = device or ("cuda:0" if gpu else "cpu")
    if gpu and device_map is None:
        device_map = {"": device}  # without a GPU everything loads on the host anyway
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=getattr(torch, dtype), quantization_config=quantization, device_map=device_map
    )
    head = model.get_output_embeddings()
    if head is not None and device == "cpu":
        # The head reads only the last position when generating, a strided slice of the hidden states; on CPU,
        # torch.matmul of a strided 3-D input and the 2-D head copies the head once per row (54 MB a row for
        # SmolLM2, 1.7 GB at batch 32). Handing it a contiguous slice costs b * hidden values.
        head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]) if args else args)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    return model.eval()


# TGI's --quantize flags for bitsandbytes, and the variant names the quantize stage reports them under.
TGI_FLAG = {"nf4": "bitsandbytes-nf4", "int8": "bitsandbytes"}
VARIANT_OF_FLAG = {flag: variant for variant, flag in TGI_FLAG.items()}


def bnb_config(variant: str, compute_dtype: str = "bfloat16", double_quant: bool = True, storage: str = "uint8"):
    """The bitsandbytes loading for `variant` (int8 or nf4). The defaults reproduce TGI's --quantize flag;
    training's NF4 base is the same quantization with its own compute dtype and double_quant setting.
    `storage` is the dtype the packed 4-bit codes are stored in: the same codes and scales whatever it is, but FSDP
    shards only floating-point parameters, so sharded training stores them in its compute dtype."""
    import torch
    from transformers import BitsAndBytesConfig

    if variant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, storage),
    )


@contextmanager
def bounded_int8_kernels():
    """Bounds what int8 inference holds on a CPU with AVX-512, for a block that runs this process's first oneDNN
    kernel. There bitsandbytes' int8 matmul is torch._int_mm, whose oneDNN kernels are cached per input shape, each
    with its layer's weights repacked: every new batch shape added ~150 MB to the BANKING77 merge's int8 scoring, whose
    process grew from 1.8 to 6.25 GB over 500 rows. Eight cached kernels held it at 2.53 GB, in 127 s against 128 s,
    with the same scores (`llmops stage quantize`, 2026-12-06). Not for training: there eight made a step 1.5x
    slower. A value the user set stays; the cache keeps the size it had at the process's first kernel."""
    # scoped: in-process callers (tests, `llmops stage`) do not hand it on to the processes they start later
    with ONEDNN_CACHE.scoped(ONEDNN_CACHE.get() or "8"):
        yield


def load_as_served(model_dir: Path, quantize_flag: str):
    """The merged model loaded the way TGI serves it under `--quantize quantize_flag` ("none": 16-bit as stored)."""
    variant = VARIANT_OF_FLAG.get(quantize_flag)
    return load_model(model_dir, quantization=bnb_config(variant)) if variant else load_model(model_dir)


def no_autograd(model):
    """inference_mode, or no_grad for a model FSDP shards (validation during sharded training): FSDP2 copies the
    gathered weights into buffers it reuses in place, which inference_mode forbids."""
    import torch

    from components.fsdp import is_sharded

    return torch.no_grad() if is_sharded(model) else torch.inference_mode()


def _batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def encode_prompts(tok, prompts: list):
    """A left-padded batch of prompts given as strings or as token ids (components.literal_text.model_input)."""
    if all(isinstance(p, str) for p in prompts):
        return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    ids = [p if isinstance(p, list) else tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    return tok.pad({"input_ids": ids}, return_tensors="pt", padding=True)


def _greedy_batches(
    model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, progress: str | None, allowed=None
):
    """Yields (prompt indices, generated token ids) per batch. Batches group prompts of similar length, so
    little is padding; padding is on the left, so every row's new tokens start at the same column.
    `allowed(new_ids) -> token ids` constrains each step (label decoding)."""

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    # none at all inside another live display (validation runs under training's bar)
    shown = StageProgress(progress or "", len(prompts), "prompts", quiet=progress is None)
    with shown, no_autograd(model):
        for idx in _batches(order, batch_size):
            enc = encode_prompts(tok, [prompts[i] for i in idx]).to(model.device)
            width = enc["input_ids"].shape[1]
            constraint = (
                {} if allowed is None else {"prefix_allowed_tokens_fn": lambda row, seq: allowed(seq[width:].tolist())}
            )
            # use_cache explicitly: during training the model's config may have it off, which would recompute
            # the whole prompt at every generated token
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                **constraint,
            )
            yield idx, out[:, width:]
            shown.advance(len(idx))


def generate(
    model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, progress: str | None = "generate"
) -> list[str]:
    """Greedy outputs, in the order of prompts."""
    return generate_with_ids(model, tok, prompts, max_new_tokens, batch_size, progress)[0]


def generate_with_ids(
    model, tok, prompts: list[str], max_new_tokens: int, batch_size: int, progress: str | None = "generate"
) -> tuple[list[str], list[list[int]]]:
    """Greedy outputs and the new token ids behind them (EOS and padding included), in the order of prompts."""
    ids: dict[int, list[int]] = {}
    for idx, new_ids in _greedy_batches(model, tok, prompts, max_new_tokens, batch_size, progress):
        ids.update(zip(idx, new_ids.tolist()))
    ordered = [ids[i] for i in range(len(prompts))]
    return [text.strip() for text in tok.batch_decode(ordered, skip_special_tokens=True)], ordered


class LabelTrie:
    """Token-id prefix tree of `label + EOS` sequences, tokenized the way training saw the answers.

    Free generation can answer with text that is no label at all (or a label with extra words), which exact
    match counts as wrong without saying why. Decoding that walks this trie can only produce a label.
    """

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


def labels_after_free(
    model, tok, prompts: list[str], free_ids: list[list[int]], trie: LabelTrie, batch_size: int, progress=None
) -> tuple[list[str], int]:
    """predict_labels, given the same model's free greedy ids: where free decoding walked a label's path to EOS,
    each step's argmax was an allowed token, so decoding constrained to the trie picks that label; only the other
    rows are decoded (BANKING77's tuned model, 2026-12-06: 8 of 500). Returns the labels and that count."""
    out = [trie.label_of(ids) for ids in free_ids]
    rest = [i for i, label in enumerate(out) if label is None]
    if rest:
        decoded = predict_labels(model, tok, [prompts[i] for i in rest], trie, batch_size, progress)
        for i, label in zip(rest, decoded):
            out[i] = label
    return out, len(rest)


def predict_labels(
    model, tok, prompts: list[str], trie: LabelTrie, batch_size: int, progress: str | None = None
) -> list[str]:
    """The greedy choice among the labels for each prompt (decoding constrained to the trie)."""
    out: dict[int, str | None] = {}
    for idx, new_ids in _greedy_batches(model, tok, prompts, trie.longest, batch_size, progress, trie.allowed):
        out.update(zip(idx, (trie.label_of(row) for row in new_ids.tolist())))
    missing = [i for i, label in out.items() if label is None]
    if missing:  # the trie admits only whole labels, so this means the tokenizer split a label two ways
        raise RuntimeError(f"constrained decoding left {len(missing)} answers outside the label set")
    return [out[i] for i in range(len(prompts))]


def response_nll(model, tok, examples: list[dict], batch_size: int, progress: str | None = None) -> tuple[float, int]:
    """Summed negative log-likelihood of the responses given the prompts, and the token count. Batched as training
    batches (components/answer_batches.py): left-padded with positions as if unpadded, and logits over the answer
    window only; a prompt's full-vocabulary logits were most of this pass's memory."""
    import torch

    from components.answer_batches import IGNORE_INDEX, AnswerBatches, answer_loss, answer_rows

    rows = answer_rows(examples, tok)
    collate = AnswerBatches(tok)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))  # little padding
    total, count = 0.0, 0
    shown = StageProgress(progress or "", len(examples), "examples", quiet=progress is None)
    with shown, torch.inference_mode():
        for idx in _batches(order, batch_size):
            batch = collate([rows[i] for i in idx])
            labels, keep = batch.pop("labels"), batch.pop("logits_to_keep")
            outputs = model(**{k: v.to(model.device) for k, v in batch.items()}, logits_to_keep=keep)
            total += float(answer_loss(outputs, labels, num_items_in_batch=1))  # the sum over the answer tokens
            count += int((labels != IGNORE_INDEX).sum())
            shown.advance(len(idx))
    return total, count
