"""`glasslab serve`: the continuous-batching engine against `generate`, the OpenAI client on a live loopback server,
hostile requests answered with the right 4xx while a stream completes, a client leaving mid-stream, several models.

The served model is a small random-weight checkpoint written straight into a run directory (no training): what
is tested is the serving, and a random model's greedy output is as good as any for comparing two code paths.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from typer.testing import CliRunner  # noqa: E402

from glasslab.chat.tools import ToolInterceptor  # noqa: E402
from glasslab.cli import app as cli  # noqa: E402
from glasslab.config import build_config  # noqa: E402
from glasslab.data.tokenizer import Tokenizer  # noqa: E402
from glasslab.errors import GlasslabError  # noqa: E402
from glasslab.model.generate import generate  # noqa: E402
from glasslab.model.gpt import GPT  # noqa: E402
from glasslab.serve.app import Limits, create_app  # noqa: E402
from glasslab.serve.engine import Engine, Job, Sampling  # noqa: E402
from glasslab.serve.models import ModelPool, servable_runs  # noqa: E402
from glasslab.serve.text import ChatText, StopStrings  # noqa: E402
from glasslab.track.atomic import write_text_atomic  # noqa: E402
from glasslab.track.checkpoint import save_checkpoint  # noqa: E402
from glasslab.track.rundir import RunDir  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread

TEXT = "0123456789+-*/=() abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!'"
BLOCK = 96


def make_served_run(path: Path, *, seed: int = 0, status: str = "completed") -> Path:
    """A run directory with a char tokenizer and one random-weight SFT checkpoint, as training leaves it."""
    tok = Tokenizer.train([TEXT], "char", 0)
    model_cfg = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": BLOCK, "vocab_size": tok.vocab_size}
    cfg = build_config({"model": model_cfg, "tokenizer": {"kind": "char"}})
    run = RunDir.create(path)
    tok.save(run.tokenizer_path)
    write_text_atomic(run.config_path, cfg.to_toml())
    torch.manual_seed(seed)
    model = GPT(cfg.model)
    extra = {"arch": cfg.model.model_dump()}
    save_checkpoint(
        run.checkpoints_dir, "sft", 1, model=model.state_dict(), optimizer={}, rng={}, extra=extra, keep_last=1
    )
    run.update_manifest(status=status, stage="sft", stages_done=["sft"], last_step=1)
    return path


class LiveServer:
    """uvicorn on a loopback port in a thread of the test process, so tests can look at the engine too."""

    def __init__(self, app) -> None:
        import uvicorn

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started and time.time() < deadline:
            time.sleep(0.02)
        assert self.server.started

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("serve") / "runs"
    make_served_run(root / "a")
    make_served_run(root / "b", seed=1)
    make_served_run(root / "training", status="running")
    return root


@pytest.fixture(scope="module")
def server(runs_dir: Path):
    runs, shown = servable_runs(runs_dir / "a", None)
    pool = ModelPool(runs, max_batch=8, max_queue=16)
    live = LiveServer(create_app(pool, shown, limits=Limits(max_body_bytes=64_000, max_n=4)))
    live.pool = pool
    yield live
    live.stop()
    pool.close()


@pytest.fixture
def slow_model(server, monkeypatch: pytest.MonkeyPatch):
    """Each forward of the served model takes 20 ms longer, so a stream lasts long enough to act during it;
    counts the decode steps."""
    engine = server.pool.get("a").engine
    forward, calls = engine.model.forward, []

    def slow(*args, **kwargs):
        calls.append(1)
        time.sleep(0.02)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", slow)
    return engine, calls


def chat_body(content: str = "12+30=", **kw) -> dict:
    return {"model": "a", "messages": [{"role": "user", "content": content}], **kw}


# ---- the engine ------------------------------------------------------------------------------------------------


def _collect(engine: Engine, prompts: list[list[int]], sampling: list[Sampling], delays: list[float], **job_kw):
    """Submit each prompt after its delay (so later ones join a running batch); wait for every job to end."""
    done = [threading.Event() for _ in prompts]
    jobs = []
    for i, (prompt, s) in enumerate(zip(prompts, sampling)):
        time.sleep(delays[i])
        job = Job(prompt, s, emit=lambda step, i=i: done[i].set() if step.finish else None, **job_kw)
        jobs.append(job)
        engine.submit([job])
    assert all(e.wait(30) for e in done)
    return jobs


def test_rows_joining_a_running_batch_generate_what_generate_does_alone(tiny_model):
    """Continuous batching changes when a row is computed, never what: prompts of different lengths, arriving
    while others decode, greedy and seeded sampling with different settings, each equal to `generate` alone."""
    engine = Engine(tiny_model, pad_id=0, max_batch=4)
    try:
        torch.manual_seed(1)
        prompts = [torch.randint(1, 61, (n,)).tolist() for n in (3, 11, 5, 20, 7, 2)]
        settings = [
            Sampling(12, temperature=0),
            Sampling(9, temperature=1.0, seed=3),
            Sampling(14, temperature=0.7, top_k=5, seed=4),
            Sampling(6, temperature=0.9, top_p=0.8, seed=5),
            Sampling(10, temperature=0),
            Sampling(8, temperature=1.0, seed=6),
        ]
        jobs = _collect(engine, prompts, settings, [0, 0, 0.002, 0.004, 0, 0.003], stop_ids=(7,))
        for prompt, s, job in zip(prompts, settings, jobs):
            alone = generate(
                tiny_model,
                [prompt],
                s.max_tokens,
                temperature=s.temperature,
                top_k=s.top_k,
                top_p=s.top_p,
                stop_ids=(7,),
                seed=s.seed,
            )
            assert job.tokens == alone.tokens[0]
        assert engine.idle
    finally:
        engine.close()


def test_forced_tokens_follow_generate(tiny_model):
    """A tool's forced tokens enter a batched row exactly as they enter `generate`'s."""

    def interceptor(row: int, completion: list[int]) -> list[int] | None:
        return [5, 6, 7] if len(completion) == 2 else None

    engine = Engine(tiny_model, pad_id=0, max_batch=4)
    try:
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9]]
        settings = [Sampling(10, temperature=0), Sampling(10, temperature=1.0, seed=2)]
        jobs = _collect(engine, prompts, settings, [0, 0.001], interceptor=interceptor)
        for prompt, s, job in zip(prompts, settings, jobs):
            alone = generate(tiny_model, [prompt], 10, temperature=s.temperature, seed=s.seed, interceptor=interceptor)
            assert job.tokens == alone.tokens[0] and job.tokens[2:5] == [5, 6, 7]
    finally:
        engine.close()


def test_chat_text_shows_tool_calls_and_stop_strings_hold_back_text():
    tok = Tokenizer.train([TEXT], "char", 0)
    calls_ids = tok.encode("12*34")
    ids = [tok.id_of("<|tool_call|>"), *calls_ids, tok.end_id]
    ids += ToolInterceptor(tok)(0, ids) + tok.encode("ok 408") + [tok.end_id]
    text = ChatText(tok)
    pieces = [text.feed([i], final=n == len(ids) - 1) for n, i in enumerate(ids)]
    assert "".join(t for t, _ in pieces) == "ok 408"
    assert [(c.expression, c.result) for _, cs in pieces for c in cs] == [("12*34", "408")]
    stops = StopStrings(["END", "xy"])
    assert stops.feed("abcE") == ("abc", False)  # "E" may start "END"
    assert stops.feed("N") == ("", False)
    assert stops.feed("Dtail") == ("", True)
    assert StopStrings(["xy"]).feed("abx", final=True) == ("abx", False)


# ---- the server: the OpenAI client, chat's answer -------------------------------------------------------------------


def test_openai_client_streaming_and_not(server):
    from openai import OpenAI

    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["a"]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2="}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(
        model="a", messages=messages, max_tokens=20, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert whole.choices[0].message.content == streamed
    assert whole.usage.completion_tokens == chunks[-1].usage.completion_tokens > 0
    assert whole.usage.prompt_tokens == chunks[-1].usage.prompt_tokens > 0
    assert whole.choices[0].finish_reason in ("stop", "length")
    sampled = client.completions.create(model="a", prompt="ab", max_tokens=8, n=3, seed=7, temperature=1.0)
    again = client.completions.create(model="a", prompt="ab", max_tokens=8, n=3, seed=7, temperature=1.0)
    assert [c.text for c in sampled.choices] == [c.text for c in again.choices]
    assert len({c.text for c in sampled.choices}) > 1  # each choice draws with its own seed


def test_greedy_answer_is_glasslab_chats(server, runs_dir: Path):
    prompt = "What is 3+4?"
    result = CliRunner().invoke(
        cli,
        ["chat", str(runs_dir / "a"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "30", "--json"],
    )
    assert result.exit_code == 0, result.output
    reply = json.loads(result.stdout)["reply"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(prompt, max_tokens=30, temperature=0)))
    answer = json.loads(conn.getresponse().read())
    assert answer["choices"][0]["message"]["content"] == reply


def test_beam_search_request_answers_what_sample_does(server, runs_dir: Path):
    args = ["sample", str(runs_dir / "a"), "--prompt", "ab", "--max-new-tokens", "12", "--num-beams", "4"]
    result = CliRunner().invoke(cli, [*args, "--n", "2", "--json"])
    assert result.exit_code == 0, result.output
    samples = json.loads(result.stdout)["samples"]
    body = {"model": "a", "prompt": "ab", "max_tokens": 12, "num_beams": 4, "n": 2}
    status, answer = _raw(server.port, "POST", "/v1/completions", json.dumps(body))
    assert status == 200
    assert ["ab" + c["text"] for c in json.loads(answer)["choices"]] == samples


# ---- hostile requests, a client leaving mid-stream ---------------------------------------------------------------


def _raw(port: int, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """http.client sends the path as written: no normalisation of `..` or of percent-escapes."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, response.read()


HOSTILE = [
    ("POST", "/v1/chat/completions", b"{not json", 400),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400),
    ("POST", "/v1/chat/completions", b"\xff\xfe", 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": "a"}), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body() | {"messages": []}), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(temperature="hot")), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(temperature=9.0)), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(stream="yes")), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(n=1000)), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=10**9)), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=0)), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(top_k=-1)), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(seed=-5)), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body(stop=["a", "b", "c", "d", "e"])), 400),
    ("POST", "/v1/chat/completions", json.dumps(chat_body("x" * 500)), 400),  # longer than the context
    ("POST", "/v1/chat/completions", json.dumps(chat_body() | {"model": "nope"}), 404),
    ("POST", "/v1/chat/completions", json.dumps({"model": "a", "messages": [{"role": "root", "content": "x"}]}), 400),
    ("POST", "/v1/chat/completions", json.dumps({"model": "a", "messages": [{"role": "user", "content": 5}]}), 400),
    ("POST", "/v1/chat/completions", b"{" + b" " * 100_000 + b"}", 413),
    ("POST", "/v1/completions", json.dumps({"model": "a", "prompt": ["a", "b"]}), 400),
    ("POST", "/v1/completions", json.dumps({"model": "a", "prompt": "a", "num_beams": 100}), 400),
    ("POST", "/v1/completions", json.dumps({"model": "a", "prompt": "a", "num_beams": 2, "stream": True}), 400),
    ("GET", "/v1/chat/completions", None, 405),
    ("GET", "/v1/nothing", None, 404),
    ("GET", "/files/../../../etc/passwd", None, 404),
    ("GET", "/files/..%2f..%2f..%2fetc%2fpasswd", None, 404),
    ("GET", "/files/%2e%2e/%2e%2e/%2e%2e/etc/passwd", None, 404),
    ("GET", "/files/..%252f..%252f..%252fetc%252fpasswd", None, 404),  # encoded twice
    ("GET", "/files/....//....//....//etc/passwd", None, 404),
    ("GET", "/files/a/..%5c..%5c..%5cetc%5cpasswd", None, 404),
    ("GET", "/files//etc/passwd", None, 404),
    ("GET", "/api/runs/..%2f..%2fetc", None, 404),
    ("GET", "/static/..%2fapp.py", None, 404),
]


def test_hostile_requests_get_4xx_while_a_stream_completes(server, slow_model):
    engine, _ = slow_model
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=40, temperature=0, stream=True)))
    stream = conn.getresponse()
    assert stream.status == 200
    first = stream.readline()
    assert first.startswith(b"data: ") and engine.load[0] == 1  # the stream is mid-way
    answers = [(method, path, _raw(server.port, method, path, body)) for method, path, body, _ in HOSTILE]
    statuses = [status for _, _, (status, _) in answers]
    assert statuses == [expected for *_, expected in HOSTILE]
    for *_, (_, body) in answers:
        assert json.loads(body)["error"]["message"], body  # every refusal says why
    rest = stream.read().decode()
    events = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert rest.rstrip().endswith("data: [DONE]") and events[-1]["choices"][0]["finish_reason"] == "length"
    assert _raw(server.port, "GET", "/files/a/manifest.json")[0] == 200  # the runs directory itself is served


def test_a_client_leaving_mid_stream_frees_its_row(server, slow_model):
    engine, calls = slow_model
    sock = socket.create_connection(("127.0.0.1", server.port))
    body = json.dumps(chat_body(max_tokens=80, temperature=0, stream=True)).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    sock.sendall(head.encode() + body)
    seen = b""
    while b"data: " not in seen:
        seen += sock.recv(4096)
    sock.close()
    deadline = time.time() + 20
    while engine.load != (0, 0) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.load == (0, 0) and len(calls) < 60  # left long before its 80 tokens


def test_more_completions_than_the_queue_holds_get_429(server, slow_model):
    engine, _ = slow_model
    streams = []
    for _ in range(4):  # 4 requests of n=4 fill the server's queue of 16 completions (greedy: none stops early)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        body = chat_body(max_tokens=40, n=4, temperature=0, stream=True)
        conn.request("POST", "/v1/chat/completions", json.dumps(body))
        streams.append((conn, conn.getresponse()))
    status, body = _raw(server.port, "POST", "/v1/chat/completions", json.dumps(chat_body(max_tokens=5)))
    assert status == 429 and "retry" in json.loads(body)["error"]["message"]
    for conn, response in streams:
        assert response.status == 200
        response.close()  # the clients leave; their rows leave the batch
        conn.close()
    deadline = time.time() + 20
    while engine.load != (0, 0) and time.time() < deadline:
        time.sleep(0.01)
    assert engine.load == (0, 0), [(len(j.tokens), j.cancelled, j.sampling) for j in engine.rows]


def test_api_key_is_required_when_set(runs_dir: Path):
    from fastapi.testclient import TestClient

    runs, shown = servable_runs(runs_dir / "a", None)
    pool = ModelPool(runs)
    try:
        client = TestClient(create_app(pool, shown, api_key="s3cret"))
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/health").status_code == 200
    finally:
        pool.close()


# ---- several models, the command ---------------------------------------------------------------------------------


def test_a_directory_serves_its_completed_runs_with_a_bounded_number_loaded(runs_dir: Path):
    runs, shown = servable_runs(runs_dir, None)
    assert sorted(runs) == ["a", "b"] and shown == runs_dir  # "training" is still running
    pool = ModelPool(runs, max_loaded=1)
    try:
        assert pool.get("a").engine is pool.get("a").engine  # loaded once
        pool.get("b")
        assert list(pool.loaded) == ["b"]  # "a" was idle, so it made room
    finally:
        pool.close()


def test_glasslab_serve_command_end_to_end(runs_dir: Path, tmp_path: Path):
    """The command as a user runs it: its own process on loopback, the API key from the environment."""
    import os
    import subprocess

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GLASSLAB_API_KEY": "k3y", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "glasslab", "serve", str(runs_dir), "--port", str(port), "--max-loaded", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline, status = time.time() + 60, None
        while status != 200 and time.time() < deadline and proc.poll() is None:
            try:
                status = _raw(port, "GET", "/health")[0]
            except OSError:
                time.sleep(0.1)
        assert status == 200
        assert _raw(port, "GET", "/v1/models")[0] == 401
        key = {"Authorization": "Bearer k3y"}
        status, body = _raw(port, "GET", "/v1/models", headers=key)
        assert status == 200 and sorted(m["id"] for m in json.loads(body)["data"]) == ["a", "b"]
        for model in ("a", "b", "a"):  # one model in memory at a time, loaded on demand
            body = json.dumps({"model": model, "prompt": "ab", "max_tokens": 3})
            assert _raw(port, "POST", "/v1/completions", body, key)[0] == 200
        busy = CliRunner().invoke(cli, ["serve", str(runs_dir), "--port", str(port)])
        assert isinstance(busy.exception, GlasslabError) and "cannot listen" in str(busy.exception)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"http://127.0.0.1:{port}/" in err and "WARNING" not in err


def test_serve_says_what_to_install_and_refuses_bad_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    with pytest.raises(GlasslabError, match="neither a run nor a directory"):
        servable_runs(tmp_path / "missing", None)
    with pytest.raises(GlasslabError, match="no completed run"):
        servable_runs(tmp_path, None)
    from glasslab.commands.serve import _loopback

    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("192.168.1.4") and not _loopback("example.org")
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    result = CliRunner().invoke(cli, ["serve", str(tmp_path)])
    assert isinstance(result.exception, GlasslabError) and "pip install 'glasslab[serve]'" in str(result.exception)
