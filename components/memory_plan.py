"""How much memory each stage will need, computed from the model's config.json before any weight is read.

The model is built on PyTorch's meta device (shapes, no storage), so a 70B plan costs nothing. Each stage's
figure is the sum of what it holds at its peak, with the settings of its config section:

- train: the base weights as training holds them (NF4 codes and scales, the other weights in float32 after
  peft's prepare_model_for_kbit_training; 16 bits for LoRA), the LoRA weights with their gradients and Adam
  state (float32: 16 bytes per parameter), both split N ways under FSDP (in host memory with
  train.cpu_offload) plus two decoder layers gathered, the tensors autograd saves for one micro-batch (counted per
  decoder layer in `saved_per_token_layer`; with gradient checkpointing only each layer's input, plus one
  layer recomputed), the float32 logits over the answer window (logits, softmax, gradient), and the runtime;
- evaluate: the 16-bit model and its float32 adapter, the KV cache of a generation batch, and the float32
  logits and log-softmax of the loss pass over a whole batch;
- merge (on the host): the largest of its phases: streaming the merge, then the parity check's two models;
- quantize: the 16-bit merge (the largest variant), plus an evaluation batch's working set.

On the host, loading reads the 16-bit checkpoint through a memory map, and its pages count while the
weights are converted (to NF4, or to float32): `StagePlan.loading` is that moment, and a stage's peak is the
larger of it and its working peak. On a GPU the load moves one tensor at a time, so loading is not the peak.

`choose_batch` finds the largest batch whose plan fits the memory at hand. The planned numbers are estimates;
docs/BENCHMARKS.md compares them with measured peaks where this machine can measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from components.answer_batches import rows_per_forward
from components.config import EvalSection, TrainSection

GB = 1e9
GPU_MEMORY_GB = {"L4": 24, "A10G": 24, "RTX4090": 24, "L40S": 48, "A100-40GB": 40, "A100-80GB": 80, "H100": 80}
RUNTIME_OVERHEAD = 1.0 * GB  # CUDA context and the allocator's slack, as nvidia-smi shows on an idle process
# On the host: what a stage's process adds before its model loads (its own imports, the tokenizer, the data):
# 40-100 MB measured on SmolLM2 and the demo data (docs/BENCHMARKS.md, plan vs measured)
RUNTIME_HOST = 0.1 * GB
NF4_BYTES = 0.5  # two 4-bit codes per byte
NF4_SCALES = {True: 1 / 64 + 4 / (64 * 256), False: 4 / 64}  # per weight: absmax per 64 (8-bit, then fp32 per 256)
LORA_TRAIN_BYTES = 16  # float32 weight, gradient, Adam's two moments


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs from a model: counted on the meta device."""

    linear: dict[str, tuple[int, int, int]]  # module suffix -> (in, out, how many), the output head aside
    other_params: int  # embeddings, norms, the output head
    layers: int
    hidden: int
    vocab: int
    kv_width: int  # key/value heads * head dim
    linear_weights: frozenset[str] = frozenset()  # their weight names: what a 4-bit load quantizes
    q_width: int = 0  # attention heads * head dim (0: the hidden size)
    intermediate: int = 0  # the MLP's inner width (0: 4 * hidden)

    @property
    def linear_params(self) -> int:
        return sum(i * o * n for i, o, n in self.linear.values())

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def model_shape(source: str | Path) -> ModelShape:
    """`source`: a config.json, a directory holding one, or a Hugging Face id (read offline when cached)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(source)
    config = AutoConfig.from_pretrained(path.parent if path.name == "config.json" else source)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linear, counted, names, head = {}, 0, set(), model.get_output_embeddings()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head:  # the output head stays 16-bit
            suffix = name.rsplit(".", 1)[-1]
            i, o, n = linear.get(suffix, (module.in_features, module.out_features, 0))
            linear[suffix] = (i, o, n + 1)
            counted += module.weight.numel()
            names.add(f"{name}.weight")
    total = sum(p.numel() for p in model.parameters())
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return ModelShape(
        linear,
        total - counted,
        config.num_hidden_layers,
        config.hidden_size,
        config.vocab_size,
        heads * head_dim,
        frozenset(names),
        config.num_attention_heads * head_dim,
        getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
    )


@dataclass
class StagePlan:
    stage: str
    device: str
    items: dict[str, float] = field(default_factory=dict)  # what is held at the working peak -> bytes
    loading: float = 0.0  # the host's peak while the weights load (the mapped checkpoint and the converted model)
    offloaded: float = 0.0  # one process's share kept in host memory (FSDP with train.cpu_offload)

    @property
    def total(self) -> float:
        return max(sum(self.items.values()), self.loading)


def adapted(shape: ModelShape, cfg: TrainSection) -> set[str]:
    """The linear modules LoRA adapts (their suffixes)."""
    return set(shape.linear) if cfg.target_modules == "all-linear" else set(cfg.target_modules)


def lora_params(shape: ModelShape, cfg: TrainSection) -> int:
    return sum(cfg.lora_r * (i + o) * n for name, (i, o, n) in shape.linear.items() if name in adapted(shape, cfg))


def adapter_params(adapter_dir: Path) -> int:
    """A trained adapter's parameters, counted from its weights file's header (no tensor is read)."""
    import math

    from safetensors import safe_open

    from components.artifacts import TrainedAdapter

    with safe_open(TrainedAdapter(adapter_dir).weights_file, framework="pt") as adapter:
        return sum(math.prod(adapter.get_slice(k).get_shape()) for k in adapter.keys())


def nf4_model_bytes(shape: ModelShape, double_quant: bool, other_width: int) -> float:
    """A model whose linear weights are NF4 (codes and scales) and whose other weights are `other_width` bytes."""
    return shape.linear_params * (NF4_BYTES + NF4_SCALES[double_quant]) + shape.other_params * other_width


def parity_check(shape: ModelShape, available: float) -> str:
    """merge.compare_dtype auto: float32 where the float32 reference fits, else bfloat16 where the 16-bit merge
    does (1.3x for the runtime, either way), else layerwise (components/layer_parity.py)."""
    if shape.params * 4 * 1.3 <= available:
        return "float32"
    return "bfloat16" if shape.params * 2 * 1.3 <= available else "layerwise"


def longest_row(examples: list[dict]) -> int:
    """The tokens of the longest prepared row (prompt and answer): what a batch is padded to at worst."""
    return max(e["prompt_tokens"] + e["completion_tokens"] for e in examples)


def accumulation(batch_size: int, grad_accum: int, batch: int) -> int:
    """The gradient accumulation that keeps the effective batch (batch_size * grad_accum) at micro-batch `batch`."""
    return -(-batch_size * grad_accum // batch)


def widths(cfg: TrainSection) -> tuple[int, int]:
    """(compute, stream) bytes per value. For QLoRA, prepare_model_for_kbit_training upcasts every weight that is
    not 4-bit to float32, and a 4-bit layer returns its input's dtype: the residual stream runs in float32."""
    compute = 4 if cfg.compute_dtype == "float32" else 2
    return compute, 4 if cfg.method == "qlora" else compute


def saved_per_token_layer(shape: ModelShape, cfg: TrainSection) -> float:
    """Bytes autograd keeps per token in one Llama decoder layer, counted tensor by tensor and checked against
    torch.autograd.graph.saved_tensors_hooks (tests/unit/test_memory_plan.py; SmolLM2 QLoRA: 57 KB measured).
    A frozen 16-bit linear keeps nothing for its backward; what is kept is the norms' float32 work, attention's
    inputs and output, the MLP's gate, activation and up, each 4-bit layer's input (bitsandbytes keeps it), and
    for each adapted module LoRA's float32 input and its rank-r output. Korthikanti et al.'s 34 * hidden (GPT,
    16 bits, all weights trained) undercounts a QLoRA model 3x: its residual stream runs in float32."""
    compute, stream = widths(cfg)
    h, q, inner = shape.hidden, shape.q_width or shape.hidden, shape.intermediate or 4 * shape.hidden
    norms = 2 * 8 * h  # each RMSNorm keeps its input and its normalized output in float32
    attention = 4 * q * compute  # q, k, v and the output (the kernel's inputs and result)
    mlp = 3 * inner * stream  # gate, its activation, up
    per_module = {name: (i, n / shape.layers) for name, (i, _, n) in shape.linear.items()}
    quantized = sum(i * n for i, n in per_module.values()) * compute if cfg.method == "qlora" else 0
    targets = adapted(shape, cfg)
    # LoRA's input in float32 (PEFT keeps the adapter in float32) is a new tensor unless the stream already is
    # float32 and no dropout copies it; its rank-r output is kept for lora_B
    new_input = cfg.lora_dropout > 0 or stream != 4
    lora = sum((i * 4 * new_input + cfg.lora_r * 4) * n for name, (i, n) in per_module.items() if name in targets)
    return norms + attention + mlp + quantized + lora


def base_as_trained(shape: ModelShape, cfg: TrainSection) -> float:
    """The base weights as training holds them: NF4 linears and float32 others (QLoRA), or all at 16 bits."""
    compute, stream = widths(cfg)
    if cfg.method == "qlora":
        return nf4_model_bytes(shape, cfg.double_quant, stream)
    return shape.params * compute


def train_plan(shape: ModelShape, cfg: TrainSection, tokens: int, window: int, batch: int | None = None) -> StagePlan:
    """tokens: the longest row; window: the answer positions that get logits."""
    # one forward's rows: a batch past train.micro_batch_tokens runs in parts, one part's activations held at a time
    batch = rows_per_forward(batch or cfg.batch_size, tokens, cfg.micro_batch_tokens)
    compute, stream = widths(cfg)
    per_layer = batch * tokens * saved_per_token_layer(shape, cfg)
    if cfg.gradient_checkpointing is True:  # each layer's input, and one layer recomputed in the backward pass
        activations = shape.layers * batch * tokens * shape.hidden * stream + per_layer
    else:  # False, or "auto" planned as off: the plan says when it does not fit, and what to turn on
        activations = shape.layers * per_layer
    base, shards = base_as_trained(shape, cfg), cfg.processes if cfg.parallelism == "fsdp" else 1
    runtime = RUNTIME_OVERHEAD if cfg.use_gpu else RUNTIME_HOST
    plan = StagePlan("train", "gpu" if cfg.use_gpu else "cpu")
    plan.items = {
        "base weights": base / shards,
        # a float32 output head is cast to the compute dtype for each forward (QLoRA)
        "output head in the compute dtype": shape.vocab * shape.hidden * compute if stream != compute else 0.0,
        "LoRA weights, gradients, Adam": lora_params(shape, cfg) * LORA_TRAIN_BYTES / shards,
        "activations": activations,
        "logits over the answers": batch * window * shape.vocab * 4 * 3,
        "runtime": runtime,
    }
    if shards > 1:  # FSDP gathers one decoder layer whole for its forward and backward, the next one prefetched
        plan.items["two layers gathered"] = 2 * (base - shape.other_params * stream) / shape.layers
    if cfg.cpu_offload:  # the shards wait in host memory; a layer comes to the GPU for its compute
        plan.offloaded = plan.items.pop("base weights") + plan.items.pop("LoRA weights, gradients, Adam")
    if not cfg.use_gpu:
        converted = cfg.method == "qlora" or compute != 2  # else the mapped pages are the weights (no copy)
        plan.loading = base + shape.params * 2 * converted + runtime
    return plan


def eval_plan(
    shape: ModelShape,
    cfg: EvalSection,
    tokens: int,
    lora: int,
    batch: int | None = None,
    gpu: bool = True,
    gpus: int = 1,
) -> StagePlan:
    """lora: the adapter's parameters (PEFT keeps them in float32). base_form nf4: the base as QLoRA trained it.
    gpus > 1: the layers split in order over the pod's GPUs (device_map auto), each holding its share of the
    weights and of the KV cache; the logits are on the last."""
    batch = batch or cfg.batch_size
    width = 4 if cfg.dtype == "float32" else 2
    nf4 = cfg.base_form == "nf4"
    model = (nf4_model_bytes(shape, True, width) if nf4 else shape.params * width) + lora * 4
    plan = StagePlan("evaluate", "gpu" if gpu else "cpu")
    plan.items = {
        "model and adapter" + (f" / {gpus}" if gpus > 1 else ""): model / gpus,
        "KV cache": kv_cache_bytes(shape, batch, tokens + cfg.max_new_tokens, width) / gpus,
        "loss-pass logits and log-softmax (float32)": batch * tokens * shape.vocab * 8,
        "runtime": RUNTIME_OVERHEAD if gpu else RUNTIME_HOST,
    }
    return plan


def kv_cache_bytes(shape: ModelShape, sequences: int, tokens: int, width: int = 2) -> float:
    """Keys and values of every layer for `sequences` of `tokens` positions, `width` bytes per element."""
    return sequences * tokens * shape.layers * 2 * shape.kv_width * width


def streaming_merge_bytes(shape: ModelShape, shard_bytes: float, adapter_bytes: float) -> float:
    """components/streaming_merge.py at its peak: the shard it reads (mapped), the merged shard it holds until it
    writes it, one tensor in float32 (at most the embedding matrix), and the adapter in float32."""
    largest = max([i * o for i, o, _ in shape.linear.values()] + [shape.vocab * shape.hidden])
    return 2 * shard_bytes + largest * 4 + adapter_bytes


def layerwise_parity_bytes(shape: ModelShape, adapter_bytes: float) -> float:
    """components/layer_parity.py at its peak: the largest block (a decoder layer's linears, or the embedding
    or head) read in 16 bits and held in float32 with its NF4 rounding's working copy, and the adapter."""
    return max(shape.linear_params / shape.layers, shape.vocab * shape.hidden) * 6 + adapter_bytes


def merge_plan(shape: ModelShape, train: TrainSection, available: float) -> StagePlan:
    """The merge's phases run one after another, so its peak is the largest: writing the merge shard by shard (a
    5 GB shard, one float32 tensor, the adapter), then the parity check as merge.compare_dtype auto picks it: in
    float32 where that fits, else in bfloat16 on the trained condition (for QLoRA, the NF4 base) and the merge,
    each loaded whole, else one block at a time (components/layer_parity.py)."""
    adapter = lora_params(shape, train) * 4
    streaming = "streaming the merge (a shard in and out, a float32 tensor, the adapter)"
    phases = {streaming: streaming_merge_bytes(shape, min(5 * GB, shape.params * 2), adapter)}
    check = parity_check(shape, available)
    float32 = check == "float32"
    if check == "layerwise":
        phases["parity one block at a time (read in 16 bits, held in float32), the adapter"] = layerwise_parity_bytes(
            shape, adapter
        )
    else:
        if float32:
            reference = shape.params * 4
        elif train.method == "qlora":
            reference = nf4_model_bytes(shape, train.double_quant, 2)
        else:
            reference = shape.params * 2
        # A model loaded in another dtype than its 16-bit checkpoint (float32, or NF4) is converted from the mapped
        # file, whose pages count until it is done; loaded as stored, the mapped pages are the weights.
        mapped = shape.params * 2
        converted = float32 or train.method == "qlora"
        label = "float32" if float32 else "bfloat16"
        phases[f"parity: trained model ({label}), converted from its mapped checkpoint"] = (
            reference + adapter + mapped * converted
        )
        phases[f"parity: the merge ({label})"] = shape.params * 4 + mapped if float32 else shape.params * 2
    peak = max(phases, key=phases.get)
    plan = StagePlan("merge", "host")
    plan.items = {peak: phases[peak], "runtime": RUNTIME_HOST}
    return plan


def quantize_plan(shape: ModelShape, cfg: EvalSection, tokens: int, gpu: bool = True, gpus: int = 1) -> StagePlan:
    """One model at a time (the 16-bit merge, then each variant), the largest the 16-bit one, and its scoring;
    gpus > 1: its layers split over the pod's GPUs, as evaluate's are (inference.load_model).
    On the host an int8 variant loads from the mapped 16-bit merge, which then counts beside it."""
    evaluation = eval_plan(shape, cfg, tokens, 0, gpu=gpu, gpus=gpus)
    plan = StagePlan("quantize", evaluation.device)
    plan.items = {
        "16-bit merge (the largest variant)" + (f" / {gpus}" if gpus > 1 else ""): shape.params * 2 / gpus,
        **{k: v for k, v in evaluation.items.items() if not k.startswith("model and adapter")},
    }
    if not gpu:
        int8 = shape.linear_params + shape.other_params * 2
        plan.loading = shape.params * 2 + int8 + evaluation.items["runtime"]
    return plan


class MemoryPlanError(RuntimeError):
    """Nothing fits: the message names the numbers and the setting to change."""


def fit_batch(plan_for, batch: int, available: float, setting: str) -> int:
    """`batch` when its plan fits `available`, else the largest batch that does; refuses when not even 1 fits."""
    if plan_for(batch).total <= available:
        return batch
    chosen = choose_batch(plan_for, available, batch)
    if chosen is None:
        least = plan_for(1)
        parts = ", ".join(f"{k} {v / GB:.1f}" for k, v in sorted(least.items.items(), key=lambda kv: -kv[1])[:3])
        if least.loading > sum(least.items.values()):  # loading the weights is the peak: no batch helps
            parts = f"loading: the checkpoint mapped while the weights convert {least.loading / GB:.1f}"
            advice = "use a smaller model"
        else:
            advice = "lower data.max_tokens, use a smaller model"
        raise MemoryPlanError(
            f"{least.stage}: {least.total / GB:.1f} GB needed even at {setting}=1 ({parts} GB), "
            f"{available / GB:.1f} GB available on the {least.device}; {advice} or a larger device "
            "(`llmops plan` shows every stage)"
        )
    from components.util import console

    console.print(
        f"memory plan: {plan_for(batch).total / GB:.1f} GB at {setting}={batch} exceeds the "
        f"{available / GB:.1f} GB available; {setting}={chosen} ({plan_for(chosen).total / GB:.1f} GB)"
    )
    return chosen


def choose_batch(plan_for, available: float, largest: int) -> int | None:
    """The largest batch (up to `largest`) whose plan fits `available` bytes; None when not even one does."""
    fits = [b for b in range(1, largest + 1) if plan_for(b).total <= available]
    return max(fits) if fits else None


def gpu_count(gpu: str) -> int:
    """`2xRTX4090` -> 2; a bare type or size is one GPU."""
    count, x, _ = gpu.partition("x")
    return int(count) if x and count.isdigit() and int(count) > 0 else 1


def gpu_bytes(gpu: str) -> float:
    """One GPU's memory: `A10G`, `H100`, ... or a number of GB, after an optional count (`2xRTX4090`)."""
    if gpu_count(gpu) > 1 or gpu.startswith("1x"):
        gpu = gpu.partition("x")[2]
    if gpu.upper() in GPU_MEMORY_GB:
        return GPU_MEMORY_GB[gpu.upper()] * GB
    try:
        return float(gpu) * GB
    except ValueError:
        raise ValueError(f"--gpu {gpu!r}: a number of GB or one of {', '.join(GPU_MEMORY_GB)}") from None
