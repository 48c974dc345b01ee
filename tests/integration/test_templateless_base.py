"""A base model that ships no chat template trains, merges and serves in the format model.chat_template names."""

import json

import pytest

from components import chat_templates
from components.config import DataSection, MergeSection, ModelSection, TrainSection
from components.jsonl import read_jsonl
from components.stages import base_model, merge, prepare_data, train
from tests.conftest import Live, build_tiny_llama
from tests.unit.test_chat_templates import tgi_render

pytestmark = pytest.mark.integration


def test_a_base_without_a_template_is_trained_merged_and_served_in_the_chosen_format(tmp_path, llmops_cache):
    from transformers import AutoTokenizer

    from tests.conftest import server_app

    source = build_tiny_llama(tmp_path / "source", chat_template=None)
    assert "chat_template" not in json.loads((source / "tokenizer_config.json").read_text())
    base, data, adapter, merged = (tmp_path / name for name in ("base", "data", "adapter", "merged"))
    meta = base_model.run(ModelSection(base_model=str(source), chat_template="llama2"), base)
    prepare_data.run(DataSection(), base, data)
    train.run(TrainSection(max_steps=2, batch_size=4, checkpoint_every=2, log_every=1), base, data, adapter)
    merge.run(MergeSection(parity_prompts=4, parity_threshold=0.0), base, adapter, data, merged)
    assert meta["chat_template"] == "llama2"

    rows = read_jsonl(data / "eval.jsonl")[:3]
    # trained in Llama-2's format: the data's system prompt inside the first [INST], the answer closed by EOS
    assert all(r["prompt"].startswith("[INST] <<SYS>>\n") and r["prompt"].endswith(" [/INST]") for r in rows)
    tok = AutoTokenizer.from_pretrained(merged / "model")
    assert tok.chat_template.endswith(chat_templates.LLAMA2)  # after the prompt contract's preamble
    with Live(server_app(str(merged / "model"), model_id="templateless")) as live:
        for row in rows:
            message = row["prompt"].split("Message: ")[1].removesuffix(" [/INST]")  # what the user typed
            bare = [{"role": "user", "content": message}]
            served = live.post("/chat_tokenize", {"messages": bare}).json()["templated_text"]
            assert served == row["prompt"]  # the bare message reaches the model as the prompt it trained on
            # and TGI, which renders the same tokenizer_config.json with minijinja, frames it alike
            assert tgi_render(tok.chat_template, bare, tok.bos_token, tok.eos_token, True) == row["prompt"]
        reply = live.post("/v1/chat/completions", {"messages": bare, "max_tokens": 4, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["role"] == "assistant"
