"""Your own SFT data: a JSONL file, one conversation per line.

    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Capital of France?"},
                  {"role": "assistant", "content": "Paris."}]}

Roles are system, user, assistant and tool (see `glasslab.chat.format`); every conversation needs an assistant turn,
since only assistant tokens are trained. Other keys on a line (ids, sources) are ignored. Every mistake is
reported with its line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from glasslab.chat.format import ROLES, TOOL_CALL, Message, render
from glasslab.data.tokenizer import Tokenizer
from glasslab.errors import GlasslabError


def parse_conversation(obj: object) -> list[Message]:
    """One line's conversation; ValueError saying what is wrong with it."""
    if not isinstance(obj, dict) or not isinstance(obj.get("messages"), list):
        raise ValueError('expected an object like {"messages": [{"role": "user", "content": "..."}, ...]}')
    messages = []
    for i, m in enumerate(obj["messages"], 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f'message {i} needs a "role" and a string "content"')
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has unknown role '{m['role']}' (use one of {', '.join(ROLES)})")
        if m["role"] == "tool" and not (messages and messages[-1].content.startswith(TOOL_CALL)):
            raise ValueError(f"message {i} is a tool result without an assistant tool call ({TOOL_CALL}...) before it")
        messages.append(Message(m["role"], m["content"]))
    if not any(m.role == "assistant" for m in messages):
        raise ValueError("it has no assistant turn, so there is nothing to train on")
    return messages


def load_conversations(path: Path, tok: Tokenizer, max_tokens: int) -> list[list[Message]]:
    """Every conversation of a JSONL file, checked to parse and to fit in `max_tokens` rendered tokens."""
    out = []
    for n, messages in read_conversations(path):
        length = len(render(messages, tok)[0])
        if length > max_tokens:
            raise GlasslabError(
                f"{path}, line {n}: the conversation is {length} tokens, more than the {max_tokens} that fit "
                "the model's context (model.block_size + 1): shorten or split it"
            )
        out.append(messages)
    return out


def read_conversations(path: Path) -> list[tuple[int, list[Message]]]:
    """(line number, conversation) for every non-blank line of a JSONL file, checked to parse. Needs no
    tokenizer, so a command can check the file before the run that trains its tokenizer exists."""
    path = Path(path)
    if not path.is_file():
        raise GlasslabError(f"conversation file '{path}' not found: pass --data with a JSONL file of conversations")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise GlasslabError(f"conversation file '{path}' is not UTF-8 (byte {e.start}): re-save it as UTF-8") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            messages = parse_conversation(json.loads(line))
        except ValueError as e:  # JSONDecodeError is a ValueError
            raise GlasslabError(f"{path}, line {n}: {e}: fix that line") from None
        out.append((n, messages))
    if not out:
        raise GlasslabError(f"conversation file '{path}' has no conversations: add one JSON object per line")
    return out
