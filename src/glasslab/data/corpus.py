"""Load training text as a list of documents, from the embedded Shakespeare or from the user's files.

Documents matter (not just one long string) because the train/val split is made at document
level and every document is prefixed with a boundary token, so the model learns where texts start.
"""

import hashlib
import json
import lzma
from functools import lru_cache
from importlib import resources
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from glasslab.errors import GlasslabError

EMBEDDED = "shakespeare"
DOC_SEPARATOR = "\f\n"  # written by scripts/build_corpus.py between works
TEXT_SUFFIXES = {".txt", ".md"}
DATASETS_MARKERS = {"dataset_info.json", "state.json", "dataset_dict.json"}  # written by datasets' save_to_disk
SOURCES_HINT = "an existing text file, directory, .jsonl, .parquet, or datasets directory (or 'shakespeare')"


def load_documents(source: str | None, text_field: str = "text") -> list[str]:
    """Return the non-empty documents of `source`: None or 'shakespeare' (embedded), a text file,
    a directory of .txt/.md files, a Hugging Face `save_to_disk` directory, a .jsonl or a .parquet file."""
    if source is None or source == EMBEDDED:
        return list(_embedded())
    path = Path(source).expanduser()
    if not path.exists():
        raise GlasslabError(f"data path '{source}' not found: pass --data with {SOURCES_HINT}")
    if path.is_dir():
        docs = _from_datasets_dir(path, text_field) if _is_datasets_dir(path) else _from_text_dir(path)
    elif path.suffix.lower() == ".jsonl":
        docs = _from_jsonl(path, text_field)
    elif path.suffix.lower() == ".parquet":
        docs = _from_parquet(path, text_field)
    else:
        docs = [_read_text(path)]
        if not docs[0].strip():
            raise GlasslabError(f"data file '{path}' is empty: pass --data with a file that contains text")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise GlasslabError(f"data source '{path}' has no non-empty documents: pass --data with {SOURCES_HINT}")
    return docs


def keep_chars(docs: list[str], max_chars: int | None) -> list[str]:
    """The first documents up to `max_chars` characters in all (the last one cut); None: all of them."""
    if max_chars is None:
        return docs
    kept, total = [], 0
    for d in docs:
        kept.append(d[: max_chars - total])
        total += len(kept[-1])
        if total >= max_chars:
            break
    return kept


def corpus_fingerprint(docs: list[str]) -> str:
    """A stable sha256 of the documents and their boundaries, used as a cache key for token shards."""
    h = hashlib.sha256()
    for doc in docs:
        b = doc.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()


@lru_cache(maxsize=1)
def _embedded() -> tuple[str, ...]:
    """The 42 Shakespeare works shipped in the package (cached: decompressing takes a moment)."""
    data = resources.files("glasslab.data").joinpath("shakespeare.txt.xz").read_bytes()
    return tuple(lzma.decompress(data).decode("utf-8").split(DOC_SEPARATOR))


def _read_text(path: Path) -> str:
    """Read a UTF-8 text file (a BOM is dropped), refusing binaries, which would silently train the model on garbage."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise GlasslabError(f"'{path}' looks like a binary file (it has NUL bytes): pass --data with a UTF-8 text file")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GlasslabError(
            f"'{path}' is not valid UTF-8 (byte {e.start}): re-save it as UTF-8 or pass --data with another file"
        ) from None


def _from_text_dir(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    if not files:
        raise GlasslabError(f"directory '{path}' has no .txt or .md files: pass --data with {SOURCES_HINT}")
    return [_read_text(p) for p in files]


def _is_datasets_dir(path: Path) -> bool:
    has_marker = any(p.name in DATASETS_MARKERS for p in [*path.iterdir(), *path.glob("*/*.json")])
    return has_marker and any(path.rglob("*.arrow"))


def _from_datasets_dir(path: Path, text_field: str) -> list[str]:
    """Read a `datasets` save_to_disk directory with pyarrow alone. For a DatasetDict only the
    `train` split is used when there is one, so held-out test sets never leak into training."""
    root = path / "train" if any((path / "train").glob("*.arrow")) else path
    docs: list[str] = []
    for f in sorted(root.rglob("*.arrow")):
        table = _read_arrow(f)
        _check_column(table.column_names, text_field, f)
        docs += _strings(table.column(text_field), text_field, f)
    return docs


def _read_arrow(path: Path) -> pa.Table:
    """save_to_disk writes the Arrow IPC stream format; accept the file format as well."""
    try:
        with pa.OSFile(str(path)) as f:
            return pa.ipc.open_stream(f).read_all()
    except pa.ArrowInvalid:
        try:
            with pa.OSFile(str(path)) as f:
                return pa.ipc.open_file(f).read_all()
        except pa.ArrowInvalid:
            msg = f"'{path}' is not a readable Arrow file: re-save the dataset with save_to_disk"
            raise GlasslabError(msg) from None


def _from_parquet(path: Path, text_field: str) -> list[str]:
    try:
        _check_column(pq.read_schema(path).names, text_field, path)
        column = pq.read_table(path, columns=[text_field]).column(text_field)
    except pa.ArrowInvalid:
        msg = f"'{path}' is not a readable parquet file: pass --data with a valid .parquet file"
        raise GlasslabError(msg) from None
    return _strings(column, text_field, path)


def _check_column(names: list[str], text_field: str, path: Path) -> None:
    if text_field not in names:
        raise GlasslabError(
            f"'{path}' has no column '{text_field}' (columns: {', '.join(names)}): "
            f"pick one with --set data.text_field=NAME"
        )


def _strings(column: pa.ChunkedArray, text_field: str, path: Path) -> list[str]:
    """The non-null, non-empty strings of a column; a non-text column is a user error, not a crash."""
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise GlasslabError(
            f"column '{text_field}' of '{path}' holds {column.type}, not text: "
            f"pick a text column with --set data.text_field=NAME"
        )
    return [t for t in column.to_pylist() if t]


def _from_jsonl(path: Path, text_field: str) -> list[str]:
    docs = []
    # split on \n only: str.splitlines would also break on U+2028, which JSON allows inside strings
    for n, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise GlasslabError(f"'{path}' line {n} is not valid JSON: fix the line or remove it") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise GlasslabError(
                f"'{path}' line {n} has no string field '{text_field}': name the field with --set data.text_field=NAME"
            )
        docs.append(record[text_field])
    return docs
