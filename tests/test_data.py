"""Tests for glasslab.data: corpus loading, tokenizers, token shards and samplers."""

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from glasslab.config import ModelConfig
from glasslab.data import tokenizer as tokenizer_module
from glasslab.data import tokens as tokens_module
from glasslab.data.corpus import corpus_fingerprint, load_documents
from glasslab.data.tokenizer import MIN_BPE_VOCAB, SPECIAL_TOKENS, Tokenizer
from glasslab.data.tokens import BatchSampler, TokenSplits, build_token_splits, eval_batches, split_documents
from glasslab.errors import GlasslabError
from glasslab.model.gpt import GPT
from glasslab.objectives.lm import LanguageModeling

UNICODE = "Ünïcödé: 日本語, emoji 🎭🗡️, maths 12+345=357\n\ttabs\r\nand\n\n\nnewlines  "


@pytest.fixture(scope="module")
def shakespeare() -> list[str]:
    return load_documents(None)


@pytest.fixture(scope="module")
def small_docs(shakespeare: list[str]) -> list[str]:
    """12 short documents: enough for the document-level split, small enough to stay fast."""
    return [d[:4000] for d in shakespeare[:12]]


@pytest.fixture(scope="module")
def bpe(small_docs: list[str]) -> Tokenizer:
    return Tokenizer.train(small_docs, "bpe", 512)


@pytest.fixture(scope="module")
def char(small_docs: list[str]) -> Tokenizer:
    return Tokenizer.train(small_docs, "char", 0)


# ---------------------------------------------------------------- corpus


def test_embedded_corpus(shakespeare: list[str]) -> None:
    assert len(shakespeare) == 42
    assert sum(len(d) for d in shakespeare) > 4_000_000
    assert shakespeare[0].startswith("ALL'S WELL THAT ENDS WELL\n")
    assert all(d.endswith("\n") and "\f" not in d and "\r" not in d for d in shakespeare)
    assert load_documents("shakespeare") == shakespeare


def test_text_file(tmp_path: Path) -> None:
    (tmp_path / "notes.log").write_text("To be, or not to be\n", encoding="utf-8")
    assert load_documents(str(tmp_path / "notes.log")) == ["To be, or not to be\n"]


def test_text_directory(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "two.md").write_text("# two")
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")
    assert load_documents(str(tmp_path)) == ["one", "# two"]


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"text": "first"}, {"text": "line\u2028separator inside"}, {"body": "x", "text": "third"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    assert load_documents(str(path)) == ["first", "line\u2028separator inside", "third"]


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"id": [1, 2, 3], "content": ["alpha", None, "gamma"]}), path)
    assert load_documents(str(path), text_field="content") == ["alpha", "gamma"]


def _save_to_disk(path: Path, texts: list[str]) -> None:
    """Write what `datasets.Dataset.save_to_disk` writes: an Arrow stream file plus two JSON files."""
    path.mkdir(parents=True)
    table = pa.table({"text": texts, "label": list(range(len(texts)))})
    with pa.OSFile(str(path / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    features = {"text": {"dtype": "string", "_type": "Value"}, "label": {"dtype": "int64", "_type": "Value"}}
    (path / "dataset_info.json").write_text(json.dumps({"citation": "", "description": "", "features": features}))
    state = {
        "_data_files": [{"filename": "data-00000-of-00001.arrow"}],
        "_fingerprint": "0123456789abcdef",
        "_format_columns": None,
        "_format_kwargs": {},
        "_format_type": None,
        "_output_all_columns": False,
        "_split": None,
    }
    (path / "state.json").write_text(json.dumps(state))


def test_datasets_directory(tmp_path: Path) -> None:
    _save_to_disk(tmp_path / "ds", ["doc one", "doc two"])
    assert load_documents(str(tmp_path / "ds")) == ["doc one", "doc two"]


def test_datasets_dict_uses_train_split(tmp_path: Path) -> None:
    root = tmp_path / "dd"
    _save_to_disk(root / "train", ["train doc"])
    _save_to_disk(root / "test", ["test doc"])
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert load_documents(str(root)) == ["train doc"]


def test_arrow_file_format_fallback(tmp_path: Path) -> None:
    _save_to_disk(tmp_path / "ds", ["x"])
    table = pa.table({"text": ["written as an IPC file"]})
    with pa.OSFile(str(tmp_path / "ds" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    assert load_documents(str(tmp_path / "ds")) == ["written as an IPC file"]


def _raises(match: str, source: str, **kwargs: str) -> str:
    with pytest.raises(GlasslabError, match=match) as err:
        load_documents(source, **kwargs)
    message = str(err.value)
    assert "\n" not in message and ": " in message  # one line: the problem, then the fix
    return message


def test_corpus_errors(tmp_path: Path) -> None:
    assert "--data" in _raises("not found", str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    _raises("is empty", str(tmp_path / "empty.txt"))
    (tmp_path / "model.bin").write_bytes(b"\x00\x01\x02weights")
    _raises("binary", str(tmp_path / "model.bin"))
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    _raises("not valid UTF-8", str(tmp_path / "latin1.txt"))
    (tmp_path / "nodocs").mkdir()
    (tmp_path / "nodocs" / "data.csv").write_text("a,b")
    _raises("no .txt or .md files", str(tmp_path / "nodocs"))


def test_jsonl_errors(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    _raises("line 2 is not valid JSON", str(path))
    path.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert "data.text_field" in _raises("line 2 has no string field 'text'", str(path))
    path.write_text('{"text": ""}\n{"text": "   "}\n')
    _raises("no non-empty documents", str(path))


def test_column_errors(tmp_path: Path) -> None:
    pq.write_table(pa.table({"question": ["q"], "answer": ["a"]}), tmp_path / "d.parquet")
    assert "question, answer" in _raises("no column 'text'", str(tmp_path / "d.parquet"))
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "n.parquet")
    _raises("not text", str(tmp_path / "n.parquet"))
    _save_to_disk(tmp_path / "ds", ["x"])
    assert "label" in _raises("no column 'content'", str(tmp_path / "ds"), text_field="content")


def test_corpus_fingerprint() -> None:
    assert corpus_fingerprint(["ab", "c"]) == corpus_fingerprint(["ab", "c"])
    assert corpus_fingerprint(["ab", "c"]) != corpus_fingerprint(["a", "bc"])
    assert len(corpus_fingerprint([])) == 64


# ---------------------------------------------------------------- tokenizer


def test_bpe_round_trip(bpe: Tokenizer, shakespeare: list[str]) -> None:
    text = shakespeare[20][:20000]  # a work the tokenizer was not trained on
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.decode(bpe.encode(UNICODE)) == UNICODE
    assert bpe.vocab_size == 512 and bpe.kind == "bpe"


def test_long_text_encodes_like_the_whole(bpe: Tokenizer, shakespeare: list[str]) -> None:
    text = shakespeare[5][:30000] + UNICODE * 3
    assert len(text) > 4 * tokenizer_module._PIECE_CHARS
    assert bpe.encode(text) == bpe.hf.encode(text, add_special_tokens=False).ids
    assert bpe.encode_batch([text, "", "x"]) == [bpe.encode(text), [], bpe.encode("x")]


def test_digits_split(bpe: Tokenizer) -> None:
    ids = bpe.encode("12345")
    assert [bpe.decode([i]) for i in ids] == list("12345")
    assert len(bpe.encode("year 1600")) >= 4 + 1


def test_special_tokens(bpe: Tokenizer, char: Tokenizer) -> None:
    for tok in (bpe, char):
        assert [tok.id_of(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
        assert (tok.pad_id, tok.bos_id, tok.end_id) == (0, 1, 2)
        ids = tok.encode("<|user|>hi<|end|>")
        assert ids[0] == tok.id_of("<|user|>") and ids[-1] == tok.end_id
        assert tok.decode(ids) == "<|user|>hi<|end|>"
        assert tok.decode(ids, skip_special=True) == "hi"
    with pytest.raises(KeyError):
        bpe.id_of("<|nope|>")


def test_save_load(bpe: Tokenizer, char: Tokenizer, tmp_path: Path) -> None:
    for tok in (bpe, char):
        tok.save(tmp_path / "tokenizer.json")
        loaded = Tokenizer.load(tmp_path / "tokenizer.json")
        assert loaded.kind == tok.kind and loaded.fingerprint() == tok.fingerprint()
        assert loaded.encode(UNICODE) == tok.encode(UNICODE)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(GlasslabError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(GlasslabError, match="corrupt"):
        Tokenizer.load(tmp_path / "bad.json")
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models

    HFTokenizer(models.BPE()).save(str(tmp_path / "foreign.json"))
    with pytest.raises(GlasslabError, match="not a glasslab tokenizer"):
        Tokenizer.load(tmp_path / "foreign.json")


def test_train_errors_and_determinism(small_docs: list[str], bpe: Tokenizer) -> None:
    with pytest.raises(GlasslabError, match="at least 265"):
        Tokenizer.train(small_docs, "bpe", 100)
    with pytest.raises(GlasslabError, match="'bpe' or 'char'"):
        Tokenizer.train(small_docs, "wordpiece", 512)  # type: ignore[arg-type]
    assert Tokenizer.train(small_docs, "bpe", 512).fingerprint() == bpe.fingerprint()


def test_char_tokenizer(char: Tokenizer, small_docs: list[str]) -> None:
    chars = set("".join(small_docs))
    assert char.kind == "char" and char.vocab_size == len(SPECIAL_TOKENS) + 1 + len(chars)
    text = small_docs[3]
    ids = char.encode(text)
    assert len(ids) == len(text) and char.decode(ids) == text
    unk = char.id_of("<|unk|>")
    assert char.encode("a🎭b") == [char.id_of("a"), unk, char.id_of("b")]


# ---------------------------------------------------------------- token splits


def test_token_bytes_hand_count() -> None:
    """Counted by hand: 'a' 1 byte, 'é' 2, '€' 3, '🎭' 4; special tokens and <|unk|> 0."""
    char = Tokenizer.train(["aé€🎭"], "char", 0)
    counts = char.token_bytes()
    assert [counts[i] for i in char.encode("aé€🎭")] == [1, 2, 3, 4]
    assert [counts[char.id_of(t)] for t in [*SPECIAL_TOKENS, "<|unk|>"]] == [0] * 10
    bpe = Tokenizer.train(["aé€🎭 " * 50], "bpe", MIN_BPE_VOCAB)  # no merges: one id per byte
    assert [bpe.token_bytes()[i] for i in bpe.encode("é€")] == [1] * 5


def test_token_bytes_sum_to_utf8_length(bpe: Tokenizer, char: Tokenizer, small_docs: list[str]) -> None:
    """Byte-level BPE splits multi-byte characters across ids; their counts still add up to the text's bytes."""
    for tok, text in ((bpe, UNICODE + small_docs[0][:500]), (char, small_docs[1][:500] + "<|bos|>x")):
        counts = tok.token_bytes()
        assert sum(counts[i] for i in tok.encode(text)) == len(text.replace("<|bos|>", "").encode("utf-8"))
    assert any(len(bpe.decode([i]).encode()) != bpe.token_bytes()[i] for i in bpe.encode(UNICODE))


def test_split_documents() -> None:
    docs = [f"document number {i}\n" for i in range(40)]
    train, val = split_documents(docs, 0.25, seed=1)
    assert sorted(train + val) == sorted(docs) and 1 <= len(val) < 40
    assert split_documents(docs, 0.25, seed=1) == (train, val)
    assert split_documents(docs, 0.25, seed=2) != (train, val)
    # adding documents never moves an existing one to the other side
    more_train, more_val = split_documents(docs + [f"new {i}" for i in range(10)], 0.25, seed=1)
    assert set(val) <= set(more_val) and set(train) <= set(more_train)
    # a single text is cut by characters: the last 10% is val
    assert split_documents(["0123456789" * 10], 0.1, seed=0) == (["0123456789" * 9], ["0123456789"])


def test_build_token_splits(small_docs: list[str], bpe: Tokenizer, tmp_path: Path) -> None:
    splits = build_token_splits(small_docs, bpe, tmp_path, val_fraction=0.2, seed=7)
    assert splits.train.dtype == np.uint16 and isinstance(splits.train, np.memmap)
    assert splits.train[0] == bpe.bos_id and splits.val[0] == bpe.bos_id
    train_docs, val_docs = split_documents(small_docs, 0.2, seed=7)
    assert len(splits.val) == sum(len(bpe.encode(d)) + 1 for d in val_docs)
    assert int((np.asarray(splits.train) == bpe.bos_id).sum()) == len(train_docs)
    assert bpe.decode(splits.val, skip_special=True) == "".join(val_docs)
    meta = json.loads(next(tmp_path.glob("*/meta.json")).read_text())
    assert meta["val_bytes"] == sum(len(d.encode()) for d in val_docs)
    (key_dir,) = [p for p in tmp_path.iterdir()]  # no temp dirs left behind
    assert json.loads((key_dir / "meta.json").read_text())["val_tokens"] == len(splits.val)


def test_small_encode_batches_give_same_tokens(
    small_docs: list[str], bpe: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    whole = build_token_splits(small_docs[:3], bpe, tmp_path / "a", 0.1, seed=0)
    monkeypatch.setattr(tokens_module, "ENCODE_BATCH_CHARS", 300)  # cuts every document into parts
    parts = build_token_splits(small_docs[:3], bpe, tmp_path / "b", 0.1, seed=0)
    assert np.array_equal(whole.train, parts.train) and np.array_equal(whole.val, parts.val)


def test_token_splits_cache(
    small_docs: list[str], bpe: Tokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = build_token_splits(small_docs, bpe, tmp_path, 0.1, seed=0)
    monkeypatch.setattr(Tokenizer, "encode_batch", lambda *a: pytest.fail("cache was not reused"))
    again = build_token_splits(small_docs, bpe, tmp_path, 0.1, seed=0)
    assert np.array_equal(first.train, again.train) and np.array_equal(first.val, again.val)
    monkeypatch.undo()
    build_token_splits(small_docs, bpe, tmp_path, 0.1, seed=1)
    assert len(list(tmp_path.iterdir())) == 2  # changed seed -> new key


def test_single_document_split(char: Tokenizer, small_docs: list[str], tmp_path: Path) -> None:
    splits = build_token_splits(small_docs[:1], char, tmp_path, val_fraction=0.1, seed=0)
    text = small_docs[0]
    assert len(splits.train) + len(splits.val) == len(text) + 2  # one <|bos|> per part
    assert char.decode(splits.val[1:]) == text[int(len(text) * 0.9) :]


def test_token_split_errors(char: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(GlasslabError, match="val_fraction"):
        build_token_splits(["some text"], char, tmp_path, val_fraction=1.0, seed=0)
    with pytest.raises(GlasslabError, match="training split is empty"):
        build_token_splits(["a"], char, tmp_path, val_fraction=0.1, seed=0)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- samplers

TOKENS = np.arange(10_000, dtype=np.uint16)  # token value == position, so windows are easy to check


def test_batch_sampler() -> None:
    x, y = BatchSampler(TOKENS, batch_size=4, block_size=16, seed=0).next_batch()
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], x[:, :-1] + 1) and torch.equal(y, x + 1)  # contiguous windows, shifted
    assert y.view(-1).numel() == 64  # contiguous tensors: .view works as in nanoGPT
    again = BatchSampler(TOKENS, 4, 16, seed=0).next_batch()
    other = BatchSampler(TOKENS, 4, 16, seed=1).next_batch()
    assert torch.equal(again[0], x) and not torch.equal(other[0], x)


def test_batch_sampler_resume() -> None:
    uninterrupted = BatchSampler(TOKENS, 8, 32, seed=3)
    expected = [uninterrupted.next_batch() for _ in range(6)][3:]
    first = BatchSampler(TOKENS, 8, 32, seed=3)
    for _ in range(3):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    resumed = BatchSampler(TOKENS, 8, 32, seed=999)
    resumed.load_state_dict(state)
    assert resumed.batches_drawn == 3
    for (ex, ey), (rx, ry) in zip(expected, [resumed.next_batch() for _ in range(3)]):
        assert torch.equal(ex, rx) and torch.equal(ey, ry)


def test_eval_batches() -> None:
    batches = eval_batches(TOKENS, batch_size=4, block_size=16, n_batches=3)
    assert len(batches) == 3 and all(x.shape == (4, 16) for x, _ in batches)
    again = eval_batches(TOKENS, 4, 16, 3)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))
    assert int(batches[0][0][0, 0]) == TOKENS[0] and int(batches[-1][1][-1, -1]) == TOKENS[-1]


def test_bits_per_byte_hand_count() -> None:
    """One eval window holding two documents: bpb = nats of the text targets / ln 2 / their bytes counted by
    hand; the <|bos|> target between the documents is in val/loss but in neither sum of bpb."""
    docs = [
        "héllo wörld\n",
        "€ to pay\n",
    ]  # 14 and 11 bytes: 12 and 9 characters, of which 'é', 'ö' take 2 bytes and '€' 3
    tok = Tokenizer.train(docs, "char", 0)
    ids = [tok.bos_id, *tok.encode(docs[0]), tok.bos_id, *tok.encode(docs[1])]
    splits = TokenSplits(train=np.array(ids * 4, dtype=np.uint16), val=np.array(ids, dtype=np.uint16))
    block = len(ids) - 1
    lm = LanguageModeling(
        splits, tok, batch_size=1, block_size=block, eval_batches_n=1, z_loss=0.0, seed=0, device=torch.device("cpu")
    )
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=1, n_head=1, n_embd=16, block_size=block))
    x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    with torch.no_grad():
        nats = F.cross_entropy(model(x)[0].double(), y[0], reduction="none")
    text = y[0] != tok.bos_id
    metrics = lm.evaluate(model)
    assert metrics["val/loss"] == pytest.approx(nats.mean().item(), rel=1e-5)
    assert metrics["val/bpb"] == pytest.approx(nats[text].sum().item() / math.log(2) / (14 + 11), rel=1e-5)


def test_sampler_too_little_data() -> None:
    with pytest.raises(GlasslabError, match="block_size 16 needs at least 17"):
        BatchSampler(TOKENS[:16], 2, 16, seed=0)
    with pytest.raises(GlasslabError, match="smaller block_size"):
        eval_batches(TOKENS[:10], 2, 16, 1)
