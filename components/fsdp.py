"""Sharded QLoRA training (train.strategy=fsdp): FSDP2 through the Trainer, on GPUs and on CPU alike.

The NF4 base is loaded with its 4-bit codes stored in the compute dtype (train.quantization), so FSDP can shard them
with the LoRA weights and their optimizer state; each process then holds 1/N of the model between layers. The
adapter saved is the same files as a single-process run's: `save_adapter` gathers it first.
"""

from __future__ import annotations

from pathlib import Path

from transformers import Trainer

from components.config import TrainSection


def fsdp_args(cfg: TrainSection) -> dict:
    """FSDP2 settings for train.strategy=fsdp: each decoder layer is its own shard group (the model's
    `_no_split_modules`), gathered for its forward and backward, then freed. Activation checkpointing is FSDP's own,
    per layer: the Trainer's would gather each layer's weights a second time in backward."""
    if cfg.parallelism != "fsdp":
        return {}
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "reshard_after_forward": True,
            "cpu_offload": cfg.cpu_offload,
            "activation_checkpointing": bool(cfg.gradient_checkpointing),
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


class ShardedTrainer(Trainer):
    """The Trainer, with FSDP on CPU too. accelerate turns its FSDP plugin on only for accelerator devices (its
    state sets the FSDP type in the GPU branch alone); on CPU, where the sharded path is tested, the same plugin is
    put on the state after it is built, so both go through accelerate's one `fsdp2_prepare_model`."""

    def create_accelerator_and_postprocess(self):
        super().create_accelerator_and_postprocess()
        state = self.accelerator.state
        if self.args.fsdp_plugin_args is not None and getattr(state, "fsdp_plugin", None) is None:
            from accelerate import PartialState
            from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

            state.fsdp_plugin = FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args)
            # as accelerate's own GPU branch does: the process-wide state too, which every later state copies
            state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.is_fsdp_enabled = True

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Each checkpoint's model save. The Trainer's, under FSDP, gathers the whole model onto the main process's
        host (accelerate's get_state_dict: the frozen NF4 base too), and PEFT then writes only the adapter: for a
        70B, ~40 GB gathered for ~0.8 GB kept at every checkpoint_every. Here only the trainable tensors are
        gathered; the files written are the same."""
        if not is_sharded(self.model):
            return super().save_model(output_dir, _internal_call)
        self._save(output_dir or self.args.output_dir, state_dict=trainable_state(self.model))


def is_sharded(model) -> bool:
    """FSDP has sharded this model (fully_shard on it or on any of its modules)."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def parameter_share(model) -> float:
    """The share of the model's parameter elements this process holds: 1.0 unsharded, about 1/N under FSDP."""
    from torch.distributed.tensor import DTensor

    local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in model.parameters())
    return local / sum(p.numel() for p in model.parameters())


def trainable_state(model) -> dict:
    """The trainable tensors, whole, on the host. Under FSDP each rank holds a shard of every LoRA matrix: every rank
    must call this (a collective per tensor, in one order everywhere); the frozen base is not gathered."""
    from torch.distributed.tensor import DTensor

    return {
        name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu()
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def save_adapter(model, path: Path, main: bool) -> None:
    """The adapter, written by the main rank; under FSDP every rank calls this, to gather it first."""
    state = trainable_state(model) if is_sharded(model) else None
    if main:
        model.save_pretrained(path, state_dict=state)
