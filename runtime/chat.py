"""The Llama-2-chat prompt format, token for token as Meta's reference `chat_completion` builds it.

Each finished turn is `[bos] [INST] {user} [/INST] {answer} [eos]`; the open turn is
`[bos] [INST] {user} [/INST]`. A system prompt is folded into the first user message between
`<<SYS>>` tags.
"""

from __future__ import annotations

from typing import Iterable, Mapping

from .tokenizer import LlamaTokenizer

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = (B_INST, E_INST, "<<SYS>>", "<</SYS>>")


class ChatFormatError(ValueError):
    pass


def _normalise(dialog: Iterable[Mapping[str, str]]) -> list[dict[str, str]]:
    messages = [{"role": m.get("role"), "content": m.get("content")} for m in dialog]
    if not messages:
        raise ChatFormatError("the dialog is empty; it must end with a user message")
    for i, m in enumerate(messages):
        if m["role"] not in ("system", "user", "assistant") or not isinstance(m["content"], str):
            raise ChatFormatError(f"message {i}: needs role system/user/assistant and string content, got {m}")
        if any(tag in m["content"] for tag in SPECIAL_TAGS):
            raise ChatFormatError(
                f"message {i} contains one of {', '.join(SPECIAL_TAGS)}; these tags are the chat format's "
                f"own and are not allowed inside a message"
            )
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise ChatFormatError("a system prompt must be followed by a user message")
        first = messages[1]
        messages = [{"role": first["role"], "content": B_SYS + messages[0]["content"] + E_SYS + first["content"]}]\
            + messages[2:]
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            raise ChatFormatError(
                f"turn {i} has role {m['role']!r} where {expected!r} is expected: after an optional system "
                f"prompt, roles alternate user/assistant"
            )
    if messages[-1]["role"] != "user":
        raise ChatFormatError("the dialog must end with a user message, which the model answers")
    return messages


def chat_prompt_ids(tokenizer: LlamaTokenizer, dialog: Iterable[Mapping[str, str]]) -> list[int]:
    messages = _normalise(dialog)
    ids: list[int] = []
    for prompt, answer in zip(messages[::2], messages[1::2]):
        text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
        ids += tokenizer.encode_plain(text, bos=True, eos=True)
    ids += tokenizer.encode_plain(f"{B_INST} {messages[-1]['content'].strip()} {E_INST}", bos=True)
    return ids
