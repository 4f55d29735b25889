"""The RL math as pure functions on tensors: group advantages, KL estimators, the clipped surrogate, the loss
aggregations of GRPO and its successors, and the DPO loss. No models, no data: every function here is
checked against a plain-loop reference computation in tests/test_rl.py.

Shapes: per-token tensors are (B, T) over B completions padded to T positions; `mask` (B, T) marks the tokens
that are trained on (sampled by the policy, not forced, not padding, not in a masked truncated completion).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ScaleRewards = Literal["group", "batch", "none"]
KLEstimator = Literal["k1", "k2", "k3"]
LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]


def logsumexp_of(logits: Tensor, probs: Tensor) -> Tensor:
    """log Σ exp(logits) over the last dim, read off `probs` = softmax(logits). Softmax is monotone, so its largest
    p is at the largest logit, where log p = x_max - lse; that p is at least 1/V, so its log never underflows.
    On CPU this is cheaper than a log-softmax or torch.logsumexp when the softmax is needed anyway."""
    return logits.amax(dim=-1) - probs.amax(dim=-1).log()


def _softmax_logprobs(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The logits in float32 at least (bf16 ones from an autocast head), their softmax, log-sum-exp, and log p of
    the targets: the one computation behind every RL log-prob, so a reference equal to the policy agrees to the bit."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = torch.softmax(x, dim=-1)
    lse = logsumexp_of(x, probs)
    return x, probs, lse, x.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) at every position: (..., V), (...) -> (...), e.g. (B, T, V), (B, T) -> (B, T)."""
    return _softmax_logprobs(logits, targets)[3]


class _LogprobEntropy(torch.autograd.Function):
    """log p(target) and the entropy of (N, V) logits from one softmax, with a backward written from the saved
    probabilities. Autograd's version runs a log-softmax, a softmax, a product and their backwards (a zero-filled
    gather gradient and a log-softmax backward that recomputes the exponentials), a large share of the training
    half of a small model's GRPO step on CPU; this makes two passes fewer over the logits each way. That pays
    most while sampling runs beside it (rl.generate_ahead), when the passes over memory are what contend."""

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:  # noqa: ANN001
        x, probs, lse, logp = _softmax_logprobs(logits, targets)
        entropy = lse - (probs * x).sum(-1)  # H = -Σ p (x - lse) = lse - Σ p x
        ctx.save_for_backward(probs, x, targets, lse, entropy)
        ctx.set_materialize_grads(False)
        ctx.input_dtype = logits.dtype
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp: Tensor | None, g_entropy: Tensor | None) -> tuple[Tensor | None, None]:  # noqa: ANN001
        probs, x, targets, lse, entropy = ctx.saved_tensors
        g_logp = torch.zeros_like(lse) if g_logp is None else g_logp
        # d log p_t / dx = onehot_t - p;  dH / dx = -p (log p + H)
        scale = -g_logp.unsqueeze(-1)
        if g_entropy is not None:
            scale = scale - g_entropy.unsqueeze(-1) * (x - (lse - entropy).unsqueeze(-1))
        grad = probs * scale
        grad.scatter_add_(-1, targets.unsqueeze(-1), g_logp.unsqueeze(-1))
        return grad.to(ctx.input_dtype), None


def token_logprobs_and_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """`token_logprobs` and the next-token entropy of (N, V) logits and (N,) targets, the costliest op of a small
    model's RL loss, fused (`_LogprobEntropy`)."""
    return _LogprobEntropy.apply(logits, targets)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the masked entries (0 when there are none)."""
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1)


def group_advantages(rewards: Tensor, group_size: int, scale: ScaleRewards = "group", eps: float = 1e-4) -> Tensor:
    """A_i = r_i - mean(group), divided by the group's std (GRPO), the whole batch's std, or nothing (Dr. GRPO,
    which argues the std division over-weights groups that are nearly all right or all wrong).
    Rows are grouped consecutively: rewards[g*G:(g+1)*G] are the G answers to prompt g. Stds are unbiased,
    as in TRL; a group whose rewards are all equal gets advantages of exactly zero."""
    groups = rewards.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).flatten()
    if scale == "group":
        std = groups.std(dim=1).repeat_interleave(group_size)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return centred
    else:
        raise ValueError(f"unknown reward scaling {scale!r}")
    return centred / (std + eps)


def zero_std_groups(rewards: Tensor, group_size: int) -> Tensor:
    """(n_groups,) bool: groups whose answers all got the same reward, so they carry no learning signal."""
    groups = rewards.view(-1, group_size)
    return (groups == groups[:, :1]).all(dim=1)


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: KLEstimator = "k3") -> Tensor:
    """Per-token estimate of KL(policy || reference) from tokens sampled by the policy (Schulman, 'Approximating
    KL divergence'). With r = p_ref / p_policy: k1 = -log r (unbiased, high variance, can be negative);
    k2 = (log r)^2 / 2 (biased, low variance); k3 = r - 1 - log r (unbiased, low variance, never negative)."""
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r.square()
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}")


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO's pessimistic objective, negated into a per-token loss: -min(ρA, clip(ρ, 1-ε_low, 1+ε_high)A), with
    ρ = π/π_old and A (B,) broadcast over tokens. A larger ε_high ("clip-higher", DAPO) lets unlikely tokens with
    positive advantage grow faster. Also returns where the clip bound the update: low (ρ < 1-ε_low with A < 0)
    and high (ρ > 1+ε_high with A > 0)."""
    ratio = torch.exp(logp - old_logp)
    adv = advantages.unsqueeze(1)
    loss = -torch.min(ratio * adv, ratio.clamp(1 - eps_low, 1 + eps_high) * adv)
    clipped_low = (ratio < 1 - eps_low) & (adv < 0)
    clipped_high = (ratio > 1 + eps_high) & (adv > 0)
    return loss, clipped_low, clipped_high


def aggregate(per_token: Tensor, mask: Tensor, loss_type: LossType, max_new_tokens: int) -> Tensor:
    """Reduce a per-token loss to a scalar; the choice decides how much each token weighs.
    grpo: mean over each sequence's tokens, then over sequences (a token of a short answer weighs more).
    bnpo / dapo: mean over every token of the batch (each token weighs the same). They differ only across
    processes in TRL (local vs global token count); on one process they are the same number.
    dr_grpo: sum over tokens / (max_new_tokens x sequences), a constant, so neither length nor batch
    composition rescales a token's gradient."""
    m = mask.to(per_token.dtype)
    if loss_type == "grpo":
        return ((per_token * m).sum(1) / m.sum(1).clamp(min=1)).mean()
    if loss_type in ("bnpo", "dapo"):
        return (per_token * m).sum() / m.sum().clamp(min=1)
    if loss_type == "dr_grpo":
        return (per_token * m).sum() / (per_token.size(0) * max_new_tokens)
    raise ValueError(f"unknown loss type {loss_type!r}")


def grpo_token_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    kl_estimator: KLEstimator,
    entropy: Tensor | None = None,
    entropy_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """The GRPO loss of every token, (B, T): clipped surrogate + β·KL(π || π_ref) - entropy_coef·H.

    `old_logp` None means one gradient step per rollout batch (num_iterations = 1): the old policy is the
    current one, so π_old is logp detached, ρ is exactly 1 and nothing is clipped; only its gradient remains.
    Statistics are token means over the mask; `kl_ref` always uses k3 (unbiased and non-negative, so runs with
    different loss estimators compare), and is reported even when β = 0.
    """
    old = logp.detach() if old_logp is None else old_logp
    per_token, low, high = clipped_surrogate(logp, old, advantages, eps_low, eps_high)
    stats = {
        "rl/clip_ratio_low": masked_mean(low.float(), mask).item(),
        "rl/clip_ratio_high": masked_mean(high.float(), mask).item(),
        "rl/clip_ratio_region": masked_mean((low | high).float(), mask).item(),
        "rl/kl_old": masked_mean(kl_estimate(logp.detach(), old, "k3"), mask).item(),
    }
    if ref_logp is not None:
        stats["rl/kl_ref"] = masked_mean(kl_estimate(logp.detach(), ref_logp, "k3"), mask).item()
        if beta:
            per_token = per_token + beta * kl_estimate(logp, ref_logp, kl_estimator)
    elif beta:
        raise ValueError("beta > 0 needs the reference log-probs")
    if entropy is not None:
        stats["rl/entropy"] = masked_mean(entropy.detach(), mask).item()
        if entropy_coef:
            per_token = per_token - entropy_coef * entropy
    return per_token, stats


def dpo_loss(
    chosen_logp: Tensor, rejected_logp: Tensor, ref_chosen_logp: Tensor, ref_rejected_logp: Tensor, beta: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023) on sequence log-probs (B,):
    loss = -log σ(β[(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]).
    Also returns the implicit rewards β·log(π/π_ref) of the chosen and rejected answers (detached)."""
    chosen = beta * (chosen_logp - ref_chosen_logp)
    rejected = beta * (rejected_logp - ref_rejected_logp)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()
