"""An imported model's tokenizer behind glasslab's `Tokenizer` interface: its tokenizer.json kept as it is, the
special tokens glasslab needs (document start, end of turn, padding) named in the run's [tokenizer] config, and
conversations rendered with its chat template."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from glasslab.config import TokenizerConfig
from glasslab.data.tokenizer import Tokenizer
from glasslab.errors import GlasslabError
from glasslab.interop.chat_template import ChatTemplate, TemplateChat

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte fallback: one raw byte


class TemplateTokenizer(Tokenizer):
    def __init__(self, hf: HFTokenizer, cfg: TokenizerConfig) -> None:
        super().__init__(hf, "bpe")
        self.cfg = cfg
        self._special_ids = {name: self.id_of(getattr(cfg, name)) for name in ("bos_token", "end_token", "pad_token")}
        self._chat = TemplateChat(self, ChatTemplate(cfg.chat_template, cfg.template_vars))

    @classmethod
    def load(cls, path: str | Path, cfg: TokenizerConfig) -> TemplateTokenizer:  # type: ignore[override]
        path = Path(path)
        if not path.is_file():
            raise GlasslabError(f"tokenizer file '{path}' not found: import the model again with glasslab import-hf")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception:  # tokenizers raises a bare Exception for malformed JSON
            raise GlasslabError(f"tokenizer file '{path}' is corrupt: import the model again") from None
        return cls(hf, cfg)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Whole texts: glasslab's cut points are safe for its own pre-tokenizers only."""
        return [e.ids for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def pad_id(self) -> int:
        return self._special_ids["pad_token"]

    @property
    def bos_id(self) -> int:
        return self._special_ids["bos_token"]

    @property
    def end_id(self) -> int:
        return self._special_ids["end_token"]

    @property
    def chat(self) -> TemplateChat:
        return self._chat

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes per id, special tokens 0: byte-level BPE symbols are one byte each; SentencePiece pieces
        are their text with '▁' for a space, and its byte-fallback tokens one byte."""
        byte_level = type(self.hf.decoder).__name__ == "ByteLevel"
        special = {t.content for t in self.hf.get_added_tokens_decoder().values() if t.special}
        out = [0] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if token in special:
                continue
            if byte_level or _BYTE_TOKEN.fullmatch(token):
                out[i] = 1 if not byte_level else len(token)
            else:
                out[i] = len(token.replace("\u2581", " ").encode("utf-8"))
        return out
