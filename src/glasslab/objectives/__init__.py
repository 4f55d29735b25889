"""Every stage's objective, in one place: what the one training loop (train/loop.py) trains on and how it scores
it. lm: pretraining; sft: supervised fine-tuning on conversations; rollouts: what RL objectives share (sampling,
reference scoring, evaluation, state); grpo and dpo: the two RL algorithms."""
