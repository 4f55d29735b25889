import math

import torch

from glasslab.config import TrainConfig
from glasslab.model.gpt import GPT
from glasslab.train.optim import Muon, build_optimizer, lr_multiplier, newton_schulz, orthogonalised, param_groups


def test_schedules_warm_up_then_decay_to_the_floor():
    for kind in ("cosine", "linear", "wsd"):
        cfg = TrainConfig(steps=100, warmup_steps=10, schedule=kind, min_lr_ratio=0.1)
        mults = [lr_multiplier(s, cfg) for s in range(100)]
        assert math.isclose(mults[0], 0.1) and math.isclose(mults[9], 1.0)
        assert all(a >= b - 1e-12 for a, b in zip(mults[10:], mults[11:]))  # never rises after warmup
        assert 0.1 <= mults[-1] < 0.15
    wsd = TrainConfig(steps=100, warmup_steps=10, schedule="wsd", decay_fraction=0.2)
    assert lr_multiplier(79, wsd) == 1.0 and lr_multiplier(90, wsd) < 1.0
    assert lr_multiplier(60, TrainConfig(steps=100, schedule="constant")) == 1.0


def test_newton_schulz_orthogonalises():
    g = torch.randn(32, 64)
    o = newton_schulz(g)
    s = torch.linalg.svdvals(o)
    assert s.min() > 0.5 and s.max() < 1.5  # singular values pushed towards 1
    tall = newton_schulz(torch.randn(64, 32))
    assert tall.shape == (64, 32)


def test_orthogonalised_batches_by_shape_and_keeps_the_order():
    torch.manual_seed(0)
    mats = [torch.randn(32, 64), torch.randn(64, 32), torch.randn(32, 64), torch.randn(16, 16)]
    out = orthogonalised(mats)
    for m, o in zip(mats, out):
        assert o.shape == m.shape and torch.allclose(o, newton_schulz(m), atol=2e-2)
    assert not torch.allclose(out[0], out[2], atol=0.1)  # the two 32x64 matrices did not swap or merge


def test_groups_decay_matrices_only_and_muon_takes_hidden_matrices(tiny_model: GPT):
    groups = param_groups(tiny_model, TrainConfig(optimizer="adamw"))
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and all(p.dim() == 1 for p in groups[1]["params"])
    opt = build_optimizer(tiny_model, TrainConfig(optimizer="muon"))
    assert isinstance(opt, Muon)
    muon = [g for g in opt.param_groups if g["muon"]][0]["params"]
    assert all(p is not tiny_model.wte.weight for p in muon) and len(muon) == 6 * tiny_model.cfg.n_layer


def test_both_optimizers_reduce_loss(tiny_model: GPT):
    x = torch.randint(0, 61, (4, 16))
    for name in ("adamw", "muon"):
        model = GPT(tiny_model.cfg)
        opt = build_optimizer(model, TrainConfig(optimizer=name, lr=3e-3, muon_lr=0.02))
        losses = []
        for _ in range(30):
            loss = torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[-1] < losses[0] * 0.7, name
        if name == "muon":  # AdamW moments under torch's names, for the update probes
            assert "exp_avg_sq" in opt.state[model.wte.weight]


def test_precision_setting_maps_to_an_autocast_dtype():
    from glasslab.train.precision import autocast_dtype

    assert autocast_dtype("float32", "cpu") is None
    assert autocast_dtype("bfloat16", "cpu") is torch.bfloat16
    fast = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert autocast_dtype("auto", "cpu") is (torch.bfloat16 if fast else None)
    assert autocast_dtype("auto", "mps") is None  # no fast-bf16 check for it: stay in float32
