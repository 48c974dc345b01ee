"""What an FSDP checkpoint gathers (components/fsdp.py): the adapter only, never the frozen base.

One process, a one-rank gloo group on CPU and FSDP2's fully_shard on the tiny Llama with LoRA: the sharded
parameters are DTensors as on N ranks, so what `ShardedTrainer.save_model` hands to the Trainer's save shows
what a 70B run would gather onto one host at every checkpoint. The two-process runs (integration tier) show the
checkpoint resumes to the same adapter.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import free_port

pytestmark = pytest.mark.unit


@pytest.fixture
def sharded_lora(tiny_base):
    import torch.distributed as dist
    from peft import LoraConfig, get_peft_model
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        base = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        yield model
    finally:
        dist.destroy_process_group()


class Saves:
    """The Trainer's side of save_model: what it is handed to write."""

    def __init__(self, model):
        self.model, self.saved = model, []
        self.args = type("Args", (), {"output_dir": "unused"})()

    def _save(self, output_dir, state_dict=None):
        self.saved.append((output_dir, state_dict))


def test_a_checkpoint_gathers_the_trainable_tensors_whole_and_no_frozen_one(sharded_lora, monkeypatch):
    from accelerate import Accelerator
    from torch.distributed.tensor import DTensor

    from components.fsdp import ShardedTrainer, is_sharded

    def whole_model(*args, **kw):
        raise AssertionError("the whole model was gathered for a checkpoint")

    monkeypatch.setattr(Accelerator, "get_state_dict", whole_model)
    assert is_sharded(sharded_lora)
    trainer = Saves(sharded_lora)
    ShardedTrainer.save_model(trainer, "checkpoint-2")

    [(where, state)] = trainer.saved
    params = dict(sharded_lora.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert where == "checkpoint-2" and set(state) == trainable and all("lora_" in n for n in state)
    assert len(state) < len(params)  # the base's weights stay where they are
    for name, tensor in state.items():
        assert not isinstance(tensor, DTensor) and tensor.device.type == "cpu"
        assert tensor.shape == params[name].full_tensor().shape
