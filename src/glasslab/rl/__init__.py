"""Reinforcement learning from an environment's rewards, as objectives of the one training loop.

    losses.py    the math, as pure functions: group advantages, KL estimators, clipped surrogate, loss
                 aggregations (grpo / bnpo / dapo / dr_grpo), DPO loss
    rollout.py   batched rollouts and their scoring, packing into training tensors, what GRPO and DPO share
                 (`RolloutObjective`), and the stage's hooks (reference reset, rollout tables, training time)
    grpo.py      the GRPO objective
    dpo.py       the (online) DPO objective
    hacking.py   reward-hacking detectors, a Hook reading each step's metrics

The stage that wires them is `glasslab.stages.rl`; the command is `glasslab rl`.
"""
