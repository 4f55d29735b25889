"""Token shards on disk and the batch samplers that feed training and evaluation.

The corpus is tokenized once into cache_dir/<key>/{train,val}.bin (flat token arrays) and
memory-mapped afterwards, so restarts and sweeps skip tokenization and RAM stays small.
"""

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from glasslab.data.corpus import corpus_fingerprint
from glasslab.data.tokenizer import Tokenizer, cut_text
from glasslab.errors import GlasslabError

CACHE_VERSION = 1  # bump when the split or file format changes, so stale caches are not reused
MIN_DOCS_FOR_DOC_SPLIT = 10  # with fewer documents, whole-document val sets get too lumpy
ENCODE_BATCH_CHARS = 1 << 20  # tokenize ~1M characters at a time: bounds memory on big corpora


@dataclass
class TokenSplits:
    """Memory-mapped train/val tokens (bits per byte counts the bytes of the evaluated targets themselves:
    LanguageModeling.evaluate)."""

    train: np.ndarray
    val: np.ndarray


def build_token_splits(
    docs: list[str], tokenizer: Tokenizer, cache_dir: Path, val_fraction: float, seed: int
) -> TokenSplits:
    """Split, tokenize and cache `docs`; reuse the cache when corpus, tokenizer and split are unchanged.
    Every document (or document part) starts with <|bos|>, marking where texts begin."""
    if not 0 < val_fraction < 1:
        raise GlasslabError(f"val_fraction {val_fraction} is out of range: use a value between 0 and 1, e.g. 0.1")
    key_src = json.dumps([CACHE_VERSION, corpus_fingerprint(docs), tokenizer.fingerprint(), val_fraction, seed])
    out = Path(cache_dir) / hashlib.sha256(key_src.encode()).hexdigest()[:16]
    if not (out / "meta.json").exists():
        _write_splits(docs, tokenizer, out, val_fraction, seed)
    meta = json.loads((out / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    return TokenSplits(
        train=np.memmap(out / "train.bin", dtype=dtype, mode="r"),
        val=np.memmap(out / "val.bin", dtype=dtype, mode="r"),
    )


def split_documents(docs: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, val) texts. With enough documents, val gets whole documents picked by a hash of their
    content and the seed, so a document stays on its side when others are added. With few documents,
    the last val_fraction of each document's characters goes to val, so one text file still gets a val set."""
    if len(docs) < MIN_DOCS_FOR_DOC_SPLIT:
        cuts = [int(len(d) * (1 - val_fraction)) for d in docs]
        return [d[:c] for d, c in zip(docs, cuts) if d[:c]], [d[c:] for d, c in zip(docs, cuts) if d[c:]]
    scores = [_unit_hash(d, seed) for d in docs]
    n_val = min(max(sum(s < val_fraction for s in scores), 1), len(docs) - 1)  # both sides non-empty
    val_ids = set(sorted(range(len(docs)), key=scores.__getitem__)[:n_val])
    return [d for i, d in enumerate(docs) if i not in val_ids], [d for i, d in enumerate(docs) if i in val_ids]


def _unit_hash(doc: str, seed: int) -> float:
    """A deterministic pseudo-random number in [0, 1) for a document."""
    h = hashlib.sha256(f"{seed}\0{doc}".encode())
    return int.from_bytes(h.digest()[:8], "big") / 2**64


def _write_splits(docs: list[str], tokenizer: Tokenizer, out: Path, val_fraction: float, seed: int) -> None:
    """Tokenize into a temp dir next to `out`, then rename: a crash never leaves a half-written cache."""
    train_docs, val_docs = split_documents(docs, val_fraction, seed)
    for name, part in (("training", train_docs), ("validation", val_docs)):
        if not part:
            raise GlasslabError(
                f"the {name} split is empty: use more data or a val_fraction (now {val_fraction}) nearer 0.1"
            )
    dtype = np.uint16 if tokenizer.vocab_size < 2**16 else np.uint32
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        n_train = _write_tokens(train_docs, tokenizer, tmp / "train.bin", dtype)
        n_val = _write_tokens(val_docs, tokenizer, tmp / "val.bin", dtype)
        meta = {
            "dtype": np.dtype(dtype).name,
            "train_tokens": n_train,
            "val_tokens": n_val,
            "train_docs": len(train_docs),
            "val_docs": len(val_docs),
            "val_bytes": sum(len(d.encode("utf-8")) for d in val_docs),
            "val_fraction": val_fraction,
            "seed": seed,
            "tokenizer_fingerprint": tokenizer.fingerprint(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished the same cache first; theirs is identical
            if not (out / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_tokens(docs: list[str], tokenizer: Tokenizer, path: Path, dtype: type) -> int:
    """Write <|bos|> + ids of each document to `path`, ~ENCODE_BATCH_CHARS at a time; return the count."""
    n = 0
    bos = np.array([tokenizer.bos_id], dtype=dtype).tobytes()
    with open(path, "wb") as f:
        for batch in _batches(docs, ENCODE_BATCH_CHARS):
            for (starts_doc, _), ids in zip(batch, tokenizer.encode_batch([text for _, text in batch])):
                f.write((bos if starts_doc else b"") + np.array(ids, dtype=dtype).tobytes())
                n += starts_doc + len(ids)
    return n


def _batches(docs: list[str], max_chars: int) -> Iterator[list[tuple[bool, str]]]:
    """Group (starts a document, text) parts into batches of about max_chars; a huge document is
    cut into several parts (see cut_text), so one giant text file cannot exhaust memory."""
    batch: list[tuple[bool, str]] = []
    chars = 0
    for doc in docs:
        for i, part in enumerate(cut_text(doc, max_chars)):
            if batch and chars + len(part) > max_chars:
                yield batch
                batch, chars = [], 0
            batch.append((i == 0, part))
            chars += len(part)
    if batch:
        yield batch


class BatchSampler:
    """Random (x, y) training windows, nanoGPT style, reproducible from a seed and resumable mid-run."""

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, seed: int):
        _check_fits(tokens, block_size)
        self.tokens = tokens
        self.batch_size = batch_size
        self.block_size = block_size
        self.seed = seed
        self.batches_drawn = 0
        self.rng = np.random.default_rng(seed)
        self._window = np.arange(block_size + 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: int64 (batch_size, block_size), y[i, t] = x[i, t + 1] in the token stream."""
        starts = self.rng.integers(0, len(self.tokens) - self.block_size, size=self.batch_size)
        self.batches_drawn += 1
        return _gather(self.tokens, starts, self._window)

    def state_dict(self) -> dict:
        """JSON-serialisable; the numpy generator state restores the exact random stream."""
        return {"seed": self.seed, "batches_drawn": self.batches_drawn, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.seed = state["seed"]
        self.batches_drawn = state["batches_drawn"]
        self.rng.bit_generator.state = state["rng"]


def eval_batches(
    tokens: np.ndarray, batch_size: int, block_size: int, n_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of windows at evenly spaced offsets across `tokens`, so val loss is comparable
    across steps and runs (no sampling noise between evaluations)."""
    _check_fits(tokens, block_size)
    starts = np.linspace(0, len(tokens) - block_size - 1, num=batch_size * n_batches).astype(np.int64)
    window = np.arange(block_size + 1)
    return [_gather(tokens, s, window) for s in starts.reshape(n_batches, batch_size)]


def _gather(tokens: np.ndarray, starts: np.ndarray, window: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """One vectorised read of (B, T+1) tokens from the memmap, then x/y views copied contiguous."""
    chunk = torch.from_numpy(np.asarray(tokens[starts[:, None] + window], dtype=np.int64))
    return chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()


def _check_fits(tokens: np.ndarray, block_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise GlasslabError(
            f"only {len(tokens)} tokens but block_size {block_size} needs at least {block_size + 1}: "
            f"use a smaller block_size, more data or a larger val_fraction"
        )
