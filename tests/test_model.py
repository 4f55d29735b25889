import pytest
import torch

from glasslab.config import ModelConfig
from glasslab.model.generate import filter_logits, generate, sample
from glasslab.model.gpt import GPT


def _greedy_without_cache(model: GPT, prompt: list[int], n: int) -> list[int]:
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt) :]


def test_variants_build_and_run():
    for mlp in ("gelu", "swiglu", "relu2"):
        for kv, tie, cap in ((None, True, None), (2, False, 15.0)):
            cfg = ModelConfig(
                vocab_size=50,
                n_layer=2,
                n_head=4,
                n_kv_head=kv,
                n_embd=32,
                block_size=16,
                mlp=mlp,
                tie_embeddings=tie,
                logit_softcap=cap,
            )
            model = GPT(cfg)
            logits = model(torch.randint(0, 50, (3, 16)))
            assert logits.shape == (3, 16, 50) and torch.isfinite(logits).all()
            if cap:
                assert logits.abs().max() <= cap
            assert (model.head.weight is model.wte.weight) == tie


def test_model_is_causal(tiny_model):
    x = torch.randint(0, 61, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 61
    a, b = tiny_model(x), tiny_model(y)
    assert torch.allclose(a[0, :8], b[0, :8], atol=1e-5)
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_kv_cache_generation_matches_full_recompute_with_left_padding():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=32))
    prompts = [[5, 6, 7, 8, 9], [3, 4], [11], [3, 4]]  # a repeated prompt is prefilled once, then shared
    out = generate(model, prompts, 8, temperature=0)
    for p, completion in zip(prompts, out.tokens):
        assert completion == _greedy_without_cache(model, p, 8)
    assert all(all(s) for s in out.sampled) and out.truncated == [True] * 4


def test_generation_is_seeded_and_logprobs_are_model_logprobs(tiny_model):
    a = generate(tiny_model, [[1, 2, 3]] * 2, 6, temperature=1.0, seed=5)
    b = generate(tiny_model, [[1, 2, 3]] * 2, 6, temperature=1.0, seed=5)
    assert a.tokens == b.tokens
    seq = [1, 2, 3, *a.tokens[0]]
    logp = torch.log_softmax(tiny_model(torch.tensor([seq]))[0], -1)
    direct = [logp[2 + i, t].item() for i, t in enumerate(a.tokens[0])]
    assert torch.allclose(torch.tensor(direct), torch.tensor(a.logprobs[0]), atol=1e-4)


def test_stop_token_and_interceptor_forcing(tiny_model):
    first = generate(tiny_model, [[1, 2]], 1, temperature=0).tokens[0][0]
    out = generate(tiny_model, [[1, 2]], 5, temperature=0, stop_ids=(first,))
    assert out.tokens[0] == [first] and out.truncated == [False]
    forced = generate(
        tiny_model,
        [[1, 2]],
        5,
        temperature=0,
        stop_ids=(first,),
        interceptor=lambda row, toks: [7, 8] if len(toks) == 1 else None,
    )
    assert forced.tokens[0][:3] == [first, 7, 8] and forced.sampled[0][:3] == [True, False, False]


def test_finished_rows_leave_the_batch_and_the_others_run_on_unchanged(tiny_model):
    prompts = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [1, 2, 3]]

    def force(row: int, completion: list[int]) -> list[int] | None:
        return [20, 21] if row == 3 and len(completion) == 2 else None

    full = generate(tiny_model, prompts, 8, temperature=0, interceptor=force)
    stop = full.tokens[0][0]
    early = generate(tiny_model, prompts, 8, temperature=0, stop_ids=(stop,), interceptor=force)
    assert early.truncated.count(False) >= 2 and early.truncated.count(True) >= 2  # some rows stop, some run on
    for r, tokens in enumerate(full.tokens):
        n = tokens.index(stop) + 1 if stop in tokens else len(tokens)
        assert early.tokens[r] == tokens[:n] and early.sampled[r] == full.sampled[r][:n]
        assert early.logprobs[r] == pytest.approx(full.logprobs[r][:n], abs=1e-5)
    assert full.tokens[3][2:4] == [20, 21] and full.sampled[3][2:4] == [False, False]


def test_top_k_and_top_p_filtering():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, 1.0, 2, None)[0, 2:]).all()
    kept = torch.isfinite(filter_logits(logits, 1.0, None, 0.7)[0])
    assert kept.tolist() == [True, True, False, False]


def test_sampler_draws_from_the_given_distribution():
    probs = torch.tensor([[0.0, 0.6, 0.3, 0.1, 0.0]]).expand(20_000, 5)  # unnormalised rows work too: x2 below
    draws = sample(2 * probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=5) / len(draws)
    # each frequency's standard error is at most sqrt(0.25 / 20000) = 0.0035: 0.015 is over 4 of them
    assert torch.allclose(freq, probs[0], atol=0.015) and freq[0] == freq[4] == 0
    again = sample(2 * probs, torch.Generator().manual_seed(0))
    assert torch.equal(draws, again)


def test_sampler_picks_the_token_a_full_cdf_inversion_picks():
    """The two-level inversion (block, then token) against one float64 CDF over the whole vocabulary, at the same
    uniform draws: a vocabulary that is not a multiple of the block, whole blocks and a block's tail at zero."""
    gen = torch.Generator().manual_seed(0)
    probs = torch.rand(512, 300, generator=gen) ** 8
    probs[:, 64:128] = 0  # a whole block
    probs[:, 250:] = 0  # the tail of the last full block and the padded one
    draws = sample(probs, torch.Generator().manual_seed(1))
    u = torch.rand(512, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cdf = probs.double().cumsum(-1)
    assert torch.equal(draws, torch.searchsorted(cdf, (1 - u) * cdf[:, -1:]).squeeze(1))
    assert (probs.gather(1, draws[:, None]) > 0).all()


def test_rope_positions_extend_past_block_size(tiny_model):
    x = torch.randint(0, 61, (1, 48))  # block_size is 32
    assert torch.isfinite(tiny_model(x)).all()
