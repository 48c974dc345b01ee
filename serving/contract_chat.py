"""ChatOpenAI that frames a bare conversation the way an adapter was trained.

A merged model carries its prompt contract in its chat template (components/prompt_contract.wrap_template). An
adapter shares its base's deployment, and so its base's template, with every other adapter of that base: the
contract (the version's `prompt.system_prompt` and `prompt.user_prefix` tags) is applied here instead, with the
template's rule: a system message only where the caller gave none, the prefix only where a user message lacks it.
"""

from __future__ import annotations

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_openai import ChatOpenAI


def framed(messages: list[BaseMessage], system: str, prefix: str) -> list[BaseMessage]:
    out = list(messages)
    if prefix:
        out = [
            HumanMessage(prefix + m.content)
            if isinstance(m, HumanMessage) and isinstance(m.content, str) and not m.content.startswith(prefix)
            else m
            for m in out
        ]
    if system and not (out and isinstance(out[0], SystemMessage)):
        out = [SystemMessage(system), *out]
    return out


class ContractChatOpenAI(ChatOpenAI):
    contract: tuple[str, str] = ("", "")  # (system prompt, user prefix); empty: messages pass as they are

    def _convert_input(self, model_input):
        prompt = super()._convert_input(model_input)
        system, prefix = self.contract
        if not system and not prefix:
            return prompt
        from langchain_core.prompt_values import ChatPromptValue

        return ChatPromptValue(messages=framed(prompt.to_messages(), system, prefix))
