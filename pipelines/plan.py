"""`llmops plan`: every GPU stage's memory, computed for a model and a GPU before anything is downloaded.

For each stage: what it would hold at its peak with the profile's settings, what the device has, and the
verdict: fits; fits with a smaller batch (gradient accumulation keeping the effective batch); or does not fit,
with the numbers and the setting to change.
"""

from __future__ import annotations

from dataclasses import dataclass

from components import memory_plan as mp
from components.registry_tags import QUANTIZE_TAG
from pipelines.config import PipelineConfig


@dataclass
class Verdict:
    plan: mp.StagePlan
    available: float
    fits: bool
    advice: str


def _train(shape, cfg: PipelineConfig, gpu: float, gpus: int, tokens: int, window: int) -> Verdict:
    """The profile's setting on one GPU (data parallel holds a whole copy on each); where that is refused and
    there are more GPUs, FSDP over all of them (the base and the LoRA state split, train.strategy=fsdp)."""
    verdict = _train_on(shape, cfg.train, gpu, tokens, window)
    if verdict.fits or gpus == 1 or cfg.train.parallelism == "fsdp":
        return verdict
    for offload in (False, True):
        sharded = cfg.train.model_copy(update={"strategy": "fsdp", "num_processes": gpus, "cpu_offload": offload})
        over = _train_on(shape, sharded, gpu, tokens, window)
        if over.fits:
            break
    if not over.fits:
        return verdict
    # each process loads the NF4 base on the host before fully_shard moves its share to its GPU
    host = gpus * mp.base_as_trained(shape, sharded) / mp.GB
    where = f"train.strategy=fsdp train.num_processes={gpus}" + (" train.cpu_offload=true" if offload else "")
    over.advice = (
        over.advice.replace("fits at the profile's settings", "fits")
        + f", sharded: {where} (over {gpus} GPUs; {host:.0f} GB of host memory to load the base)"
    )
    return over


def _train_on(shape, train, gpu: float, tokens: int, window: int) -> Verdict:
    planned = mp.train_plan(shape, train, tokens, window)
    if planned.total <= gpu:
        return Verdict(planned, gpu, True, "fits at the profile's settings")
    # "auto" may turn checkpointing on: whichever allows the larger micro-batch (off on a tie: no recompute)
    choices = [False, True] if train.gradient_checkpointing == "auto" else [train.gradient_checkpointing, True]
    best = None
    for checkpointing in dict.fromkeys(choices):
        settings = train.model_copy(update={"gradient_checkpointing": checkpointing})
        batch = mp.choose_batch(lambda b, s=settings: mp.train_plan(shape, s, tokens, window, b), gpu, train.batch_size)
        if batch and (best is None or batch > best[0]):
            best = (batch, settings, checkpointing)
    if best:
        batch, settings, checkpointing = best
        accum = mp.accumulation(train.batch_size, train.grad_accum, batch)
        plan = mp.train_plan(shape, settings, tokens, window, batch)
        extra = " with train.gradient_checkpointing=true" if checkpointing is True else ""
        return Verdict(plan, gpu, True, f"fits at train.batch_size={batch} train.grad_accum={accum}{extra}")
    least = mp.train_plan(shape, train.model_copy(update={"gradient_checkpointing": True}), tokens, window, 1)
    weights = least.items["base weights"] / mp.GB
    hint = (
        "train.method=qlora"
        if train.method == "lora"
        else "more GPUs, a GPU with more memory, or data.max_tokens lower"
    )
    return Verdict(
        least,
        gpu,
        False,
        f"refused: {least.total / mp.GB:.1f} GB even at batch 1 with checkpointing (base weights "
        f"{weights:.1f} GB) on {gpu / mp.GB:.0f} GB; use {hint}",
    )


def _sized(plan_for, available: float, section: str, batch: int) -> Verdict:
    planned = plan_for(batch)
    if planned.total <= available:
        return Verdict(planned, available, True, "fits at the profile's settings")
    chosen = mp.choose_batch(plan_for, available, batch)
    if chosen:
        return Verdict(plan_for(chosen), available, True, f"fits at {section}.batch_size={chosen}")
    return Verdict(plan_for(1), available, False, f"refused: {plan_for(1).total / mp.GB:.1f} GB even at batch 1")


def _evaluate(shape, cfg: PipelineConfig, gpu: float, gpus: int, tokens: int, lora: int) -> Verdict:
    """eval.base_form auto: the 16-bit base where it fits, else the NF4 base QLoRA trained against; on one GPU
    where it fits, else with the layers split over the pod's GPUs."""
    forms = ["16bit", "nf4"] if cfg.eval.base_form == "auto" else [cfg.eval.base_form]
    for form, split in [(form, n) for form in forms for n in dict.fromkeys([1, gpus])]:
        section = cfg.eval.model_copy(update={"base_form": form})
        verdict = _sized(
            lambda b, s=section, n=split: mp.eval_plan(shape, s, tokens, lora, b, gpus=n),
            gpu,
            "eval",
            section.batch_size,
        )
        if verdict.fits or (form, split) == (forms[-1], gpus):
            if verdict.fits and form == "nf4":
                verdict.advice += " on the NF4 base (the trained condition; eval.base_form auto)"
            if verdict.fits and split > 1:
                verdict.advice += f", its layers split over the {split} GPUs"
            return verdict


def _quantize(shape, cfg: PipelineConfig, gpu: float, gpus: int, tokens: int) -> Verdict:
    """The 16-bit merge scored with its layers split over the pod's GPUs (as evaluate splits its model)."""
    verdict = _sized(
        lambda b: mp.quantize_plan(shape, cfg.eval.model_copy(update={"batch_size": b}), tokens, gpus=gpus),
        gpu,
        "eval",
        cfg.eval.batch_size,
    )
    if gpus > 1:
        verdict.advice += f", its layers split over the {gpus} GPUs" if verdict.fits else f" over {gpus} GPUs"
    if not verdict.fits:
        verdict.advice += (
            ": the 16-bit merge cannot be scored on these GPUs. The adapter on its NF4 base fits (evaluate scores "
            "it; registry.adapters registers both), but the gate judges the merge"
        )
    return verdict


SERVE_SEQUENCES = 8  # sequences of data.max_tokens whose KV cache a served model should hold at least
TP_SIZES = (1, 2, 4, 8)  # tensor-parallel splits both engines take (a Llama's 8 KV heads divide evenly)


def serve_plan(shape: mp.ModelShape, shards: int, tokens: int, bits: int = 16, lora: int = 0) -> mp.StagePlan:
    """One GPU of a served model split `shards` ways (tensor parallel): its share of the weights (16-bit, or
    bitsandbytes NF4 quantized at load: TGI's --quantize bitsandbytes-nf4), of a LoRA adapter served beside them,
    and of the KV cache of SERVE_SEQUENCES sequences, and the runtime."""
    weights = shape.params * 2 if bits == 16 else mp.nf4_model_bytes(shape, True, 2)
    plan = mp.StagePlan("serve", "gpu")
    plan.items = {
        f"{'16-bit' if bits == 16 else 'NF4'} weights / {shards}": weights / shards,
        f"KV cache, {SERVE_SEQUENCES} x {tokens} tokens / {shards}": mp.kv_cache_bytes(shape, SERVE_SEQUENCES, tokens)
        / shards,
        "runtime": mp.RUNTIME_OVERHEAD,
    }
    if lora:
        plan.items[f"LoRA adapter / {shards}"] = lora * 2 / shards
    return plan


def _least(shape: mp.ModelShape, gpu: float, tokens: int, bits: int, lora: int = 0) -> int | None:
    return next((n for n in TP_SIZES if serve_plan(shape, n, tokens, bits, lora).total <= gpu), None)


def _serve(shape: mp.ModelShape, gpus: int, gpu: float, tokens: int, lora: int, qlora: bool = True) -> Verdict:
    """16 bits on either engine where the pod's GPUs hold them; else NF4 at load, which only TGI does (vLLM 0.32
    has no bitsandbytes), on the adapter's base: NF4 of a merge can erase a small adapter (the merge report's
    nf4_adapter_lost), while the NF4 base with the adapter beside it is the form QLoRA trained and evaluate scored."""
    planned = serve_plan(shape, gpus, tokens)
    if planned.total <= gpu:
        how = f"with deploy.accelerator_count={gpus} (tensor parallel over {gpus})" if gpus > 1 else "on one GPU"
        return Verdict(planned, gpu, True, f"fits {how}")
    nf4 = serve_plan(shape, gpus, tokens, bits=4, lora=lora)
    if nf4.total <= gpu:
        split = f"deploy.accelerator_count={gpus} (tensor parallel over {gpus}), " if gpus > 1 else ""
        what = (
            "serving the base version (registry.adapters) tagged "
            f"{QUANTIZE_TAG}=bitsandbytes-nf4 with the adapter promoted onto it"
            if qlora  # the base it trained against is the NF4 rounding
            else f"where the quantize report recommends {QUANTIZE_TAG}=bitsandbytes-nf4 for the merge"
        )
        sixteen = _least(shape, gpu, tokens, 16) or "more"
        return Verdict(
            nf4,
            gpu,
            True,
            f"fits in 4 bits: deploy.engine=tgi {split}{what} (vLLM 0.32 has no 4-bit quantization at load; 16 bits "
            f"need deploy.accelerator_count={sixteen})",
        )
    least, least4 = _least(shape, gpu, tokens, 16), _least(shape, gpu, tokens, 4, lora)
    need = f"deploy.accelerator_count={least} of these GPUs" if least else "a larger GPU"
    if least4:
        need += f" (in 4 bits on TGI: {least4})"
    return Verdict(planned, gpu, False, f"refused on {gpus} GPU(s): needs {need}")


def plan(cfg: PipelineConfig, model: str, gpu: str, host_gb: float, answer_tokens: int) -> list[Verdict]:
    """Every stage on `gpu`: on one of its GPUs where that fits, else sharded over all of them (training with
    FSDP, evaluation with the layers split, serving with tensor parallelism)."""
    shape = mp.model_shape(model)
    gpu_bytes, gpus, host = mp.gpu_bytes(gpu), mp.gpu_count(gpu), host_gb * mp.GB
    tokens, lora = cfg.data.max_tokens, mp.lora_params(shape, cfg.train)
    merged = mp.merge_plan(shape, cfg.train, host)
    peak = next(iter(merged.items))
    short = f"refused: {merged.total / mp.GB:.1f} GB of host memory on {host_gb:.0f} GB ({peak})"
    merge = Verdict(merged, host, merged.total <= host, f"fits (peak: {peak})" if merged.total <= host else short)
    return [
        _train(shape, cfg, gpu_bytes, gpus, tokens, answer_tokens),
        _evaluate(shape, cfg, gpu_bytes, gpus, tokens, lora),
        merge,
        _quantize(shape, cfg, gpu_bytes, gpus, tokens),
        _serve(shape, gpus, gpu_bytes, tokens, lora, qlora=cfg.train.method == "qlora"),
    ]


def print_plan(verdicts: list[Verdict], title: str) -> None:
    from rich.table import Table

    from components.util import console

    table = Table(title=title + " (computed, not measured)")
    for column in ("stage", "device", "largest parts (GB)", "planned GB", "has GB", "verdict"):
        table.add_column(column)
    for v in verdicts:
        parts = sorted(v.plan.items.items(), key=lambda kv: -kv[1])[:3]
        if v.plan.loading > sum(v.plan.items.values()):  # on the host, loading the weights can be the peak
            parts = [("loading (the checkpoint mapped while the weights convert)", v.plan.loading)]
        table.add_row(
            v.plan.stage,
            v.plan.device,
            ", ".join(f"{name} {size / mp.GB:.1f}" for name, size in parts),
            f"{v.plan.total / mp.GB:.1f}",
            f"{v.available / mp.GB:.0f}",
            v.advice,
        )
    console.print(table)
