"""The chat format: conversations rendered with the reserved special tokens, and which tokens are trained.

    <|bos|><|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>

A tool call is an assistant turn whose content starts with `<|tool_call|>`; the tool's answer comes back as
a `tool` turn, after which the assistant speaks again:

    <|assistant|><|tool_call|>12*34<|end|><|tool|>408<|end|><|assistant|>408<|end|>

SFT trains on assistant content and its closing `<|end|>` only: the role headers, system, user and tool
text are given, not predicted.

A model imported from Hugging Face renders with its own chat template instead (interop/chat_template.py): every
caller goes through the tokenizer's `chat` (a `ChatFormat`), which is glasslab's format or the template's, and
reads completions back as this format's text, so environments and rewards never see the difference.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from glasslab.data.tokenizer import SPECIAL_TOKENS, Tokenizer
from glasslab.errors import GlasslabError

if TYPE_CHECKING:
    from glasslab.model.generate import Interceptor

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


class ChatFormat(Protocol):
    """How conversations become token ids for one tokenizer, and completions become this module's text."""

    specials: dict[int, str]  # special token ids -> their text, the end of a turn as END

    def render(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        """Token ids of a whole conversation and, per token, whether SFT trains on it."""

    def render_prompt(self, messages: list[Message]) -> list[int]:
        """The conversation so far, ready for the assistant's answer: what generation continues from."""

    def completion_text(self, tokens: Sequence[int]) -> str:
        """A generated completion as glasslab's text (turns closed by END, special tokens kept)."""

    def interceptor(self) -> Interceptor | None:
        """What runs tool calls during generation (None: the format has no tool protocol)."""


class GlasslabChat:
    """glasslab's own format, on a glasslab tokenizer."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.specials = {tok.id_of(t): t for t in SPECIAL_TOKENS}

    def render(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        tok = self.tok
        ids, trained = [tok.bos_id], [False]
        for m in messages:
            content = tok.encode(m.content) + [tok.end_id]
            ids += [tok.id_of(f"<|{m.role}|>"), *content]
            trained += [False] + [m.role == "assistant"] * len(content)
        return ids, trained

    def render_prompt(self, messages: list[Message]) -> list[int]:
        return self.render(messages)[0] + [self.tok.id_of("<|assistant|>")]

    def completion_text(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(tokens)

    def interceptor(self) -> Interceptor:
        from glasslab.chat.tools import ToolInterceptor

        return ToolInterceptor(self.tok)


def render(messages: list[Message], tok: Tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of a whole conversation and, per token, whether SFT trains on it."""
    return tok.chat.render(messages)


def render_prompt(messages: list[Message], tok: Tokenizer) -> list[int]:
    """The conversation so far, ending with the assistant header: what generation continues from."""
    return tok.chat.render_prompt(messages)


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
