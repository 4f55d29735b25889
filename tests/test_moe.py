"""The mixture-of-experts MLP: equivalences with the dense MLP and a per-token loop, routing and bias balancing,
capacity drops, the balancing losses, exact resume and identical biases across DDP ranks."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from glasslab.config import ModelConfig, MoEConfig, TrainConfig, resolve
from glasslab.data.tokenizer import Tokenizer
from glasslab.data.tokens import TokenSplits
from glasslab.errors import GlasslabError
from glasslab.model.generate import generate
from glasslab.model.gpt import GPT, MLP
from glasslab.model.moe import MoE, Routing, add_router_losses, bias_step, switch_loss, within_capacity
from glasslab.objectives.lm import LanguageModeling
from glasslab.probes import build_probes
from glasslab.probes.router import PREFIX, RouterProbe, maxvio, routing_metrics, routing_sums
from glasslab.probes.view import probe_summary
from glasslab.report.moe import moe_section
from glasslab.report.rundata import RunData, Series
from glasslab.report.sections import Claims
from glasslab.track.metrics import MetricStore, last_values
from glasslab.track.rundir import RunDir
from glasslab.train.balance import BiasBalancing, update_biases
from glasslab.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = "the quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 60


def model_cfg(**moe) -> ModelConfig:
    return ModelConfig(vocab_size=61, n_layer=2, n_head=2, n_embd=32, block_size=32, moe=MoEConfig(**moe))


def moe_of(model: GPT, layer: int = 0) -> MoE:
    return model.blocks[layer].mlp


def naive_moe(layer: MoE, x: torch.Tensor) -> torch.Tensor:
    """The MoE output token by token, expert by expert: the definition the batched dispatch must equal."""
    r = layer.router(x)
    rows = []
    for n in range(x.size(0)):
        y = torch.zeros(x.size(1))
        for j in range(r.experts.size(1)):
            if r.kept is not None and not r.kept[n, j]:
                continue
            e = int(r.experts[n, j])
            h = layer.experts.act(x[n] @ layer.experts.up[e])
            y = y + r.gates[n, j] * (h @ layer.experts.down[e])
        rows.append(y)
    out = torch.stack(rows)
    return out + layer.shared(x) if layer.shared is not None else out


def test_one_expert_top1_is_the_dense_mlp_with_the_same_weights():
    torch.manual_seed(0)
    dense, moe = GPT(model_cfg()), GPT(model_cfg(n_experts=1, top_k=1, hidden=128))
    for d, m in zip(dense.blocks, moe.blocks):
        m.mlp.experts.up.data.copy_(d.mlp.up.weight.T.unsqueeze(0))
        m.mlp.experts.down.data.copy_(d.mlp.down.weight.T.unsqueeze(0))
    state = {k: v for k, v in dense.state_dict().items() if ".mlp." not in k}
    moe.load_state_dict({**moe.state_dict(), **state})
    x = torch.randint(0, 61, (3, 20))
    torch.testing.assert_close(moe(x), dense(x))


@pytest.mark.parametrize(
    "moe",
    [
        dict(n_experts=4, top_k=1),
        dict(n_experts=4, top_k=2, score="sigmoid", shared=1),
        dict(n_experts=3, top_k=2, capacity_factor=0.6),
    ],
    ids=["softmax-top1", "sigmoid-top2-shared", "capacity"],
)
def test_batched_dispatch_equals_a_per_token_loop_in_values_and_gradients(moe):
    torch.manual_seed(1)
    layer = moe_of(GPT(model_cfg(**moe)))
    layer.router.bias.copy_(torch.randn(layer.cfg.n_experts) * 0.1)
    x = torch.randn(24, 32, requires_grad=True)
    batched = layer(x)
    grads = torch.autograd.grad(batched.square().sum(), [x, *layer.parameters()])
    reference = naive_moe(layer, x)
    ref_grads = torch.autograd.grad(reference.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(batched, reference)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_the_bias_changes_the_choice_and_never_the_gates():
    torch.manual_seed(2)
    layer = moe_of(GPT(model_cfg(n_experts=4, top_k=2)))
    x = torch.randn(64, 32)
    before = layer.router(x)
    layer.router.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 10.0]))  # expert 3 wins every token's first slot
    after = layer.router(x)
    assert (after.experts[:, 0] == 3).all() and not torch.equal(before.experts, after.experts)
    torch.testing.assert_close(after.scores, before.scores)
    chosen = before.scores.gather(-1, after.experts)
    torch.testing.assert_close(after.gates, chosen / chosen.sum(-1, keepdim=True))  # scores only, no bias


def test_bias_update_sign_and_size():
    torch.testing.assert_close(bias_step(torch.tensor([10, 30, 20, 20]), 0.01), torch.tensor([0.01, -0.01, 0.0, 0.0]))
    torch.manual_seed(3)
    model = GPT(model_cfg(n_experts=4, bias_rate=0.5))
    model.train()
    model(torch.randint(0, 61, (2, 16)))
    load = moe_of(model).load.clone()
    assert int(load.sum()) == 32
    update_biases(model, 0.5)
    expected = 0.5 * torch.sign(load.float().mean() - load.float())
    torch.testing.assert_close(moe_of(model).router.bias, expected)
    assert moe_of(model).load is None
    with torch.no_grad():
        model(torch.randint(0, 61, (2, 16)))  # evaluation forwards are not counted
    assert moe_of(model).load is None


def test_dropped_tokens_pass_through_the_block_unchanged():
    torch.manual_seed(4)
    layer = moe_of(GPT(model_cfg(n_experts=2, top_k=1, capacity_factor=0.5)))
    layer.router.bias.copy_(torch.tensor([100.0, 0.0]))  # all 16 tokens pick expert 0, which takes 4
    x = torch.randn(16, 32)
    r = layer.router(x)
    assert r.kept[:, 0].tolist() == [True] * 4 + [False] * 12
    out = layer(x)
    assert (out[4:] == 0).all() and (out[:4] != 0).any()  # the residual stream carries them through unchanged


def test_capacity_serves_first_choices_before_second_choices():
    experts = torch.tensor([[0, 1], [0, 1], [1, 0]])
    # queues, first choices first: expert 0 gets t0, t1, then t2's second; expert 1 gets t2, then t0's, t1's second.
    assert within_capacity(experts, 2, 2).tolist() == [[True, True], [True, False], [True, False]]
    assert within_capacity(experts, 2, 3).tolist() == [[True, True], [True, True], [True, True]]


def test_switch_loss_and_router_losses_against_a_hand_computation():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]])
    experts = torch.tensor([[0], [0], [2], [0]])
    r = Routing(scores.log(), scores, experts, scores.gather(-1, experts), None)
    # f = (3/4, 0, 1/4), P = mean rows = (0.475, 0.2125, 0.3125): 3 · (0.75·0.475 + 0.25·0.3125)
    expected = 3 * (0.75 * 0.475 + 0.25 * 0.3125)
    assert switch_loss(r, torch.tensor([3, 0, 1])).item() == pytest.approx(expected)
    torch.manual_seed(5)
    model = GPT(model_cfg(n_experts=4, aux_loss=0.1, z_loss=0.01))
    model.train()
    logits = model(torch.randint(0, 61, (2, 16)))
    base = logits.mean()
    terms = [moe_of(model, i).balance_terms[0] for i in range(2)]
    loss, parts = add_router_losses(model, base, {"train/loss": base.item()})
    aux, z = sum(t[0].item() for t in terms), sum(t[1].item() for t in terms)
    assert parts["train/moe_aux_loss"] == pytest.approx(aux) and parts["train/moe_z_loss"] == pytest.approx(z)
    assert loss.item() == pytest.approx(base.item() + 0.1 * aux + 0.01 * z, rel=1e-5)
    assert all(not moe_of(model, i).balance_terms for i in range(2))  # taken once
    assert add_router_losses(model, base, {}) == (base, {})


def test_moe_layers_in_chosen_blocks_and_config_errors():
    model = GPT(model_cfg(n_experts=4, layers=[1]))
    assert not isinstance(model.blocks[0].mlp, MoE) and isinstance(model.blocks[1].mlp, MoE)
    assert isinstance(model.blocks[0].mlp, MLP)
    with pytest.raises(GlasslabError, match="top_k"):
        resolve("smoke", overrides=["model.moe.n_experts=2", "model.moe.top_k=3"])
    with pytest.raises(GlasslabError, match="moe.layers"):
        resolve("smoke", overrides=["model.moe.n_experts=2", "model.moe.layers=[5]"])


def test_tiny_moe_has_the_active_parameters_of_tiny():
    tiny, moe = resolve("tiny").model, resolve("tiny-moe").model
    tiny.vocab_size = moe.vocab_size = 2048
    assert moe.moe.n_experts == 4 and moe.moe.top_k == 1
    dense, sparse = GPT(tiny), GPT(moe)
    expert = sum(p.numel() for p in moe_of(sparse).experts.parameters()) // moe.moe.n_experts
    dense_mlp = sum(p.numel() for p in moe_of(dense).parameters())
    assert expert == dense_mlp


def test_kv_cache_generation_matches_full_recompute():
    torch.manual_seed(6)
    model = GPT(model_cfg(n_experts=4, top_k=2)).eval()
    prompt = [5, 7, 9, 11]
    out = generate(model, [prompt], 6, temperature=0.0)
    seq = list(prompt)
    for _ in range(6):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out.tokens[0] == seq[len(prompt) :]


# ---- through the training loop ---------------------------------------------------------------------


def objective(seed: int = 0) -> LanguageModeling:
    tok = Tokenizer.train([TEXT], "char", 0)
    ids = np.array(tok.encode(TEXT), dtype=np.uint16)
    cut = int(len(ids) * 0.9)
    splits = TokenSplits(train=ids[:cut], val=ids[cut:])
    return LanguageModeling(
        splits,
        tok,
        batch_size=4,
        block_size=32,
        eval_batches_n=1,
        z_loss=0.0,
        seed=seed,
        device=torch.device("cpu"),
        sample_tokens=4,
    )


def moe_model(seed: int, vocab: int) -> GPT:
    torch.manual_seed(seed)
    cfg = model_cfg(n_experts=4, top_k=2, aux_loss=0.01, bias_rate=0.01, z_loss=0.001)
    return GPT(cfg.model_copy(update={"vocab_size": vocab}))


def train_to(path, model: GPT, steps: int) -> dict[int, float]:
    cfg = TrainConfig(
        steps=6, schedule="constant", warmup_steps=0, eval_every=0, checkpoint_every=2, keep_last=5, batch_size=4
    )
    run = RunDir.open(path) if path.exists() else RunDir.create(path)
    with MetricStore(run.metrics_db_path) as store:
        train(
            model,
            objective(),
            cfg.model_copy(update={"steps": steps}),
            run,
            store,
            arch={},
            hooks=[BiasBalancing(0.01)],
        )
        steps_, values = store.series("train/loss")
    return dict(zip(steps_.tolist(), values.tolist()))


def test_a_stopped_and_resumed_moe_run_equals_the_uninterrupted_one(tmp_path):
    vocab = objective().tokenizer.vocab_size
    straight = moe_model(0, vocab)
    losses = train_to(tmp_path / "a", straight, 6)
    assert straight.blocks[0].mlp.router.bias.abs().sum() > 0
    train_to(tmp_path / "b", moe_model(0, vocab), 4)
    resumed = moe_model(99, vocab)  # other weights and zero biases: everything must come from the checkpoint
    resumed_losses = train_to(tmp_path / "b", resumed, 6)
    assert resumed_losses == losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def _ddp_worker(rank: int, world: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = moe_model(0, 61)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own batches, so their loads differ
    loads = []
    for _ in range(3):
        x = torch.randint(0, 61, (4, 16), generator=gen)
        loss, _ = add_router_losses(model, ddp(x).logsumexp(-1).mean(), {})
        loss.backward()
        opt.step()
        opt.zero_grad()
        loads.append(model.blocks[0].mlp.load.clone())
        update_biases(model, 0.01)
    torch.save({"bias": [b.mlp.router.bias for b in model.blocks], "loads": loads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_ddp_ranks_keep_identical_biases(tmp_path):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "out")), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"out.{r}") for r in range(2))
    assert any(not torch.equal(a, b) for a, b in zip(r0["loads"], r1["loads"]))  # the ranks saw different loads
    for a, b in zip(r0["bias"], r1["bias"]):
        assert torch.equal(a, b) and a.abs().sum() > 0


# ---- the router probe ------------------------------------------------------------------------------


def entropy(p: list[float]) -> float:
    return -sum(x * math.log(x) for x in p if x > 0)


def test_router_metrics_against_a_hand_computation_on_a_small_routing_table():
    rows = [[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.5, 0.25, 0.25]]
    scores = torch.tensor(rows)
    experts = torch.tensor([[0], [0], [2], [0]])
    kept = torch.tensor([[True], [True], [False], [True]])
    r = Routing(scores.log(), scores, experts, scores.gather(-1, experts), kept)
    half = routing_sums(r)
    m = {k: v.tolist() for k, v in routing_metrics(half + half, 3).items()}  # two identical forwards: same shares
    mean = 4 / 3  # counts (3, 0, 1)
    std = math.sqrt(((3 - mean) ** 2 + mean**2 + (1 - mean) ** 2) / 3)
    assert m["load"] == pytest.approx([0.75, 0.0, 0.25])
    assert m["maxvio"] == pytest.approx(3 / mean - 1)
    assert m["cv"] == pytest.approx(std / mean)
    assert m["dropped"] == pytest.approx(0.25)
    assert m["entropy"] == pytest.approx(sum(entropy(row) for row in rows) / 4)
    assert m["entropy_mean"] == pytest.approx(entropy([0.475, 0.2125, 0.3125]))
    assert m["diversity"] == pytest.approx(math.exp(entropy([0.75, 0.25])) / 3)
    assert m["top1_gate"] == pytest.approx((0.7 + 0.6 + 0.8 + 0.5) / 4)
    assert maxvio(torch.tensor([2, 2, 2])) == 0.0


def test_router_probe_through_the_loop(tmp_path):
    obj = objective()
    model = moe_model(0, obj.tokenizer.vocab_size)
    probe = RouterProbe(every=2, churn_every=2, dead_window=2)
    run = RunDir.create(tmp_path / "run")
    cfg = TrainConfig(steps=4, warmup_steps=0, eval_every=4, checkpoint_every=100, batch_size=4)
    with MetricStore(run.metrics_db_path) as store:
        train(model, obj, cfg, run, store, arch={}, hooks=[BiasBalancing(0.01), probe])
        m = last_values(store.read())
        assert store.series(f"{PREFIX}maxvio/blocks.0")[0].tolist() == [2, 4]
        assert store.series(f"{PREFIX}churn/blocks.1")[0].tolist() == [4]  # step 2 sets the baseline
        assert store.series(f"{PREFIX}dead/blocks.0")[0].tolist() == [4]  # once the window of 2 probes is full
        assert store.series(f"{PREFIX}eval_maxvio")[0].tolist() == [4]
    for layer in ("blocks.0", "blocks.1"):
        load = [m[f"{PREFIX}load/{layer}.e{k}"] for k in range(4)]
        assert sum(load) == pytest.approx(1.0)
        assert m[f"{PREFIX}maxvio/{layer}"] == pytest.approx(max(load) * 4 - 1)
        bias = [m[f"{PREFIX}bias/{layer}.e{k}"] for k in range(4)]
        assert bias == pytest.approx(model.blocks[int(layer[-1])].mlp.router.bias.tolist())
        assert 0 <= m[f"{PREFIX}churn/{layer}"] <= 1 and 0.25 <= m[f"{PREFIX}diversity/{layer}"] <= 1
    assert not any(mod._forward_hooks for mod in model.modules())
    shown = probe_summary(run.path)["router"]  # what `glasslab probes RUN` prints
    assert shown["blocks.1"]["load"][3]["value"] == m[f"{PREFIX}load/blocks.1.e3"]
    assert shown["blocks.0"]["eval_maxvio"]["step"] == 4 and "maxvio" in shown["blocks.1"]
    state = json.loads(json.dumps(probe.state_dict()))
    fresh = RouterProbe(every=2, churn_every=2, dead_window=2)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == probe.state_dict() and len(state["last_top1"]["blocks.0"]) == 4 * 32  # the probe rows


def test_build_probes_adds_the_router_probe_for_moe_models_only(tmp_path):
    run = RunDir.create(tmp_path / "run")
    dense = build_probes(resolve("tiny"), run)
    assert not any(isinstance(h, RouterProbe) for h in dense)
    moe = [h for h in build_probes(resolve("tiny-moe"), run) if isinstance(h, RouterProbe)]
    assert len(moe) == 1 and moe[0].every == 1


def test_report_moe_section_shows_the_router_metrics():
    steps = np.arange(1, 4)

    def series(values: list[float]) -> Series:
        return Series(steps, np.array(values, dtype=float), steps.astype(float))

    metrics = {f"{PREFIX}load/blocks.0.e{k}": series([0.5 if k == 0 else 0.5 / 3] * 3) for k in range(4)}
    metrics |= {f"{PREFIX}maxvio/blocks.0": series([1.0, 1.0, 1.0]), f"{PREFIX}dead/blocks.0": series([0, 1, 2])}
    metrics |= {"train/moe_aux_loss": series([1.2, 1.1, 1.0]), "train/loss": series([3.0, 2.9, 2.8])}
    metrics |= {f"{PREFIX}domain_load/sums/blocks.0.e{k}": series([0.25] * 3) for k in range(4)}
    run = RunData(Path("r"), {}, {}, "", {"pretrain": metrics})
    claims = Claims()
    section = moe_section(run, claims)
    titles = [item.get("title", "") for item in section.items]
    assert "Load share per expert (pretrain)" in titles and "MaxVio per batch (pretrain)" in titles
    assert "Load share per expert by data domain (pretrain)" in titles
    heat = next(item for item in section.items if item.get("title") == "Load share per expert (pretrain)")
    assert heat["rows"] == [f"blocks.0.e{k}" for k in range(4)] and heat["z"][0] == [0.5] * 3
    summary = next(item["html"] for item in section.items if item["type"] == "html")
    assert "2 experts received no token" in summary
    assert claims.free("pretrain", metrics) == ["train/moe_aux_loss", "train/loss"]  # the stage section's
