"""The page of `glasslab serve` in a real headless browser: a chat message gets a streamed answer, and a run that
is training shows its step counter and loss curve advance.

Needs Debian's chromium and the playwright package (test extra), as tests/test_report_browser.py; skipped when
the browser is absent, never silently passed.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from browser import browser_page, needs_chromium  # noqa: E402
from test_serve import LiveServer, make_served_run  # noqa: E402

from glasslab.serve.app import create_app  # noqa: E402
from glasslab.serve.models import ModelPool, servable_runs  # noqa: E402
from glasslab.track.metrics import MetricStore  # noqa: E402
from glasslab.track.rundir import RunDir  # noqa: E402

pytestmark = [
    needs_chromium,
    pytest.mark.usefixtures("one_thread"),
]


def _train_steps(run: RunDir, store: MetricStore, steps: range) -> None:
    """What a training loop leaves in its run directory: metrics in the live store, the step in the manifest."""
    for step in steps:
        store.log(step, "pretrain", {"train/loss": 5.0 / step})
    store.flush()
    run.update_manifest(status="running", stage="pretrain", last_step=steps[-1])


def test_page_chats_and_shows_a_run_training_live(tmp_path: Path) -> None:
    runs_dir = tmp_path / "runs"
    runs, shown = servable_runs(make_served_run(runs_dir / "chat"), None)
    live_run = RunDir.open(make_served_run(runs_dir / "live", status="running"))
    store = MetricStore(live_run.metrics_db_path)
    _train_steps(live_run, store, range(1, 11))
    pool = ModelPool(runs)
    server = LiveServer(create_app(pool, shown))
    try:
        with browser_page(tmp_path / "profile", (server.url,)) as (page, errors):
            page.goto(server.url + "/")
            page.wait_for_function("document.body.dataset.models === '1'", timeout=20_000)
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "12")
            page.fill("#prompt", "What is 2+2?")
            page.click("#send")
            page.wait_for_selector(".msg.assistant[data-done='1']", timeout=20_000)
            assert page.get_attribute(".msg.assistant", "data-finish") in ("stop", "length")
            answer = page.text_content(".msg.assistant .text")
            meta = page.text_content(".msg.assistant .meta")
            assert "generated" in meta and page.text_content("#chat-error") == ""
            body = {"model": "chat", "messages": [{"role": "user", "content": "What is 2+2?"}]}
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
            conn.request("POST", "/v1/chat/completions", json.dumps(body | {"temperature": 0, "max_tokens": 12}))
            assert answer == json.loads(conn.getresponse().read())["choices"][0]["message"]["content"]

            page.goto(server.url + "/#run/live")
            page.wait_for_function("document.getElementById('run-step').textContent === '10'", timeout=20_000)
            page.wait_for_function("+document.body.dataset.figures > 0", timeout=20_000)
            _train_steps(live_run, store, range(11, 21))
            page.wait_for_function("document.getElementById('run-step').textContent === '20'", timeout=20_000)
            assert page.text_content("#run-status") == "running"
            assert page.locator(".figure canvas").count() > 0
    finally:
        store.close()
        server.stop()
        pool.close()
    assert errors == []
