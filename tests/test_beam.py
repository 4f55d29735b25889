"""Beam search against an exhaustive search over every completion of a tiny vocabulary."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from glasslab.config import ModelConfig
from glasslab.model.beam import beam_search
from glasslab.model.gpt import GPT

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread

STOP, VOCAB, MAX_NEW = 4, 5, 3


@torch.no_grad()
def exhaustive(model: GPT, prompt: list[int], length_penalty: float) -> list[tuple[float, list[int]]]:
    """Every completion (ended by the stop token, or MAX_NEW tokens long) with its length-normalised score,
    each from a full forward pass without a cache, best first."""
    out = []
    plain = [t for t in range(VOCAB) if t != STOP]
    for k in range(1, MAX_NEW + 1):
        ends = [[STOP]] + ([[t] for t in plain] if k == MAX_NEW else [])
        for head in itertools.product(plain, repeat=k - 1):
            for end in ends:
                seq = [*head, *end]
                logp = F.log_softmax(model(torch.tensor([prompt + seq]))[0].float(), -1)
                total = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))
                out.append((total / len(seq) ** length_penalty, seq))
    return sorted(out, key=lambda x: -x[0])


@pytest.mark.parametrize("length_penalty", [0.0, 1.0, 2.0])
def test_wide_beams_find_what_exhaustive_search_finds(length_penalty: float):
    torch.manual_seed(3)
    model = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()
    for prompt in ([0, 1, 2], [3]):
        best = exhaustive(model, prompt, length_penalty)
        # 16 beams hold every unfinished prefix of this vocabulary, so the search is exhaustive
        beams = beam_search(model, prompt, MAX_NEW, num_beams=16, length_penalty=length_penalty, stop_ids=(STOP,), n=3)
        assert [h.tokens for h in beams] == [seq for _, seq in best[:3]]
        assert [h.score(length_penalty) for h in beams] == pytest.approx([s for s, _ in best[:3]], abs=1e-5)
        narrow = beam_search(model, prompt, MAX_NEW, num_beams=2, length_penalty=length_penalty, stop_ids=(STOP,))
        assert narrow[0].score(length_penalty) <= best[0][0] + 1e-6
        assert narrow[0].score(length_penalty) == pytest.approx(
            dict((tuple(q), s) for s, q in best)[tuple(narrow[0].tokens)], abs=1e-5
        )


def test_forced_tokens_extend_a_beam_without_scoring():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=VOCAB, n_layer=1, n_head=2, n_embd=16, block_size=16)).eval()

    def interceptor(row: int, completion: list[int]) -> list[int] | None:
        return [1, 1] if completion[-1] == STOP and len(completion) == 1 else None  # a tool call ends at once

    beams = beam_search(model, [0], 4, num_beams=4, stop_ids=(STOP,), interceptor=interceptor, n=100)
    forced = [h for h in beams if h.tokens[:3] == [STOP, 1, 1]]
    assert forced and all(h.length == len(h.tokens) - 2 for h in forced)


def test_eval_and_chat_take_num_beams(tmp_path):
    """The commands' beam search answers are the best beam of `beam_search` itself, tools included."""
    import json

    from test_sft import TEXT, base_run, invoke

    from glasslab.chat.format import Message, render_prompt
    from glasslab.chat.tools import ToolInterceptor
    from glasslab.data.tokenizer import Tokenizer
    from glasslab.envs import get_env
    from glasslab.stages.common import load_model
    from glasslab.track.rundir import RunDir
    from glasslab.train.evaluate import completion_text, prompt_tokens

    run = base_run(tmp_path / "run", Tokenizer.train([TEXT], "char", 0))
    args = ["--task", "arithmetic", "--n", "3", "--seed", "7", "--samples", "0", "--max-new-tokens", "4"]
    evaluated = invoke("eval", run.path, *args, "--num-beams", "3", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    model, tok, _ = load_model(RunDir.open(run.path))
    tools = ToolInterceptor(tok)

    def best(prompt: list[int], max_new: int) -> str:
        beams = beam_search(model, prompt, max_new, num_beams=3, stop_ids=(tok.end_id,), interceptor=tools)
        return completion_text(tok, beams[0].tokens)

    env = get_env("arithmetic", {})
    expected = [best(prompt_tokens(env, p, tok), 4) for p in env.problems("eval", 3, 7)]
    records = [json.loads(line) for line in (run.path / "eval" / "arithmetic-seed7.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in records] == expected
    chatted = invoke("chat", run.path, "--prompt", "1+2=", "--num-beams", "3", "--max-new-tokens", "6", "--json")
    answer = best(render_prompt([Message("user", "1+2=")], tok), 6)
    assert answer.removesuffix("<|end|>").endswith(json.loads(chatted.stdout)["reply"])
