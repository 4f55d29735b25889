"""The tokenizer: byte-level BPE (GPT-2 style) or character-level (nanoGPT style), on Hugging Face `tokenizers`.

Both kinds are stored as one standard tokenizer.json, so save/load and fingerprints work the same way.
Special tokens take ids 0..8 in both, so chat and tool formats never depend on the kind.
"""

import hashlib
import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from glasslab.errors import GlasslabError

if TYPE_CHECKING:
    from glasslab.chat.format import ChatFormat
    from glasslab.config import TokenizerConfig

SPECIAL_TOKENS = [
    "<|pad|>",
    "<|bos|>",
    "<|end|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|tool|>",
    "<|tool_call|>",
    "<|tool_result|>",
]
UNK = "<|unk|>"  # char kind only: characters never seen in training map here
MIN_BPE_VOCAB = 256 + len(SPECIAL_TOKENS)

# HF tokenizers slow down a lot on very long strings, so texts are encoded in pieces of ~4K
# characters (see cut_text), which also spreads one long text across threads.
_CUT = re.compile(r"\S\n")
_PIECE_CHARS = 1 << 12

Kind = Literal["bpe", "char"]


class Tokenizer:
    """Text <-> token ids. Special-token strings in the text (e.g. '<|user|>') encode to their single id."""

    def __init__(self, hf: HFTokenizer, kind: Kind):
        self.hf = hf
        self.kind = kind

    @classmethod
    def train(cls, docs: list[str], kind: Kind, vocab_size: int) -> "Tokenizer":
        """Learn a vocabulary from `docs`. For kind='char' the vocabulary is every distinct character
        plus the special tokens and <|unk|>, so `vocab_size` is ignored."""
        if kind == "bpe":
            return cls(_train_bpe(docs, vocab_size), "bpe")
        if kind == "char":
            return cls(_build_char(docs), "char")
        raise GlasslabError(f"unknown tokenizer kind '{kind}': use 'bpe' or 'char'")

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode many texts at once on all cores; long texts are cut into pieces (see cut_text)."""
        owners, pieces = [], []
        for i, text in enumerate(texts):
            for piece in cut_text(text, _PIECE_CHARS):
                owners.append(i)
                pieces.append(piece)
        out: list[list[int]] = [[] for _ in texts]
        for i, enc in zip(owners, self.hf.encode_batch(pieces, add_special_tokens=False)):
            out[i] += enc.ids
        return out

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Ids back to text; accepts lists, numpy arrays and tensors."""
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def id_of(self, token: str) -> int:
        """The id of one token string, e.g. id_of('<|user|>')."""
        i = self.hf.token_to_id(token)
        if i is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return i

    @property
    def pad_id(self) -> int:
        return SPECIAL_TOKENS.index("<|pad|>")

    @property
    def bos_id(self) -> int:
        return SPECIAL_TOKENS.index("<|bos|>")

    @property
    def end_id(self) -> int:
        return SPECIAL_TOKENS.index("<|end|>")

    @property
    def chat(self) -> "ChatFormat":
        """glasslab's chat format on this tokenizer."""
        from glasslab.chat.format import GlasslabChat

        return GlasslabChat(self)

    def save(self, path: str | Path) -> None:
        """Write a standard Hugging Face tokenizer.json (the kind follows from its model type)."""
        Path(path).write_text(self.hf.to_str(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise GlasslabError(f"tokenizer file '{path}' not found: pass the tokenizer.json of a glasslab run")
        try:
            hf = HFTokenizer.from_file(str(path))
        except Exception:  # tokenizers raises a bare Exception for malformed JSON
            msg = f"tokenizer file '{path}' is corrupt: retrain the tokenizer or restore the file"
            raise GlasslabError(msg) from None
        kind = {"BPE": "bpe", "WordLevel": "char"}.get(type(hf.model).__name__)
        if kind is None or [hf.token_to_id(t) for t in SPECIAL_TOKENS] != list(range(len(SPECIAL_TOKENS))):
            raise GlasslabError(f"'{path}' is not a glasslab tokenizer: pass the tokenizer.json of a glasslab run")
        return cls(hf, kind)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for in the text, indexed by id: what bits per byte divides by.
        Special tokens and <|unk|> count 0: they are markup, not text. A byte-level BPE token is a string of
        byte-level symbols, one per raw byte (a token may hold part of a multi-byte character), so the counts
        of a text's ids sum to exactly its UTF-8 length with either kind."""
        out = [0] * self.vocab_size
        for token, i in self.hf.get_vocab(with_added_tokens=True).items():
            if token not in SPECIAL_TOKENS and token != UNK:
                out[i] = len(token) if self.kind == "bpe" else len(token.encode("utf-8"))
        return out

    def fingerprint(self) -> str:
        """sha256 of the full tokenizer JSON: equal fingerprints mean identical token ids."""
        return hashlib.sha256(self.hf.to_str().encode("utf-8")).hexdigest()


def load_tokenizer(path: str | Path, cfg: "TokenizerConfig") -> "Tokenizer":
    """A run's tokenizer: glasslab's own, or (kind "hf") an imported model's with its chat template."""
    if cfg.kind == "hf":
        from glasslab.interop.hf_tokenizer import TemplateTokenizer

        return TemplateTokenizer.load(path, cfg)
    return Tokenizer.load(path)


def check_vocab_size(kind: Kind, vocab_size: int) -> None:
    """Byte-level BPE needs every byte and special token in its vocabulary (char ignores vocab_size)."""
    if kind == "bpe" and vocab_size < MIN_BPE_VOCAB:
        raise GlasslabError(
            f"tokenizer.vocab_size {vocab_size} is too small for byte-level BPE: use at least {MIN_BPE_VOCAB} "
            f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )


def _train_bpe(docs: list[str], vocab_size: int) -> HFTokenizer:
    check_vocab_size("bpe", vocab_size)
    hf = HFTokenizer(models.BPE())
    # one token per digit, so the model sees the positional structure that arithmetic needs
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    hf.train_from_iterator(docs, trainer, length=len(docs))
    return hf


def _build_char(docs: list[str]) -> HFTokenizer:
    chars = sorted(set().union(*map(set, docs)))
    vocab = {t: i for i, t in enumerate([*SPECIAL_TOKENS, UNK, *chars])}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token=UNK))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character alone
    hf.decoder = decoders.Fuse()  # join characters without the default spaces
    hf.add_special_tokens([*SPECIAL_TOKENS, UNK])
    return hf


def cut_text(text: str, max_chars: int) -> Iterator[str]:
    """Cut `text` into pieces of about `max_chars` that encode, one by one, to exactly the ids of the
    whole: cuts fall between a non-space character and a newline, where both pre-tokenizers split."""
    start = 0
    while len(text) - start > max_chars:
        m = _CUT.search(text, start + max_chars)
        if m is None:
            break
        yield text[start : m.start() + 1]
        start = m.start() + 1
    yield text[start:]
