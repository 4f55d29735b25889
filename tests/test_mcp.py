"""`glasslab mcp` driven by the official SDK's client over stdio, as an agent would: list the tools, read the
schema, start a smoke-sized experiment (a learning rate ten times too small), poll it to its decision, read it
back from the ledger and the runs; mistakes come back as one-line messages."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from glasslab.study.executor import GLASSLAB

TOOLS = {
    "describe_lab",
    "start_experiment",
    "start_study",
    "status",
    "cancel",
    "read_ledger",
    "list_runs",
    "run_summary",
    "metric_series",
    "study_findings",
    "compare_runs",
}


def test_without_the_sdk_the_command_says_what_to_install() -> None:
    hide = (
        "import sys; sys.modules['mcp'] = None; sys.argv = ['glasslab', 'mcp']; from glasslab.cli import main; main()"
    )
    proc = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "pip install 'glasslab[agents]'" in proc.stderr and "Traceback" not in proc.stderr


async def call(client: Any, name: str, args: dict[str, Any]) -> tuple[bool, Any]:
    result = await client.call_tool(name, args)
    text = result.content[0].text
    return result.is_error, (text if result.is_error else json.loads(text))


def test_an_agent_runs_an_experiment_to_its_decision_over_stdio(tmp_path: Path) -> None:
    pytest.importorskip("mcp")
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(
        command=sys.executable, args=[*GLASSLAB[1:], "mcp", "--dir", "exp", "--runs-dir", "runs"], cwd=str(tmp_path)
    )

    async def session() -> None:
        async with Client(params, read_timeout_seconds=120) as client:
            tools = await client.list_tools()
            assert {t.name for t in tools.tools} == TOOLS

            error, lab = await call(client, "describe_lab", {})
            assert not error and set(lab["presets"]) >= {"smoke", "tiny"}
            budget = next(row for row in lab["config"] if row["key"] == "train.budget")
            assert budget["default"] is None and "steps" in budget["help"]

            error, message = await call(client, "start_experiment", {"description": "x", "sets": ["train.lrr=1"]})
            assert error and "did you mean 'train.lr'" in message and "Traceback" not in message

            args = {"description": "lr ten times too small", "sets": ["train.lr=3e-4"], "base": "smoke"}
            error, started = await call(
                client, "start_experiment", args | {"seeds": 2, "budget": "6steps", "workers": 2}
            )
            assert not error and started["state"] == "running"
            deadline = time.monotonic() + 600
            while True:
                error, status = await call(client, "status", {"id": started["id"]})
                assert not error
                if status["state"] != "running" or time.monotonic() > deadline:
                    break
                await anyio.sleep(1)
            assert status["state"] == "done", status
            entry = status["result"]
            assert entry["id"] == started["id"] and entry["verdict"] == "worse" and entry["decision"] == "discarded"
            assert entry["difference"] > 0 and entry["ci95"] is not None and entry["noise_floor"] is not None

            error, book = await call(client, "read_ledger", {"last": 5})
            assert not error and [e["id"] for e in book["entries"]] == [entry["id"]]
            run = entry["rounds"][0]["arms"]["candidate"]["runs"][0]["path"]
            error, series = await call(client, "metric_series", {"run": run, "pattern": "val/bpb", "points": 3})
            assert not error and series["series"][0]["steps"][-1] == 6
            error, runs = await call(client, "list_runs", {"directory": "exp/runs"})
            assert not error and len(runs["runs"]) == 4
            error, message = await call(client, "status", {"id": "nope"})
            assert error and "no job 'nope'" in message

            error, started = await call(client, "start_experiment", args | {"sets": ["train.lr=1e-2"], "seeds": 2})
            error, cancelled = await call(client, "cancel", {"id": started["id"]})
            assert not error and cancelled["state"] == "cancelled"
            while (await call(client, "status", {"id": started["id"]}))[1]["state"] == "running":
                await anyio.sleep(0.5)
            error, book = await call(client, "read_ledger", {})
            assert [e["id"] for e in book["entries"]] == [entry["id"]]  # a cancelled experiment decides nothing

    anyio.run(session)
