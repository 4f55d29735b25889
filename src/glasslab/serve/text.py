"""From completion tokens to what a client reads: text as soon as it decodes, calculator calls, stop strings.

A chat completion holds the assistant's words and, when the model calls the calculator, the call and its result
(forced by the `ToolInterceptor`, as in `glasslab chat`). `ChatText` splits the tokens into the answer's text and
the calls, so a streaming client gets text deltas and one event per call; a raw completion is its plain text,
special tokens dropped, as `glasslab sample` prints it.
Both hold back half a UTF-8 character, and `StopStrings` holds back what could be the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass

from glasslab.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class ToolCall:
    expression: str
    result: str


class ChatText:
    """Fed an assistant completion a few tokens at a time; returns its new text and its completed tool calls.

    The text is what `glasslab chat --json` answers (`final_text` of the parsed completion): a turn that starts
    with `<|tool_call|>` is a call, whose `<|end|><|tool|>RESULT<|end|><|assistant|>` the interceptor forced;
    any other turn is the answer, special tokens inside it kept as written, and its closing `<|end|>` dropped."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.end, self.call = tok.end_id, tok.id_of("<|tool_call|>")
        self.tool, self.assistant = tok.id_of("<|tool|>"), tok.id_of("<|assistant|>")
        self.state = "answer"  # answer | call | result
        self.segment: list[int] = []  # the tokens of the current turn
        self.shown = 0  # characters of the answer's text already returned
        self.expression = ""

    def feed(self, ids: list[int], final: bool = False) -> tuple[str, list[ToolCall]]:
        calls = []
        for i in ids:
            if self.state == "answer":
                if i == self.call and not self.segment:
                    self.state = "call"
                elif i != self.end:
                    self.segment.append(i)
            elif i == self.end:
                content, self.segment = self.tok.decode(self.segment), []
                if self.state == "call":
                    self.expression = content
                else:
                    calls.append(ToolCall(self.expression, content))
            elif i == self.tool:
                self.state, self.segment = "result", []
            elif i == self.assistant:
                self.state, self.segment, self.shown = "answer", [], 0
            else:
                self.segment.append(i)
        return (self._answer_text(final) if self.state == "answer" else ""), calls

    def _answer_text(self, final: bool) -> str:
        text = self.tok.decode(self.segment)
        if not final and text.endswith("\ufffd"):
            return ""
        new, self.shown = text[self.shown :], len(text)
        return new


class PlainText:
    """A raw completion's text, special tokens dropped, half a UTF-8 character held back until it completes."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok, self.ids, self.shown = tok, [], 0

    def feed(self, ids: list[int], final: bool = False) -> tuple[str, list[ToolCall]]:
        self.ids += ids
        text = self.tok.decode(self.ids, skip_special=True)
        if not final and text.endswith("\ufffd"):
            return "", []
        new, self.shown = text[self.shown :], len(text)
        return new, []


class StopStrings:
    """OpenAI's `stop`: the text ends before the first stop string, which is not returned. Text that could be
    the start of a stop string waits until the next tokens tell."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.held = [s for s in stops if s], ""

    def feed(self, text: str, final: bool = False) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was hit)."""
        text = self.held + text
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return text[: min(hits)], True
        keep = 0 if final else max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False
