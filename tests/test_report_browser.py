"""The report in a real headless browser: it loads without console errors and draws every figure.

Needs Debian's chromium (`.ci/run` installs it) and the playwright package (test extra); skipped when the
browser is absent, never silently passed.
"""

from __future__ import annotations

from pathlib import Path

from browser import browser_page, needs_chromium
from test_report import make_run

from glasslab.report import build_report
from glasslab.report.compare import build_compare

pytestmark = needs_chromium

# For each figure: does its canvas hold any pixel that is neither transparent nor white?
INKED = """() => Array.from(document.querySelectorAll('.figure')).map(el => {
  const canvas = el.querySelector('.fig-body canvas');
  if (!canvas || !canvas.width || !canvas.height) return [el.id, false];
  const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] > 0 && (data[i] < 240 || data[i + 1] < 240 || data[i + 2] < 240)) return [el.id, true];
  }
  return [el.id, false];
})"""


def _render(page_path: Path, tmp_path: Path) -> tuple[list[str], list[list], dict]:
    with browser_page(tmp_path / "profile", ("file:", "data:")) as (page, errors):
        page.goto(page_path.as_uri())
        page.wait_for_function("document.body.dataset.drawn !== undefined", timeout=20_000)
        inked = page.evaluate(INKED)
        counts = page.evaluate("({figures: +document.body.dataset.figures, drawn: +document.body.dataset.drawn})")
        with page.expect_download() as download:  # the PNG export of the first figure
            page.click(".figure button.png")
        png = Path(download.value.path()).read_bytes()
        counts["png_magic"] = png[:8] == b"\x89PNG\r\n\x1a\n"
    return errors, inked, counts


def test_report_renders_every_figure_without_errors(tmp_path: Path) -> None:
    page = build_report(make_run(tmp_path / "run"))
    errors, inked, counts = _render(page, tmp_path)
    assert errors == []
    assert counts["figures"] > 30 and counts["drawn"] == counts["figures"]
    assert [fid for fid, ok in inked if not ok] == []
    assert counts["png_magic"]


def test_compare_page_renders(tmp_path: Path) -> None:
    runs = [make_run(tmp_path / "a", seed=0), make_run(tmp_path / "b", seed=1, lr=1e-2)]
    errors, inked, counts = _render(build_compare(runs, tmp_path / "compare.html", align="tokens"), tmp_path)
    assert errors == [] and counts["figures"] > 5 and all(ok for _, ok in inked)
