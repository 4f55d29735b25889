"""Conversations rendered with a model's own chat template (Jinja, as transformers renders it), and which tokens
SFT trains on: exactly each assistant turn's content and the end-of-turn token that closes it.

The trained span of assistant message i is what rendering messages[:i+1] adds to rendering messages[:i] with the
generation prompt, up to and including the end-of-turn token; the whole conversation is then tokenized at once
(as `apply_chat_template` does) and a token is trained when its first character lies in such a span. Templates
that rewrite earlier turns once a later one exists (so a conversation is not an extension of its prefix) are
refused. Tool calls: the calculator protocol is glasslab's format only; a conversation with tool turns is refused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from glasslab.chat.format import END, TOOL_CALL, Message
from glasslab.errors import GlasslabError

if TYPE_CHECKING:
    from jinja2 import Template as Jinja

    from glasslab.interop.hf_tokenizer import TemplateTokenizer


def compile_template(source: str) -> Jinja:
    """A template compiled in a sandbox with the helpers transformers gives templates (tojson, raise_exception,
    strftime_now, loop controls), whitespace handled the same way (trim_blocks, lstrip_blocks)."""
    try:
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GlasslabError("chat templates need jinja2: pip install 'glasslab[hf]'") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x: Any, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as e:
        raise GlasslabError(f"the model's chat template does not compile ({e}): fix chat_template") from None


class ChatTemplate:
    """A model's chat template with the special-token variables it reads (bos_token, eos_token, ...)."""

    def __init__(self, source: str, variables: dict[str, str]) -> None:
        self.source, self.template, self.variables = source, compile_template(source), variables

    def __reduce__(self) -> tuple:
        """Pickled as its source (compiled templates do not pickle): RL's generate-ahead worker gets a copy."""
        return ChatTemplate, (self.source, self.variables)

    def text(self, messages: list[Message], generation_prompt: bool) -> str:
        for m in messages:
            if m.role == "tool" or m.content.startswith(TOOL_CALL):
                raise GlasslabError(
                    "an imported model's chat template has no calculator protocol: use tasks without tool calls"
                )
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=generation_prompt,
                **self.variables,
            )
        except TemplateError as e:
            raise GlasslabError(f"the model's chat template refused the conversation: {e}") from None


class TemplateChat:
    """The `ChatFormat` of an imported model: its template, its end-of-turn token, no tool protocol."""

    def __init__(self, tok: TemplateTokenizer, template: ChatTemplate) -> None:
        self.tok, self.template = tok, template
        self.end_text = tok.hf.id_to_token(tok.end_id)
        specials = [t for t in tok.hf.get_added_tokens_decoder().values() if t.special]
        self.specials = {tok.hf.token_to_id(t.content): t.content for t in specials} | {tok.end_id: END}

    def text(self, messages: list[Message], generation_prompt: bool) -> str:
        return self.template.text(messages, generation_prompt)

    def render(self, messages: list[Message]) -> tuple[list[int], list[bool]]:
        full = self.text(messages, False)
        spans = [self._assistant_span(messages, i, full) for i, m in enumerate(messages) if m.role == "assistant"]
        enc = self.tok.hf.encode(full, add_special_tokens=False)
        trained = [any(a <= start < b for a, b in spans) for start, _ in enc.offsets]
        return enc.ids, trained

    def _assistant_span(self, messages: list[Message], i: int, full: str) -> tuple[int, int]:
        before, upto = self.text(messages[:i], True), self.text(messages[: i + 1], False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise GlasslabError(
                "the model's chat template renders a turn differently once later turns follow: "
                "SFT cannot tell which tokens are the assistant's; use a model whose template extends its prefixes"
            )
        end = upto.find(self.end_text, len(before))
        return len(before), len(upto) if end < 0 else end + len(self.end_text)

    def render_prompt(self, messages: list[Message]) -> list[int]:
        return self.tok.encode(self.text(messages, True))

    def completion_text(self, tokens: Sequence[int]) -> str:
        """The text before the end-of-turn token, closed with glasslab's END when the turn ended."""
        tokens = [int(t) for t in tokens]
        ended = self.tok.end_id in tokens
        return self.tok.decode(tokens[: tokens.index(self.tok.end_id)] if ended else tokens) + (END if ended else "")

    def interceptor(self) -> None:
        return None
