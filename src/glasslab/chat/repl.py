"""Chatting with a run in the terminal: streamed tokens, multi-turn history, the calculator tool on call.

Streaming rides on the generation engine's `Interceptor` hook, which sees each row's completion after every
sampled token: `StreamingTools` prints what is new, then lets the `ToolInterceptor` run any tool call. So chat
generates exactly as eval and RL do.
"""

from __future__ import annotations

from rich.console import Console
from torch import nn

from glasslab.chat.format import Message, parse_completion, render_prompt
from glasslab.data.tokenizer import Tokenizer
from glasslab.errors import GlasslabError
from glasslab.model.beam import beam_search
from glasslab.model.generate import generate
from glasslab.train.evaluate import completion_text

TOOL_STYLE = "cyan"


class TokenPrinter:
    """Prints a completion token by token: plain text as soon as it decodes (holding back half a UTF-8
    character), a tool call and its result as `[calculator: 12*34 = 408]`, other special tokens dimmed."""

    def __init__(self, tok: Tokenizer, console: Console) -> None:
        self.tok, self.console = tok, console
        self.special = tok.chat.specials
        self.state = "answer"  # answer | call | result
        self.segment: list[int] = []  # plain tokens since the last special one
        self.shown = 0  # characters of the segment's text already printed

    def feed(self, ids: list[int]) -> None:
        for i in ids:
            if i not in self.special:
                self.segment.append(i)
                self._flush(final=False)
                continue
            self._flush(final=True)
            self.segment, self.shown = [], 0
            token = self.special[i]
            if token == "<|tool_call|>":
                self.state = "call"
                self._print("[calculator: ", TOOL_STYLE)
            elif token == "<|tool|>":
                self.state = "result"
                self._print(" = ", TOOL_STYLE)
            elif token == "<|end|>":
                self._print("] " if self.state == "result" else "", TOOL_STYLE)
            elif token == "<|assistant|>":
                self.state = "answer"
            else:
                self._print(token, "dim")

    def _flush(self, final: bool) -> None:
        text = self.tok.decode(self.segment)
        if not final and text.endswith("\ufffd"):
            return
        self._print(text[self.shown :], TOOL_STYLE if self.state != "answer" else None)
        self.shown = len(text)

    def _print(self, text: str, style: str | None) -> None:
        if text:
            self.console.print(text, end="", style=style, markup=False, highlight=False, soft_wrap=True)


class StreamingTools:
    """An `Interceptor` for a single row: prints each new token, then runs tool calls."""

    def __init__(self, tok: Tokenizer, printer: TokenPrinter | None) -> None:
        self.tools, self.printer, self.printed = tok.chat.interceptor(), printer, 0

    def __call__(self, row: int, completion: list[int]) -> list[int] | None:
        self.flush(completion)
        return self.tools(row, completion) if self.tools else None

    def flush(self, completion: list[int]) -> None:
        if self.printer:
            self.printer.feed(completion[self.printed :])
        self.printed = len(completion)


def fit_history(history: list[Message], tok: Tokenizer, budget: int) -> list[Message]:
    """Drop the oldest turns after the system prompt until the prompt takes at most `budget` tokens."""
    system = [m for m in history[:1] if m.role == "system"]
    turns = history[len(system) :]
    while turns and len(render_prompt(system + turns, tok)) > budget:
        turns = turns[1:]
        while turns and turns[0].role != "user":  # never start mid-exchange
            turns = turns[1:]
    if not turns:
        raise GlasslabError(
            f"the message does not fit the model's context ({budget} tokens for the prompt): write a shorter one"
        )
    return system + turns


def reply(
    model: nn.Module,
    tok: Tokenizer,
    history: list[Message],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int,
    console: Console | None = None,
    num_beams: int = 1,
) -> tuple[list[Message], list[Message]]:
    """The assistant's turns (tool calls and results included) answering `history`, streamed to `console`
    when given; also returns the history actually used, trimmed to leave room for the answer. With
    `num_beams` > 1 the answer is the best beam, shown once the search ends."""
    block = model.cfg.block_size
    history = fit_history(history, tok, block - min(max_new_tokens, block // 2))
    prompt = render_prompt(history, tok)
    stream = StreamingTools(tok, TokenPrinter(tok, console) if console else None)
    budget = min(max_new_tokens, block - len(prompt))
    if num_beams > 1:
        best = beam_search(model, prompt, budget, num_beams=num_beams, stop_ids=(tok.end_id,), interceptor=stream.tools)
        stream.flush(best[0].tokens)
        return parse_completion(completion_text(tok, best[0].tokens)), history
    out = generate(
        model,
        [prompt],
        budget,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        stop_ids=(tok.end_id,),
        pad_id=tok.pad_id,
        seed=seed,
        interceptor=stream,
    )
    stream.flush(out.tokens[0])
    return parse_completion(completion_text(tok, out.tokens[0])), history


def final_text(turns: list[Message]) -> str:
    """What the assistant finally said: its last turn that is not a tool call."""
    answers = [m.content for m in turns if m.role == "assistant" and not m.content.startswith("<|tool_call|>")]
    return answers[-1] if answers else ""


def repl(
    model: nn.Module, tok: Tokenizer, *, system: str | None, seed: int, out: Console, ui: Console, **sampling
) -> None:
    """Read a message, stream the answer, repeat. /reset forgets the conversation, /quit (or Ctrl-D) leaves;
    Ctrl-C stops an answer mid-way."""
    base = [Message("system", system)] if system else []
    history = list(base)
    ui.print("[dim]chat: /reset forgets the conversation, /quit leaves[/]", highlight=False)
    turn = 0
    while True:
        try:
            text = ui.input("[bold]you>[/] ")
        except (EOFError, KeyboardInterrupt):
            ui.print()
            return
        if text.strip() in ("/quit", "/exit"):
            return
        if text.strip() == "/reset":
            history = list(base)
            ui.print("[dim]conversation cleared[/]")
            continue
        if not text.strip():
            continue
        ui.print("[bold]bot>[/] ", end="")
        try:
            turns, used = reply(
                model, tok, [*history, Message("user", text)], seed=seed + turn, console=out, **sampling
            )
        except KeyboardInterrupt:
            ui.print("\n[dim](stopped)[/]")
            continue
        except GlasslabError as e:
            ui.print(f"\n[red]{e}[/]")
            continue
        out.print()
        if len(used) < len(history) + 1:
            ui.print("[dim](older turns dropped to fit the context)[/]")
        history = [*used, *turns]
        turn += 1
