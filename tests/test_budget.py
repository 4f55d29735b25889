"""train.budget: the forms it takes, the step the loop stops at for steps and tokens, and exactness on resume."""

from __future__ import annotations

import pytest
from test_probes import model_for, objective_for, tok  # noqa: F401 - tok is a fixture

from glasslab.budget import Budget, BudgetMeter, parse_budget
from glasslab.config import TrainConfig, resolve
from glasslab.errors import GlasslabError
from glasslab.track.checkpoint import latest_checkpoint, load_checkpoint
from glasslab.track.metrics import MetricStore
from glasslab.track.rundir import RunDir
from glasslab.train.loop import train

pytestmark = pytest.mark.usefixtures("one_thread")
TOKENS_PER_STEP = 8 * 32  # objective_for: batch 8 of 32-token windows


def test_budget_forms_parse_and_normalise() -> None:
    assert parse_budget("2000steps") == Budget("steps", 2000)
    assert parse_budget("1e6tokens") == Budget("tokens", 1_000_000)
    assert parse_budget("90s") == Budget("seconds", 90) == parse_budget("1.5min")
    assert str(parse_budget(" 2_000 STEPS ")) == "2000steps" and str(parse_budget("2min")) == "120s"
    for bad in ("fast", "10 parsecs", "0steps", "2.5steps", "-3s"):
        with pytest.raises(ValueError, match="budget"):
            parse_budget(bad)
    assert resolve("smoke", None, ["sft.train.budget=1e3tokens"]).sft.train.budget == "1000tokens"
    with pytest.raises(GlasslabError, match="train.budget"):
        resolve("smoke", None, ["train.budget=soon"])


def test_meter_stops_once_crossed_and_restores_its_counts() -> None:
    meter = BudgetMeter("100tokens")
    meter.add(60, 0.5)
    assert not meter.spent(1)
    meter.add(60, 0.5)
    assert meter.spent(2)
    again = BudgetMeter("100tokens")
    again.load_state_dict(meter.state_dict())
    assert again.spent(2) and again.tokens == 120
    assert not BudgetMeter(None).spent(10**9) and BudgetMeter("3steps").spent(3)
    timed = BudgetMeter("1s")
    timed.add(0, 0.6)
    assert timed.measured and not timed.spent(1)
    timed.add(0, 0.6)
    assert timed.spent(2)


def _train(run: RunDir, tok, steps: int, budget: str | None) -> int:  # noqa: F811
    cfg = TrainConfig(
        steps=steps, budget=budget, batch_size=8, warmup_steps=0, eval_every=0, checkpoint_every=1000, sample_every=0
    )
    with MetricStore(run.metrics_db_path) as store:
        return train(model_for(tok), objective_for(tok), cfg, run, store, arch={})


def test_tokens_budget_stops_after_the_crossing_step_and_is_exact_on_resume(tmp_path, tok) -> None:  # noqa: F811
    budget = f"{2 * TOKENS_PER_STEP + 1}tokens"  # crossed during step 3
    whole = RunDir.create(tmp_path / "whole")
    assert _train(whole, tok, 10, budget) == 3
    with MetricStore(whole.metrics_db_path) as store:
        evals = [r for r in store.read().to_pylist() if r["name"] == "val/loss"]
    assert [r["step"] for r in evals] == [3]  # the final evaluation ran at the step the budget stopped

    split = RunDir.create(tmp_path / "split")
    assert _train(split, tok, 2, budget) == 2  # stopped by steps, with a checkpoint holding the tokens spent
    assert _train(split, tok, 10, budget) == 3  # resumed: 2 steps' tokens already counted, so one more step
    state = load_checkpoint(latest_checkpoint(split.checkpoints_dir, "pretrain")).extra["budget"]
    assert state["tokens"] == 3 * TOKENS_PER_STEP
    assert _train(split, tok, 10, budget) == 3  # resuming a spent stage trains nothing more
