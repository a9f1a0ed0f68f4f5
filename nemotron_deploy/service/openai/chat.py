"""A chat model's prompt template (from the catalog): OpenAI ``messages`` -> one NeMo prompt.

Nemotron-4-340B-Instruct's card gives the template and recommends an empty system prompt::

    <extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{user}\\n<extra_id_1>Assistant\\n{reply}\\n...<extra_id_1>Assistant\\n
"""

from __future__ import annotations

from typing import Any

from .errors import invalid

ROLES = ("system", "user", "assistant")


def message_text(index: int, message: Any) -> tuple[str, str]:
    """(role, text) of one message; content as a string or a list of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise invalid(where, f"{where} must be an object with role and content")
    role = message.get("role")
    if role not in ROLES:
        raise invalid(f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)} (got {role!r})")
    content = message.get("content")
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        parts = []
        for k, part in enumerate(content):
            if not (
                isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
            ):
                raise invalid(f"{where}.content[{k}]", f"{where}.content[{k}]: only text parts are supported")
            parts.append(part["text"])
        return role, "".join(parts)
    raise invalid(f"{where}.content", f"{where}.content must be a string or a list of text parts")


def render(template: dict[str, str], messages: Any) -> str:
    """The prompt for `messages` with `template` (keys system, user, assistant, generation,
    default_system): one system turn first (the first message's if it is a system message), then the
    turns, ending with the assistant's opening for the model to complete."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects")
    turns = [message_text(i, m) for i, m in enumerate(messages)]
    system = template.get("default_system", "")
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
    if not turns or turns[-1][0] != "user":
        raise invalid("messages", "the last message must be the user's (the model answers it)")
    out = [template["system"].format(content=system)]
    for i, (role, text) in enumerate(turns):
        if role == "system":
            raise invalid(f"messages[{i + 1}].role", "a system message may only come first")
        out.append(template[role].format(content=text))
    out.append(template["generation"])
    return "".join(out)
