"""The chat format: conversations rendered with the reserved special tokens, and which tokens are trained.

    <|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>

A tool call is an assistant turn whose content starts with `<|tool_call|>`; the tool's answer comes back as
a `tool` turn, after which the assistant speaks again:

    <|assistant|><|tool_call|>12*34<|end|><|tool|>408<|end|><|assistant|>408<|end|>

SFT trains on assistant content and its closing `<|end|>` only: the role headers, system, user and tool
text are given, not predicted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from glasslab.data.tokenizer import Tokenizer
from glasslab.errors import GlasslabError

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL = "<|tool_call|>"
END = "<|end|>"
_HEADER = re.compile(r"<\|(system|user|assistant|tool)\|>(.*)", re.DOTALL)


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise GlasslabError(f"unknown chat role '{self.role}': use one of {', '.join(ROLES)}")


def render(messages: list[Message], tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per token, whether SFT trains on it."""
    ids, trained = [tok.bos_id], [False]
    for m in messages:
        content = tok.encode(m.content) + [tok.end_id]
        ids += [tok.id_of(f"<|{m.role}|>"), *content]
        trained += [False] + [m.role == "assistant"] * len(content)
    return ids, trained


def render_prompt(messages: list[Message], tok: Tokenizer) -> list[int]:
    """The conversation so far, ending with the assistant header: what generation continues from."""
    return render(messages, tok)[0] + [tok.id_of("<|assistant|>")]


def parse_completion(text: str) -> list[Message]:
    """The turns of a generated completion, decoded with special tokens kept. Generation starts after an
    `<|assistant|>` header, so the first turn is the assistant's; each later one starts with its own header.
    An unterminated last turn (no `<|end|>`: truncated) is kept as it is; text after an `<|end|>` without
    a header is kept as an assistant turn."""
    messages = []
    segments = text.split(END)
    for i, segment in enumerate(segments):
        if i == len(segments) - 1 and not segment:
            break
        header = _HEADER.fullmatch(segment) if i else None
        messages.append(Message(header[1], header[2]) if header else Message("assistant", segment))
    return messages
