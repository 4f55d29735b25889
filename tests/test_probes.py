"""Tests for glasslab.probes: every number is checked against a direct computation of what its name says."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from glasslab.config import Config, ModelConfig, ProbesConfig, TrainConfig
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import TokenSplits
from glasslab.model.gpt import GPT
from glasslab.objectives.lm import LanguageModeling
from glasslab.probes import build_probes
from glasslab.probes.activations import activation_stats
from glasslab.probes.attention import attention_probs, attention_stats
from glasslab.probes.forward import ForwardProbe, probe_forward
from glasslab.probes.grads import GradProbe
from glasslab.probes.positions import LossByPosition, bucket_stats, position_buckets
from glasslab.probes.spikes import SpikeProbe, SpikeRule, departures, robust_band, rule_of
from glasslab.track.checkpoint import latest_checkpoint, load_checkpoint
from glasslab.track.metrics import MetricStore, last_values
from glasslab.track.rundir import RunDir
from glasslab.train.loop import Diverged, Hook, StepContext, train
from glasslab.train.protocols import BatchIds, KindedBatches, ProbeRows, TokenLosses, ValBatches

PAD, BOS = 0, 1  # glasslab's fixed special-token ids
TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 60
BLOCK = 32


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny models run on one thread


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train([TEXT], "char", 0)


def objective_for(tok: Tokenizer, batch_size: int = 8) -> LanguageModeling:
    ids = np.array(tok.encode(TEXT), dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    splits = TokenSplits(train=ids[:cut], val=ids[cut:])
    return LanguageModeling(
        splits,
        tok,
        batch_size=batch_size,
        block_size=BLOCK,
        eval_batches_n=2,
        z_loss=0.0,
        seed=0,
        device=torch.device("cpu"),
        sample_tokens=4,
    )


def model_for(tok: Tokenizer, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=BLOCK, **kw))


def run_train(tmp_path, model, objective, hooks, steps=4, **train_kw) -> tuple[RunDir, dict]:
    """Train through the real loop; returns the run and the last value of every metric."""
    run = RunDir.create(tmp_path / "run")
    cfg = TrainConfig(
        steps=steps,
        batch_size=objective.sampler.batch_size,
        warmup_steps=0,
        eval_every=0,
        checkpoint_every=1000,
        **train_kw,
    )
    with MetricStore(run.metrics_db_path) as store:
        try:
            train(model, objective, cfg, run, store, arch={}, hooks=hooks)
        finally:
            values = last_values(store.read())
    return run, values


# ---- gradients and updates ---------------------------------------------------------------------


class WeightRecorder(Hook):
    """Independently measures the update of the last step: weights before (on_backward) and after."""

    def on_backward(self, ctx: StepContext) -> None:
        self.before = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}

    def on_optimizer_step(self, ctx: StepContext) -> None:
        self.after = {n: p.detach().clone() for n, p in ctx.model.named_parameters()}
        self.state = {
            n: {k: v.clone() for k, v in ctx.optimizer.state[p].items()} for n, p in ctx.model.named_parameters()
        }


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_grad_norms_combine_and_update_ratio_is_the_measured_change(tmp_path, tok, optimizer):
    model, recorder = model_for(tok), WeightRecorder()
    _, m = run_train(tmp_path, model, objective_for(tok), [GradProbe(every=2), recorder], steps=4, optimizer=optimizer)
    top = [n for n in m if n.startswith("grad_norm/") and n.count(".") <= 1]  # blocks.i, wte, norm
    assert sorted(top) == ["grad_norm/blocks.0", "grad_norm/blocks.1", "grad_norm/norm", "grad_norm/wte"]
    assert math.sqrt(sum(m[n] ** 2 for n in top)) == pytest.approx(m["optim/grad_norm"], rel=1e-4)
    leaves = [n for n in m if n.startswith("grad_norm/blocks.1.attn.")]
    assert math.sqrt(sum(m[n] ** 2 for n in leaves)) == pytest.approx(m["grad_norm/blocks.1.attn"], rel=1e-4)

    b, a = recorder.before, recorder.after
    q = "blocks.1.attn.q.weight"
    assert m["weight_norm/blocks.1.attn.q"] == pytest.approx(b[q].norm().item(), rel=1e-5)
    assert m["update_norm/blocks.1.attn.q"] == pytest.approx((a[q] - b[q]).norm().item(), rel=1e-4)
    assert m["update_ratio/blocks.1.attn.q"] == pytest.approx(((a[q] - b[q]).norm() / b[q].norm()).item(), rel=1e-4)
    mlp = [n for n in b if n.startswith("blocks.0.mlp.")]
    change = math.sqrt(sum((a[n] - b[n]).norm().item() ** 2 for n in mlp))
    assert m["update_ratio/blocks.0.mlp"] == pytest.approx(
        change / math.sqrt(sum(b[n].norm().item() ** 2 for n in mlp)), rel=1e-4
    )
    assert m["update_norm/wte"] > 0

    adam_param = "wte.weight"  # AdamW in both optimizers; Muon's block matrices have no Adam moments
    assert m["adam_m_norm/wte"] == pytest.approx(recorder.state[adam_param]["exp_avg"].norm().item(), rel=1e-5)
    assert m["adam_v_norm/wte"] == pytest.approx(recorder.state[adam_param]["exp_avg_sq"].norm().item(), rel=1e-5)
    assert ("adam_m_norm/blocks.1.attn.q" in m) == (optimizer == "adamw")


# ---- attention and activations -----------------------------------------------------------------


def direct_attention(
    q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, tokens: torch.Tensor, b: int, h: int
) -> dict:
    """Entropy, max logit and <|bos|> mass of one (row, head), one query at a time, with no shared code:
    padding queries and keys left out, queries with fewer than 2 keys only in the max logit."""
    ents, norms, bos, best = [], [], [], -math.inf
    group = q.size(1) // k.size(1)
    for t in range(q.size(2)):
        if tokens[b, t] == PAD:
            continue
        keys = [s for s in range(k.size(2)) if allowed[b, 0, t, s] and tokens[b, s] != PAD]
        logits = torch.stack([q[b, h, t] @ k[b, h // group, s] / math.sqrt(q.size(-1)) for s in keys])
        best = max(best, logits.max().item())
        if len(keys) < 2:
            continue
        p = torch.exp(logits - torch.logsumexp(logits, 0))
        ent = -(p * p.log()).sum().item()
        ents.append(ent)
        norms.append(ent / math.log(len(keys)))
        if any(tokens[b, s] == BOS for s in keys):
            bos.append(sum(p[i].item() for i, s in enumerate(keys) if tokens[b, s] == BOS))
    return {"entropy": ents, "entropy_norm": norms, "bos": bos, "max_logit": best}


def pooled(rows: list[dict], kind: str) -> float:
    """The mean over every pooled (row, query) pair, as the probe defines it."""
    return float(np.mean([v for r in rows for v in r[kind]]))


def test_attention_probe_equals_sdpa_and_a_direct_softmax(tok):
    model = model_for(tok, n_kv_head=1)  # grouped-query attention: 2 query heads share 1 key head
    x = objective_for(tok).probe_inputs().clone()
    x[0, 0] = x[1, 5] = x[1, 20] = BOS  # a row that starts a document, one with two in view from query 5 on
    captured = {}
    handle = model.blocks[1].attn.core.register_forward_hook(lambda mod, args, out: captured.update(args=args, out=out))
    metrics = probe_forward(model, x, attention=True, activations=False)
    handle.remove()
    q, k, v, mask = captured["args"]
    logits, probs, allowed = attention_probs(q, k, mask)
    assert torch.allclose(probs @ v.repeat_interleave(2, dim=1), captured["out"], atol=1e-5)  # what SDPA computed
    for h in range(2):
        rows = [direct_attention(q, k, allowed, x, b, h) for b in range(x.size(0))]
        assert sum(len(r["bos"]) for r in rows) == BLOCK - 1 + BLOCK - 5  # only the queries with a <|bos|> in view
        for kind in ("entropy", "entropy_norm", "bos"):
            assert metrics[f"attn_{kind}/blocks.1.h{h}"] == pytest.approx(pooled(rows, kind), rel=1e-4)
        assert metrics[f"attn_max_logit/blocks.1.h{h}"] == pytest.approx(max(r["max_logit"] for r in rows), rel=1e-5)
    assert metrics["attn_entropy/blocks.1"] == pytest.approx(
        (metrics["attn_entropy/blocks.1.h0"] + metrics["attn_entropy/blocks.1.h1"]) / 2
    )
    assert not any(m._forward_hooks for m in model.modules())  # hooks live only for the probe forward
    without = probe_forward(model, objective_for(tok).probe_inputs(), attention=True, activations=False)
    assert not any(n.startswith("attn_bos/") for n in without)  # no <|bos|> in view: absent, not zero


def test_attention_on_padded_rows():
    """Right padding without a mask (the RL probe rows) and left padding with a mask (generation): the padding
    queries are left out and each query's entropy is normalised by the real keys it can attend."""
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    tokens = torch.tensor([[BOS, 9, 10, 11, PAD, PAD], [PAD, PAD, BOS, 9, 10, 11]])
    mask = torch.ones(6, 6, dtype=torch.bool).tril().repeat(2, 1, 1, 1)
    mask[1, :, :, :2] = False  # row 1's real queries never see its two padding keys
    mask[1, :, :2, :2] = torch.eye(2, dtype=torch.bool)  # padded queries attend to themselves only
    mask[0] = torch.ones(6, 6, dtype=torch.bool).tril()  # row 0: plain causal, its padding queries see everything
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    logits, probs, allowed = attention_probs(q, k, mask)
    assert torch.allclose(probs @ v.repeat_interleave(2, dim=1), out, atol=1e-5)
    stats = attention_stats(logits, probs, allowed, tokens != PAD, tokens == BOS)
    for h in range(4):
        rows = [direct_attention(q, k, mask, tokens, b, h) for b in range(2)]
        assert [len(r["entropy"]) for r in rows] == [3, 3]  # queries 1-3 of row 0, 3-5 of row 1
        for kind in ("entropy", "entropy_norm", "bos"):
            assert stats[kind][h].item() == pytest.approx(pooled(rows, kind), rel=1e-5)
        assert stats["max_logit"][h].item() == pytest.approx(max(r["max_logit"] for r in rows), rel=1e-5)


def test_lm_probe_rows_start_at_documents(tok):
    """As many rows as the validation split has documents start at their <|bos|>; the first validation
    windows fill the rest."""
    doc = tok.encode(TEXT[:200])
    ids = np.array(([BOS, *doc]) * 3 + doc * 3, dtype=np.uint16)
    lm = LanguageModeling(
        TokenSplits(train=ids, val=ids),
        tok,
        batch_size=8,
        block_size=BLOCK,
        eval_batches_n=1,
        z_loss=0.0,
        seed=0,
        device=torch.device("cpu"),
    )
    rows = lm.probe_inputs()
    assert rows.shape == (8, BLOCK) and rows[:3, 0].tolist() == [BOS] * 3
    assert torch.equal(rows[0], torch.tensor(ids[:BLOCK], dtype=torch.int64))
    assert torch.equal(lm.val[0][0][0], rows[0])  # the first validation window starts at offset 0: not twice
    assert torch.equal(rows[3:], lm.val[0][0][1:6])


def test_activation_and_logit_stats(tok):
    model = model_for(tok)
    x = objective_for(tok).probe_inputs()
    outputs = []
    handle = model.blocks[0].register_forward_hook(lambda mod, args, out: outputs.append(out))
    metrics = probe_forward(model, x, attention=False, activations=True)
    handle.remove()
    out = outputs[0].double()
    assert metrics["act_rms/blocks.0"] == pytest.approx(out.pow(2).mean().sqrt().item(), rel=1e-5)
    assert metrics["act_max/blocks.0"] == pytest.approx(out.abs().max().item(), rel=1e-6)
    z = (out - out.mean()) / out.std(unbiased=False)
    assert metrics["act_kurtosis/blocks.0"] == pytest.approx(z.pow(4).mean().item(), rel=1e-4)
    with torch.no_grad():
        logits = model.eval()(x)
    assert metrics["logits/max"] == pytest.approx(logits.max().item(), rel=1e-6)
    assert metrics["logits/log_z_mean"] == pytest.approx(torch.logsumexp(logits, -1).mean().item(), rel=1e-6)
    assert activation_stats(torch.randn(200_000))[2].item() == pytest.approx(3.0, abs=0.1)  # Gaussian kurtosis
    assert not any(k.startswith("attn_") for k in metrics)


# ---- loss by position --------------------------------------------------------------------------


def test_log_spaced_buckets():
    assert position_buckets(128) == [(0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, 127)]
    assert position_buckets(100)[-1] == (64, 99) and position_buckets(1) == [(0, 0)]


def test_loss_by_position_against_a_direct_computation(tok):
    """Bucket means average back to the loss over the same windows; each interval is the t-interval over windows
    of the per-window means, computed here with plain numpy."""
    model, objective = model_for(tok), objective_for(tok, batch_size=4)
    ctx = StepContext("pretrain", model, None, objective, None, TrainConfig(steps=3))
    ctx.step = 2
    LossByPosition(every=0, windows=24).on_optimizer_step(ctx)
    assert ctx.metrics == {}  # neither a multiple of `every` nor the last step
    ctx.step = 3
    LossByPosition(every=0, windows=24).on_optimizer_step(ctx)
    batches = objective.position_batches(24)
    assert sum(len(x) for x, _ in batches) == 24
    with torch.no_grad():
        direct = torch.cat([F.cross_entropy(model(x).transpose(1, 2), y, reduction="none") for x, y in batches])
    direct = direct.double().numpy()
    assert sorted(n for n in ctx.metrics if n.startswith("loss_by_pos/")) == [
        "loss_by_pos/000-000",
        "loss_by_pos/001-001",
        "loss_by_pos/002-003",
        "loss_by_pos/004-007",
        "loss_by_pos/008-015",
        "loss_by_pos/016-031",
    ]
    sizes = {"000-000": 1, "001-001": 1, "002-003": 2, "004-007": 4, "008-015": 8, "016-031": 16}
    weighted = sum(ctx.metrics[f"loss_by_pos/{b}"] * n for b, n in sizes.items()) / BLOCK
    assert weighted == pytest.approx(direct.mean(), rel=1e-5)
    per_window = direct[:, 4:8].mean(axis=1)
    assert ctx.metrics["loss_by_pos/004-007"] == pytest.approx(per_window.mean(), rel=1e-6)
    half = 2.0687 * per_window.std(ddof=1) / math.sqrt(24)  # t(0.975, 23 degrees of freedom) = 2.0687
    assert ctx.metrics["loss_by_pos_ci95/004-007"] == pytest.approx(half, rel=1e-4)


def test_bucket_stats_leave_out_untrained_positions():
    """Padded chat rows: NaN positions are not trained; a window with none trained in a bucket is not in it."""
    nan = math.nan
    losses = np.array([[1.0, 2.0, 4.0, nan], [3.0, nan, nan, nan], [5.0, 6.0, 8.0, 10.0]])
    got = bucket_stats(losses)
    assert got[(0, 0)][0] == pytest.approx(3.0) and got[(0, 0)][2] == 3
    assert got[(1, 1)][0] == pytest.approx(4.0) and got[(1, 1)][2] == 2
    assert got[(2, 3)][0] == pytest.approx((4.0 + 9.0) / 2)  # window means 4 and (8 + 10) / 2
    assert got[(2, 3)][1] == pytest.approx(12.7062 * np.std([4.0, 9.0], ddof=1) / math.sqrt(2), rel=1e-4)


# ---- spikes and divergence ---------------------------------------------------------------------


class Poisoned:
    """The LM objective, but the batch of step `at` has random targets in rows `rows`."""

    def __init__(self, inner: LanguageModeling, at: int, rows: list[int]) -> None:
        self.inner, self.at, self.rows = inner, at, rows

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def next_batch(self, model):
        x, y = self.inner.next_batch(model)
        if self.inner.sampler.batches_drawn == self.at:
            g = torch.Generator().manual_seed(0)
            y = y.clone()
            y[self.rows] = torch.randint(9, self.inner.tokenizer.vocab_size, (len(self.rows), y.size(1)), generator=g)
        return x, y


def test_poisoned_batch_spike_is_caught_at_its_step_with_its_rows(tmp_path, tok):
    probes = ProbesConfig(spike_window=16, spike_history=4, spike_topk=4)
    objective = Poisoned(objective_for(tok), at=40, rows=[2, 5])
    run, m = run_train(
        tmp_path, model_for(tok), objective, [SpikeProbe(probes, RunDir(tmp_path / "run"), tok)], steps=42, lr=1e-2
    )
    dossiers = sorted(run.spikes_dir.glob("step-*.json"))
    assert [p.name for p in dossiers] == ["step-0000040.json"]
    d = json.loads(dossiers[0].read_text())
    assert d["kind"] == "spike" and "loss" in d["signals"]
    assert {r["row"] for r in d["top_rows"][:2]} == {2, 5}
    assert {t["row"] for t in d["top_tokens"]} <= {2, 5}
    assert all(t["context"] and t["target"] for t in d["top_tokens"])
    assert [r["step"] for r in d["history"]] == [36, 37, 38, 39, 40]
    assert set(d["history"][-1]["grad_norm"]) == {"wte", "blocks.0", "blocks.1", "norm"}
    events = [e for e in run.events() if e["kind"] == "spike"]
    assert [e["step"] for e in events] == [40] and "worst rows" in events[0]["message"]
    assert "spike/loss_score" in m

    out = CliRunner().invoke(app(), ["probes", str(run.path), "--json"])
    assert out.exit_code == 0, out.output
    summary = json.loads(out.stdout)
    assert [s["step"] for s in summary["spikes"]] == [40]
    rendered = CliRunner().invoke(app(), ["probes", str(run.path), "--spike", "40"])
    assert rendered.exit_code == 0 and "highest-loss tokens" in rendered.output
    missing = CliRunner().invoke(app(), ["probes", str(run.path), "--spike", "7"])
    assert missing.exit_code != 0 and "choose one of 40" in str(missing.exception)


class TwoKinds(Poisoned):
    """Every 4th batch is a harder kind (random targets in 4 of its rows), as SFT's tool-use buckets are harder
    than its arithmetic ones; `batch_kind` says which, unless `tell` is off. Step `at` is also poisoned."""

    def __init__(self, inner: LanguageModeling, at: int, tell: bool) -> None:
        super().__init__(inner, at, rows=[5, 6])
        self.kind, self.tell = "easy", tell

    def next_batch(self, model):
        x, y = super().next_batch(model)
        self.kind = "hard" if self.inner.sampler.batches_drawn % 4 == 0 else "easy"
        if self.kind == "hard":
            g = torch.Generator().manual_seed(self.inner.sampler.batches_drawn)
            y = y.clone()
            y[:4] = torch.randint(9, self.inner.tokenizer.vocab_size, (4, y.size(1)), generator=g)
        return x, y

    def __getattr__(self, name: str):
        if name == "batch_kind" and self.tell:
            return lambda batch: self.kind
        return super().__getattr__(name)


@pytest.mark.parametrize("tell", [True, False])
def test_batch_kinds_are_compared_with_their_own_kind(tmp_path, tok, tell):
    """Told the kinds, the detector flags only the poisoned easy batch. Not told, the hard kind's batches fire,
    every 4th step, which is one episode that never goes quiet: the poisoned batch is lost inside it."""
    probes = ProbesConfig(spike_window=16, spike_history=4, spike_topk=4)
    objective = TwoKinds(objective_for(tok), at=63, tell=tell)
    run, _ = run_train(
        tmp_path, model_for(tok), objective, [SpikeProbe(probes, RunDir(tmp_path / "run"), tok)], steps=64, lr=1e-2
    )
    steps = [e["step"] for e in run.events() if e["kind"] == "spike"]
    if tell:
        assert steps == [63]
        assert "of easy batches" in next(e for e in run.events() if e["kind"] == "spike")["message"]
    else:
        assert steps and all(s % 4 == 0 for s in steps) and 63 not in steps


def test_loss_floor_keeps_near_zero_loss_noise_out_of_the_spikes():
    """Late in SFT the loss sits near 0.0015 nats; a batch with one wrong token (0.009) is a huge z-score against
    that band, but not a spike once the band's σ is floored at spike_loss_floor. A real jump still is."""
    rng = np.random.default_rng(0)
    quiet = (0.0015 + 0.0003 * rng.standard_normal(50)).tolist()
    median, scale = robust_band(quiet)
    assert (0.009 - median) / scale > 6.0  # without the floor: a "spike"
    median, scale = robust_band(quiet, ProbesConfig().spike_loss_floor)
    assert (0.009 - median) / scale < 1.0 and (0.5 - median) / scale > 6.0


def healthy_series(n: int, seed: int = 0, spread: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """A loss falling with Gaussian noise, and a gradient norm with multiplicative (log-normal) noise, skewed
    as a norm is: nothing in it is a fault."""
    rng = np.random.default_rng(seed)
    loss = 4.0 - np.linspace(0, 1, n) + 0.05 * rng.standard_normal(n)
    grad = 0.5 * np.exp(spread * rng.standard_normal(n))
    return loss, grad


def onsets(rule: SpikeRule, loss, grad, start: int = 0) -> list[int]:
    out = []
    for i, (x, g) in enumerate(zip(loss, grad), start=start + 1):
        if rule.observe(i, "", {"loss": float(x), "grad_norm": float(g)})[1]:
            out.append(i)
    return out


def test_spike_rule_is_quiet_on_a_healthy_noisy_series_and_scoring_the_norm_linearly_is_not():
    loss, grad = healthy_series(3000, seed=1)
    assert onsets(rule_of(ProbesConfig()), loss, grad) == []
    linear = ProbesConfig(spike_log_grad=False)
    assert len(onsets(rule_of(linear), loss, grad)) > 3  # the upper tail of a skewed norm looks like departures


def test_spike_rule_fires_once_per_episode_at_its_onset():
    loss, grad = healthy_series(400, seed=1, spread=0.15)
    grad[200:204] *= 20  # steps 201-204: one episode of four steps...
    grad[206] *= 20  # ...that flickers back within spike_quiet steps: still the same episode
    loss[300] += 3.0  # a second one, much later, in the loss alone
    assert onsets(rule_of(ProbesConfig()), loss, grad) == [201, 301]
    assert onsets(rule_of(ProbesConfig(spike_quiet=1)), loss, grad) == [201, 207, 301]


def test_spike_rule_skips_warmup_steps():
    loss, grad = healthy_series(200, seed=2)
    grad[:40] *= np.linspace(20, 1, 40)  # the norm falls steeply while the learning rate warms up
    rule = rule_of(ProbesConfig())
    rule.warmup = 40
    assert onsets(rule, loss, grad) == []
    assert rule.observe(201, "", {"loss": 3.0, "grad_norm": 0.5})[0]  # scored after warm-up


def test_spike_rule_state_dict_resumes_exactly():
    loss, grad = healthy_series(300, seed=3, spread=0.15)
    grad[150:153] *= 30
    loss[151] += 2.0
    first, second = rule_of(ProbesConfig()), rule_of(ProbesConfig())
    onsets(first, loss[:149], grad[:149])
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for i in range(149, 300):
        values = {"loss": float(loss[i]), "grad_norm": float(grad[i])}
        assert first.observe(i + 1, "", values) == second.observe(i + 1, "", values)
    assert first.in_episode == second.in_episode and first.state_dict() == second.state_dict()


class Relay(Hook):
    """Runs probe `a` throughout and, from step `at` on, also probe `b`, restored from `a`'s state_dict (through
    JSON) just before: both must score every later step alike and write the same events and dossiers."""

    def __init__(self, a: SpikeProbe, make_b, at: int) -> None:
        self.a, self.b, self.make_b, self.at, self.scores = a, None, make_b, at, []

    def on_train_start(self, ctx: StepContext) -> None:
        self.a.on_train_start(ctx)

    def on_step_start(self, ctx: StepContext) -> None:
        if ctx.step + 1 == self.at:
            self.b = self.make_b()
            self.b.on_train_start(ctx)
            self.b.load_state_dict(json.loads(json.dumps(self.a.state_dict())))

    def on_backward(self, ctx: StepContext) -> None:
        for probe in (self.a, self.b):
            if probe is not None:
                ctx.metrics = {}
                probe.on_backward(ctx)
                self.scores.append((ctx.step + 1, probe is self.a, dict(ctx.metrics)))

    def on_optimizer_step(self, ctx: StepContext) -> None:
        for probe in (self.a, self.b):
            if probe is not None:
                probe.on_optimizer_step(ctx)


def test_spike_probe_restored_from_state_dict_scores_and_reports_as_the_original(tmp_path, tok):
    probes = ProbesConfig(spike_window=16, spike_history=4, spike_topk=4)
    run_a, run_b = RunDir.create(tmp_path / "a"), RunDir.create(tmp_path / "b")
    relay = Relay(SpikeProbe(probes, run_a, tok), lambda: SpikeProbe(probes, run_b, tok), at=30)
    objective = Poisoned(objective_for(tok), at=33, rows=[2, 5])  # a spike 3 steps after the hand-over
    run_train(tmp_path, model_for(tok), objective, [relay], steps=36, lr=1e-2)
    a = {step: m for step, is_a, m in relay.scores if is_a and step >= 30}
    b = {step: m for step, is_a, m in relay.scores if not is_a}
    assert a == b and any(a.values())
    events_a = [e for e in run_a.events() if e["kind"] == "spike" and e["step"] >= 30]
    events_b = [e for e in run_b.events() if e["kind"] == "spike"]
    assert [e["step"] for e in events_a] == [33]
    drop = ("time", "dossier")
    assert [{k: v for k, v in e.items() if k not in drop} for e in events_a] == [
        {k: v for k, v in e.items() if k not in drop} for e in events_b
    ]
    dossier_a = json.loads((run_a.spikes_dir / "step-0000033.json").read_text())
    assert dossier_a == json.loads((run_b.spikes_dir / "step-0000033.json").read_text())
    assert dossier_a["history"][0]["step"] == 29  # the dossier reaches back before the hand-over


def test_first_departure_is_the_block_that_left_its_band_first():
    rng = np.random.default_rng(0)
    records = []
    for step in range(1, 21):
        g = {"blocks.0": 1.0 + 0.05 * rng.standard_normal(), "blocks.1": 2.0 + 0.1 * rng.standard_normal()}
        u = {"blocks.0": 0.01 + 0.001 * rng.standard_normal(), "blocks.1": 0.02 + 0.002 * rng.standard_normal()}
        if step >= 18:
            g["blocks.1"] *= 4  # blocks.1 moves first...
        if step == 20:
            g["blocks.0"] *= 4  # ...blocks.0 follows at the spike
            u["blocks.0"] *= 3
        records.append({"step": step, "grad_norm": g, "update_norm": u})
    moved = departures(records, history=4, threshold=6.0)
    assert moved[0] == {"block": "blocks.1", "norm": "grad_norm", "step": 18, "score": moved[0]["score"]}
    assert [(d["block"], d["norm"], d["step"]) for d in moved[1:]] == [
        ("blocks.0", "grad_norm", 20),
        ("blocks.0", "update_norm", 20),
    ]
    assert departures(records[:8], history=4, threshold=6.0) == []  # too little reference to call anything


class Sabotage(Hook):
    """At step `at`, puts an inf into one weight (NaN forward) or a NaN into one gradient (finite forward)."""

    order = -100  # stands for the step itself: before the probes that read raw gradients

    def __init__(self, at: int, where: str) -> None:
        self.at, self.where = at, where

    def on_step_start(self, ctx: StepContext) -> None:
        if ctx.step + 1 == self.at and self.where == "weight":
            with torch.no_grad():
                ctx.model.blocks[1].mlp.up.weight[0, 0] = math.inf

    def on_backward(self, ctx: StepContext) -> None:
        if ctx.step + 1 == self.at and self.where == "grad":
            ctx.model.blocks[0].attn.v.weight.grad[0, 0] = math.nan


@pytest.mark.parametrize("where", ["weight", "grad"])
def test_divergence_names_the_first_nonfinite_module(tmp_path, tok, where):
    run = RunDir.create(tmp_path / "run")
    hooks = [SpikeProbe(ProbesConfig(), run, tok), Sabotage(3, where)]  # sabotage runs first by its order
    cfg = TrainConfig(steps=5, batch_size=8, warmup_steps=0, eval_every=0, checkpoint_every=1000)
    with MetricStore(run.metrics_db_path) as store, pytest.raises(Diverged):
        train(model_for(tok), objective_for(tok), cfg, run, store, arch={}, hooks=hooks)
    event = next(e for e in run.events() if e["kind"] == "nonfinite")
    assert event["step"] == 3
    d = json.loads((run.spikes_dir / "step-0000003.json").read_text())
    if where == "weight":
        assert event["module"] == "blocks.1.mlp.up" and "blocks.1.mlp.up" in event["message"]
        assert d["nonfinite"]["what"] == "loss"
    else:
        assert event["module"] is None and event["nonfinite_grads"] == ["blocks.0.attn.v"]
        assert d["history"][-1]["step"] == 3 and math.isnan(d["history"][-1]["grad_norm"]["blocks.0"])
    assert [r["step"] for r in d["history"]][:2] == [1, 2]


# ---- the hook protocol: order, state across a resume, errors and close ---------------------------


class Journal(Hook):
    """Writes down the moments it sees; its state is the number of steps it saw, which a resume must restore."""

    def __init__(self, log: list, fail_at: int | None = None) -> None:
        self.log, self.fail_at, self.steps = log, fail_at, 0

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]

    def on_train_start(self, ctx: StepContext) -> None:
        self.log.append((type(self).__name__, "start", ctx.step))

    def on_optimizer_step(self, ctx: StepContext) -> None:
        self.steps += 1
        self.log.append((type(self).__name__, "step", self.steps))
        if ctx.step == self.fail_at:
            raise RuntimeError("boom")

    def on_error(self, ctx: StepContext, exc: BaseException) -> None:
        self.log.append((type(self).__name__, "error", str(exc)))

    def close(self, ctx: StepContext) -> None:
        self.log.append((type(self).__name__, "close", ctx.step))


class Early(Journal):
    order = -5


class Late(Journal):
    order = 5


def test_hooks_run_by_order_keep_state_across_a_resume_and_always_close(tmp_path, tok):
    run = RunDir.create(tmp_path / "run")
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=0, eval_every=0, checkpoint_every=2)
    log: list = []
    with MetricStore(run.metrics_db_path) as store, pytest.raises(RuntimeError, match="boom"):
        train(model_for(tok), objective_for(tok), cfg, run, store, arch={}, hooks=[Late(log, fail_at=3), Early(log)])
    moments = [("Early", "start", 0), ("Late", "start", 0)]
    moments += [(name, "step", n) for n in (1, 2, 3) for name in ("Early", "Late")]
    moments += [("Early", "error", "boom"), ("Late", "error", "boom"), ("Early", "close", 3), ("Late", "close", 3)]
    assert log == moments
    saved = load_checkpoint(latest_checkpoint(run.checkpoints_dir, "pretrain")).extra["hooks"]
    assert saved == {"Early.0": {"steps": 2}, "Late.0": {"steps": 2}}

    log.clear()
    with MetricStore(run.metrics_db_path) as store:
        train(model_for(tok), objective_for(tok), cfg, run, store, arch={}, hooks=[Late(log), Early(log)])
    assert log[:4] == [("Early", "start", 2), ("Late", "start", 2), ("Early", "step", 3), ("Late", "step", 3)]
    assert log[-2:] == [("Early", "close", 4), ("Late", "close", 4)]  # counted from the checkpoint's 2


def test_objectives_declare_what_the_probes_read(tok):
    """A renamed method would make a probe skip itself silently: the protocols and the objectives agree."""
    lm = objective_for(tok)
    assert all(isinstance(lm, p) for p in (ProbeRows, TokenLosses, ValBatches, BatchIds))
    assert not isinstance(lm, KindedBatches)  # one kind of batch: one spike window


# ---- configuration and wiring ------------------------------------------------------------------


def app():
    from glasslab.cli import app

    return app


def test_probe_modes_build_the_right_hooks(tmp_path, tok):
    run = RunDir.create(tmp_path / "run")
    assert build_probes(Config(probes=ProbesConfig(mode="off")), run, tok) == []
    default = build_probes(Config(), run, tok)
    assert [type(h) for h in default] == [GradProbe, SpikeProbe, ForwardProbe, LossByPosition]
    assert default[0].every == 10 and default[2].attention_every == 50
    full = build_probes(Config(probes=ProbesConfig(mode="full", grads_every=0, spikes=False)), run, tok)
    assert [type(h) for h in full] == [GradProbe, SpikeProbe, ForwardProbe, LossByPosition]
    assert full[0].every == 1 and full[2].attention_every == 1 and full[2].activations_every == 1
    only_grads = ProbesConfig(attention_every=0, activations_every=0, spikes=False, loss_by_position=False)
    assert [type(h) for h in build_probes(Config(probes=only_grads), run, tok)] == [GradProbe]


def test_cli_probes_flag_sets_the_mode(tmp_path, monkeypatch):
    import glasslab.stages.pretrain

    seen = {}
    monkeypatch.setattr(glasslab.stages.pretrain, "pretrain", lambda cfg, run, **kw: seen.update(mode=cfg.probes.mode))
    args = ["pretrain", "--preset", "smoke", "--runs-dir", str(tmp_path), "--name", "r", "--probes", "off"]
    assert CliRunner().invoke(app(), args).exit_code == 0
    assert seen["mode"] == "off"
    assert CliRunner().invoke(app(), [*args[:-1], "sometimes", "--overwrite"]).exit_code != 0


def test_probe_steps_follow_the_cadence_and_leave_no_hooks(tmp_path, tok):
    model = model_for(tok)
    probes = [GradProbe(every=3), ForwardProbe(attention_every=2, activations_every=0)]
    run, _ = run_train(tmp_path, model, objective_for(tok), probes, steps=6)
    with MetricStore(run.metrics_db_path) as store:
        assert store.series("grad_norm/blocks.0")[0].tolist() == [3, 6]
        assert store.series("attn_entropy/blocks.0.h0")[0].tolist() == [2, 4, 6]
        assert store.series("act_rms/blocks.0")[0].tolist() == []
    assert not any(m._forward_hooks for m in model.modules())
