"""Chat templates for base models that ship none (Llama-2 and Llama-3 base checkpoints, GPT-2, Pythia, ...).

Data prep renders every example through the base tokenizer's chat template, the merge copies that tokenizer,
and TGI, vLLM and `llmops serve` render requests through the copy in tokenizer_config.json. So the format
chosen here, once, is the one the model is trained on and the one it is served with.

Every template closes the assistant's turn with the model's own EOS token: servers stop on EOS, and a base
model needs no new tokens (new embedding rows would stay untrained under LoRA). In a vocabulary where
ChatML's `<|im_end|>` is the EOS token, the ChatML template below is ChatML exactly.

The templates use only what Jinja2 (transformers, vLLM) and minijinja (TGI) share. BOS and EOS are tested
before use: TGI passes a missing one as `none`, transformers leaves it undefined.
"""

from __future__ import annotations

BOS = "{%- if bos_token %}{{ bos_token }}{% endif -%}\n"
EOS = "{%- if eos_token %}{{ eos_token }}{% endif -%}\n"

CHATML = (
    BOS + "{%- for message in messages %}\n"
    "{{- '<|im_start|>' ~ message['role'] ~ '\\n' ~ message['content'] }}\n"
    "{%- if message['role'] == 'assistant' %}\n" + EOS + "{{- '\\n' }}\n"
    "{%- else %}{{ '<|im_end|>\\n' }}{% endif -%}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif -%}\n"
)

# Meta's Llama-2 chat format: the system prompt inside the first [INST], each answer closed by EOS.
LLAMA2 = (
    "{%- set system = messages[0]['content'] if messages and messages[0]['role'] == 'system' else '' -%}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'user' %}\n" + BOS + "{{- '[INST] ' }}\n"
    "{%- if system and loop.index0 <= 1 %}{{ '<<SYS>>\\n' ~ system ~ '\\n<</SYS>>\\n\\n' }}{% endif -%}\n"
    "{{- message['content'] ~ ' [/INST]' }}\n"
    "{%- elif message['role'] == 'assistant' %}\n"
    "{{- ' ' ~ message['content'] ~ ' ' }}\n" + EOS + "{%- endif %}\n"
    "{%- endfor -%}\n"
)

# Stanford Alpaca's prompt; a system message replaces its preamble.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)
ALPACA = (
    "{%- set preamble = messages[0]['content'] if messages and messages[0]['role'] == 'system' else "
    f"'{ALPACA_PREAMBLE}' -%}}\n" + BOS + "{{- preamble ~ '\\n\\n' }}\n"
    "{%- for message in messages %}\n"
    "{%- if message['role'] == 'user' %}{{ '### Instruction:\\n' ~ message['content'] ~ '\\n\\n' }}\n"
    "{%- elif message['role'] == 'assistant' %}{{ '### Response:\\n' ~ message['content'] }}\n"
    + EOS
    + "{{- '\\n\\n' }}\n"
    "{%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}{{ '### Response:\\n' }}{% endif -%}\n"
)

TEMPLATES = {"chatml": CHATML, "llama2": LLAMA2, "alpaca": ALPACA}
OWN = "own"  # the base tokenizer's own template, kept


def choose(tok, setting: str) -> str:
    """Give `tok` the template `setting` asks for; returns its name (OWN when the model's own is kept).

    `auto` keeps a template the model ships and gives ChatML to one that has none.
    """
    if setting == "auto":
        if tok.chat_template:
            return OWN
        setting = "chatml"
    if setting not in TEMPLATES:
        raise ValueError(f"model.chat_template {setting!r}: expected auto or one of {', '.join(TEMPLATES)}")
    tok.chat_template = TEMPLATES[setting]
    return setting
