"""The chat templates a base model without one gets (components/chat_templates.py)."""

import json

import minijinja
import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from components import chat_templates
from components.config import ModelSection
from components.stages import base_model
from tests.conftest import CHATML, build_tiny_llama

pytestmark = pytest.mark.unit

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Where is my card?"},
    {"role": "assistant", "content": "card_arrival"},
    {"role": "user", "content": "And the PIN?"},
    {"role": "assistant", "content": "pin_blocked"},
]
# (bos, eos) as a Llama-2 vocabulary has them, and as a ChatML vocabulary without BOS has them
VOCABULARIES = [("<s>", "</s>"), (None, "<|im_end|>")]


def tgi_render(template: str, messages: list, bos, eos, add_generation_prompt: bool) -> str:
    """As TGI's router renders: minijinja, blocks trimmed, a missing BOS or EOS passed as none."""
    env = minijinja.Environment()
    env.trim_blocks, env.lstrip_blocks = True, True
    return env.render_str(
        template, messages=messages, bos_token=bos, eos_token=eos, add_generation_prompt=add_generation_prompt
    )


def hf_render(template: str, messages: list, bos, eos, add_generation_prompt: bool) -> str:
    """As transformers (and vLLM) render: Jinja2, a missing token left undefined."""
    tokens = {"eos_token": eos, **({"bos_token": bos} if bos else {})}
    [rendered], _ = render_jinja_template(
        [messages], chat_template=template, add_generation_prompt=add_generation_prompt, **tokens
    )
    return rendered


@pytest.mark.parametrize("name", sorted(chat_templates.TEMPLATES))
@pytest.mark.parametrize(("bos", "eos"), VOCABULARIES)
def test_a_template_renders_alike_in_transformers_and_tgi_and_each_answer_extends_its_prompt(name, bos, eos):
    template = chat_templates.TEMPLATES[name]
    # without and with a system message, one and two exchanges
    for messages in (CONVERSATION[1:3], CONVERSATION[:3], CONVERSATION):
        prompt = hf_render(template, messages[:-1], bos, eos, True)
        full = hf_render(template, messages, bos, eos, False)
        assert prompt == tgi_render(template, messages[:-1], bos, eos, True)
        assert full == tgi_render(template, messages, bos, eos, False)
        # data prep's contract: the conversation extends the generation prompt by the answer, then EOS
        assert full.startswith(prompt) and full[len(prompt) :].strip().startswith(messages[-1]["content"])
        assert full[len(prompt) :].rstrip().endswith(eos)
        assert prompt.startswith(bos or "") and ("Be brief." in prompt) == (messages[0]["role"] == "system")


def test_each_format_is_the_one_it_is_named_after():
    messages, eos = CONVERSATION[:3], "</s>"
    assert hf_render(chat_templates.LLAMA2, messages, "<s>", eos, False) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhere is my card? [/INST] card_arrival </s>"
    )
    assert hf_render(chat_templates.ALPACA, messages[1:2], "<s>", eos, True) == (
        f"<s>{chat_templates.ALPACA_PREAMBLE}\n\n### Instruction:\nWhere is my card?\n\n### Response:\n"
    )
    # where <|im_end|> is the EOS token, the ChatML template is ChatML exactly
    assert hf_render(chat_templates.CHATML, messages, None, "<|im_end|>", False) == hf_render(
        CHATML + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}", messages, None, "<|im_end|>", False
    )


def test_auto_keeps_a_shipped_template_gives_chatml_to_none_and_a_named_one_replaces_it(tmp_path, llmops_cache):
    plain = build_tiny_llama(tmp_path / "plain", chat_template=None)
    shipped = build_tiny_llama(tmp_path / "shipped")
    cases = [(plain, "auto", "chatml"), (shipped, "auto", "own"), (shipped, "alpaca", "alpaca")]
    for source, setting, chosen in cases:
        out = tmp_path / f"{source.name}-{setting}"
        meta = base_model.run(ModelSection(base_model=str(source), chat_template=setting), out)
        template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
        assert meta["chat_template"] == chosen
        assert template == (CHATML if chosen == "own" else chat_templates.TEMPLATES[chosen])
