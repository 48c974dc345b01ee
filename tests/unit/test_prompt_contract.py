"""The prompt contract: a bare message served through the merged tokenizer gets the prompt training used."""

import json

import pytest

from components.artifacts import CONTRACT_FILE
from components.jsonl import read_jsonl
from components.prompt_contract import read_contract, wrap_template

pytestmark = pytest.mark.unit


def test_demo_contract_records_the_training_frame(demo_prepared):
    contract = read_contract(demo_prepared)
    labels = json.loads((demo_prepared / "labels.json").read_text())
    assert contract["format"] == "label" and contract["labels"] == labels
    assert contract["system_prompt"] == "You are a helpful assistant."
    assert contract["user_prefix"].startswith("Classify the message into one of these labels: " + ", ".join(labels))
    assert contract["user_prefix"].endswith("\n\nMessage: ")
    first = read_jsonl(demo_prepared / "eval.jsonl")[0]
    assert contract["user_prefix"] in first["prompt"]  # the rendered training prompt carries it


def test_wrapped_template_frames_a_bare_message_exactly_like_training(tiny_base, demo_prepared):
    from transformers import AutoTokenizer

    contract = read_contract(demo_prepared)
    tok = AutoTokenizer.from_pretrained(tiny_base)
    plain = tok.chat_template
    tok.chat_template = wrap_template(plain, contract)
    for example in read_jsonl(demo_prepared / "eval.jsonl")[:20]:
        message = example["prompt"].split(contract["user_prefix"], 1)[1].split("<|im_end|>", 1)[0]
        served = tok.apply_chat_template(
            [{"role": "user", "content": message}], tokenize=False, add_generation_prompt=True
        )
        assert served == example["prompt"]
        # A client that already sends the trained frame is not framed twice.
        framed = [
            {"role": "system", "content": contract["system_prompt"]},
            {"role": "user", "content": contract["user_prefix"] + message},
        ]
        assert tok.apply_chat_template(framed, tokenize=False, add_generation_prompt=True) == example["prompt"]
    # A client's own system prompt wins; the user turn is still framed.
    own = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>") and contract["user_prefix"] + "hi" in own


@pytest.mark.parametrize(
    "system, prefix", [('Say "x" {{ not jinja }}\\n', "Étiquette : {% raw %}\n\n"), ("", "Only a prefix: ")]
)
def test_contract_strings_are_literal_text_in_the_template(tiny_base, system, prefix):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    tok.chat_template = wrap_template(tok.chat_template, {"system_prompt": system, "user_prefix": prefix})
    out = tok.apply_chat_template([{"role": "user", "content": "msg"}], tokenize=False, add_generation_prompt=True)
    assert (f"<|im_start|>system\n{system}<|im_end|>" in out) == bool(system)
    assert f"<|im_start|>user\n{prefix}msg<|im_end|>" in out


def test_no_contract_leaves_the_template_alone():
    assert wrap_template("T", {"system_prompt": "", "user_prefix": ""}) == "T"


def test_merge_writes_the_contract_into_the_served_tokenizer(tiny_base, tiny_adapter, demo_prepared, tmp_path):
    from components.config import MergeSection
    from components.stages import merge

    merge.run(MergeSection(parity_prompts=4, parity_threshold=0.0), tiny_base, tiny_adapter, demo_prepared, tmp_path)
    served = tmp_path / "model"
    assert read_contract(served) == read_contract(demo_prepared)
    config = json.loads((served / "tokenizer_config.json").read_text())
    assert "llmops prompt contract" in config["chat_template"] and not (served / "chat_template.jinja").exists()
    assert CONTRACT_FILE in {p.name for p in served.iterdir()}
