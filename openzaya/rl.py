"""The ZAYA1 RL spine as small pure functions: group sampling, advantages, trust regions, loss aggregation, dynamic
sampling, the length reward, the LZ77 repetition canary and router-replay plumbing, server-returned routes included
(TR §IV-B/D/E, Table IV; spec training-recipe.md §2, §4, §5, §6). The loop that uses them is `rl_loop.py`.

One function per algorithm (house style): the loop picks functions, no `loss_type` string switch in here.

Defaults follow the ZAYA1 spine: MaxRL advantages, DPPO binary-TV masking (delta 0.1), sum within a rollout then
mean over rollouts, no KL, dynamic sampling, G = 16. Options: GRPO (std-normalised) and Dr-GRPO (mean-only)
advantages, PPO ratio clipping with clip-higher (0.2 / 0.28), truncated importance weights (TIS) for the
sampler/trainer mismatch, token-mean aggregation.

Our readings where the report is silent (each also noted at the function):
- DPPO "Binary-TV": the total-variation distance on the binary event {sampled token, anything else}, which is
  |pi_theta(y_t) - pi_behaviour(y_t)|; a token over delta gets no gradient; within the region the surrogate is
  the importance-weighted policy gradient ratio * A (the ratio's gradient is ratio * grad log pi).
- Length reward: l_min = the shortest correct response in the group, l_max = the response budget, T_l = 10% of
  (l_max - l_min), T_acc = 0.1 (all unpublished).
- Routes from vLLM: it reports a skip-class token as expert 0 (weight 0) and returns only ids, so its 0 is "expert 0
  or skip" (model.ZERO_OR_SKIP) and the trainer's router, replaying every other choice, picks the one of the two it
  scores higher; with the routing upstream replayed, that is the server's own choice up to float rounding.
- LZ77 canary: chunk = 1024 raw bytes (unpublished), ratio = compressed bytes / raw bytes of the chunk, one
  compressor across chunks (so repetition of earlier chunks within the 1 KB window also compresses); a trailing
  chunk shorter than half a chunk is not judged (its flush overhead and size make the ratio meaningless).

Shape legend: G samples per group (prompt), B rollouts in a batch, T tokens (padded), V vocab, L layers.
"""

from __future__ import annotations

import zlib

import torch

from .model import ZERO_OR_SKIP

# -----------------------------------------------------------------------------
# Group sampling


def split_groups(values: list, group_size: int) -> list[list]:
    """Per-sample values of n groups, members adjacent: a flat list of n*G -> n lists of G."""
    assert len(values) % group_size == 0, f"{len(values)} values do not split into groups of {group_size}"
    return [values[i:i + group_size] for i in range(0, len(values), group_size)]


def group_sample_seeds(base_seed: int, group_size: int) -> list[int]:
    """Seeds of the G samples of one prompt (distinct, reproducible)."""
    return [base_seed * group_size + i for i in range(group_size)]


# -----------------------------------------------------------------------------
# Advantages, one function each; rewards_G -> advantages_G


def maxrl_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """MaxRL (ZAYA1 default): (r_i - mean r) / mean r. A group with mean 0 gives all zeros (no signal)."""
    mean = rewards.mean()
    if mean.abs() < 1e-12:
        return torch.zeros_like(rewards)
    return (rewards - mean) / mean


def grpo_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: (r_i - mean r) / (std r + eps), unbiased std as verl; a group of one gets 0 (mean itself)."""
    if rewards.numel() < 2:
        return torch.zeros_like(rewards)
    return (rewards - rewards.mean()) / (rewards.std(unbiased=True) + eps)


def drgrpo_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Dr-GRPO: r_i - mean r (no std scaling, which would add a question-difficulty bias)."""
    return rewards - rewards.mean()


# -----------------------------------------------------------------------------
# Dynamic sampling and group statistics


def group_has_signal(rewards: list[float]) -> bool:
    """DAPO dynamic sampling: a group whose rewards are all equal carries no gradient and is dropped."""
    return len(rewards) > 0 and max(rewards) - min(rewards) > 1e-9


def solve_rate(accuracies: list[float]) -> float:
    """Fraction of a group's samples that are correct (the group's p in eqs. 8-10)."""
    return sum(accuracies) / max(len(accuracies), 1)


def keep_group(rewards: list[float], accuracies: list[float], max_solve_rate: float = 1.0) -> bool:
    """Dynamic sampling plus the warmup filter: drop zero-variance groups and groups solved more often than
    `max_solve_rate` (warmup keeps problems the model solves at most 75% of the time)."""
    return group_has_signal(rewards) and solve_rate(accuracies) <= max_solve_rate + 1e-9


# -----------------------------------------------------------------------------
# Length reward (TR eqs. 8-10) and the LZ77 repetition canary (TR §IV-E)


def length_reward(lengths: list[int], correct: list[float], best_solve_rate: float, l_max: int, c: float = 1.0,
                  t_len_frac: float = 0.1, t_acc: float = 0.1) -> list[float]:
    """Delta r_i = c * p * m_i * lambda~_i, added to the advantage numerator only (eqs. 8-10).

    lambda_i = 1/2 - clamp((l_i - l_min) / (l_max - l_min), 0, 1); lambda~_i = 1/2 when l_i <= l_min + T_l;
    m_i = 1[p > p* - T_acc] * 1[p > 1/G] * 1[r_i = 1]; p = the group's solve rate, p* = the running best solve
    rate of this data source (the caller keeps it). Our choices (unpublished): l_min = the shortest correct
    length in the group, T_l = t_len_frac * (l_max - l_min), T_acc = t_acc.
    """
    G = len(lengths)
    p = solve_rate(correct)
    ok_lengths = [l for l, r in zip(lengths, correct) if r == 1]
    if not ok_lengths or not (p > best_solve_rate - t_acc and p > 1.0 / G):
        return [0.0] * G
    l_min = min(ok_lengths)
    span = max(l_max - l_min, 1)
    out = []
    for l, r in zip(lengths, correct):
        if r != 1:
            out.append(0.0)
            continue
        lam = 0.5 - min(max((l - l_min) / span, 0.0), 1.0)
        if l <= l_min + t_len_frac * span:
            lam = 0.5
        out.append(c * p * lam)
    return out


def with_length_reward(rewards: torch.Tensor, bonus: list[float], advantage_fn=maxrl_advantages) -> torch.Tensor:
    """Advantages with Delta r added to the numerator only: A_i = adv(r)_i + Delta r_i / mean r (MaxRL; the
    denominator uses raw rewards). For other advantage functions the bonus is added unscaled."""
    adv = advantage_fn(rewards)
    b = torch.tensor(bonus, dtype=rewards.dtype)
    if advantage_fn is maxrl_advantages:
        mean = rewards.mean()
        return adv if mean.abs() < 1e-12 else adv + b / mean
    return adv + b


def lz77_chunk_ratios(text: str, chunk_bytes: int = 1024) -> list[float]:
    """Compressed / raw bytes per chunk with one zlib stream (window bits -10 = raw deflate, 1 KB window,
    level 1), Z_SYNC_FLUSH after each chunk. Chunks shorter than chunk_bytes / 2 at the end are not judged,
    unless the text is a single chunk."""
    raw = text.encode("utf-8")
    comp = zlib.compressobj(1, zlib.DEFLATED, -10)
    ratios = []
    for i in range(0, len(raw), chunk_bytes):
        chunk = raw[i:i + chunk_bytes]
        n = len(comp.compress(chunk)) + len(comp.flush(zlib.Z_SYNC_FLUSH))
        if len(chunk) >= chunk_bytes // 2 or i == 0:
            ratios.append(n / len(chunk))
    return ratios


def repetition_canary(text: str, threshold: float = 0.05, chunk_bytes: int = 1024) -> bool:
    """True when the text trips the canary (some chunk compresses below `threshold`): its reward is set to 0."""
    return any(r < threshold for r in lz77_chunk_ratios(text, chunk_bytes))


# -----------------------------------------------------------------------------
# Trust regions on per-token log-probabilities (model.token_logprobs); all [B, T] tensors, mask_BT = completion tokens


def dppo_tv_mask(logp_BT: torch.Tensor, behav_logp_BT: torch.Tensor, delta: float = 0.1) -> torch.Tensor:
    """DPPO binary-TV trust region: keep tokens with |pi_theta(y_t) - pi_behaviour(y_t)| <= delta (our reading of
    Qi et al.'s Binary-TV estimator, spec §2: unverified)."""
    return (logp_BT.detach().exp() - behav_logp_BT.exp()).abs() <= delta


def dppo_loss(logp_BT, behav_logp_BT, adv_B, delta: float = 0.1):
    """Per-token loss -A * ratio on tokens inside the TV region, 0 (no gradient) outside. Returns (loss_BT, keep_BT).
    ratio = pi_theta / pi_behaviour; its gradient is ratio * grad log pi_theta (importance-weighted PG)."""
    keep_BT = dppo_tv_mask(logp_BT, behav_logp_BT, delta)
    ratio_BT = torch.exp((logp_BT - behav_logp_BT).clamp(-20, 20))
    return -adv_B[:, None] * ratio_BT * keep_BT, keep_BT


def ppo_clip_loss(logp_BT, old_logp_BT, adv_B, eps_low: float = 0.2, eps_high: float = 0.2):
    """PPO clipped surrogate max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); clip-higher = eps_high 0.28 (DAPO).
    Returns (loss_BT, unclipped_BT), the second marking tokens whose gradient is not clipped away."""
    ratio_BT = torch.exp((logp_BT - old_logp_BT).clamp(-20, 20))
    a = adv_B[:, None]
    l1, l2 = -a * ratio_BT, -a * ratio_BT.clamp(1 - eps_low, 1 + eps_high)
    return torch.maximum(l1, l2), (l1 >= l2)


def pg_loss(logp_BT, behav_logp_BT, adv_B):
    """No trust region: the plain policy gradient -A * log pi on every token. Returns (loss_BT, keep_BT)."""
    return -adv_B[:, None] * logp_BT, torch.ones_like(logp_BT, dtype=torch.bool)


def decoupled_tis_loss(logp_BT, behav_logp_BT, adv_B, region, cap: float = 2.0):
    """Decoupled trust region with truncated importance sampling: `region` (dppo_loss, ppo_clip_loss, pg_loss) is
    anchored at the trainer's own logprobs, and TIS weights min(pi_trainer / pi_sampler, cap) correct for the
    sampler/trainer mismatch. Returns (loss_BT, keep_BT)."""
    loss_BT, keep_BT = region(logp_BT, logp_BT.detach(), adv_B)
    return loss_BT * tis_weights(logp_BT, behav_logp_BT, cap), keep_BT


def tis_weights(old_logp_BT: torch.Tensor, behav_logp_BT: torch.Tensor, cap: float = 2.0) -> torch.Tensor:
    """Truncated importance weights min(pi_old_trainer / pi_sampler, C) for the sampler/trainer mismatch (no grad)."""
    return torch.exp((old_logp_BT - behav_logp_BT).clamp(-20, 20)).clamp(max=cap).detach()


# -----------------------------------------------------------------------------
# Loss aggregation: loss_BT, mask_BT -> scalar


def rollout_sum_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor, norm: float = 1.0) -> torch.Tensor:
    """ZAYA1 / Dr-GRPO SMTSN: sum of token losses within each rollout (divided by a constant `norm`), mean over
    rollouts. With norm = 1 this is the TR's "sum within rollout, mean over rollouts"."""
    return ((loss_BT * mask_BT).sum(1) / norm).mean()


def token_mean(loss_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """DAPO token-mean: sum over all completion tokens of the batch / their count."""
    return (loss_BT * mask_BT).sum() / mask_BT.sum().clamp_min(1)


# -----------------------------------------------------------------------------
# Batching rollouts for the trainer, with router replay


def pad_rollouts(prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Right-padded ids_BT = prompt + completion and the completion mask over *targets*: position t predicts
    ids[t+1], so comp_mask_BT[b, t] = 1 when ids[b, t+1] is a completion token. Shapes [B, T], [B, T-1]."""
    T = max(len(p) + len(c) for p, c in zip(prompts, completions))
    ids_BT = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask_BT = torch.zeros(len(prompts), T - 1)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        ids_BT[b, :len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        mask_BT[b, len(p) - 1:len(p) + len(c) - 1] = 1.0
    return ids_BT, mask_BT


def pad_behaviour_logprobs(prompt_lens: list[int], logprobs: list[list[float]], T: int) -> torch.Tensor:
    """Behaviour logprobs placed on the target grid of pad_rollouts: [B, T-1], 0 outside completions."""
    out = torch.zeros(len(logprobs), T - 1)
    for b, (n, lp) in enumerate(zip(prompt_lens, logprobs)):
        out[b, n - 1:n - 1 + len(lp)] = torch.tensor(lp, dtype=torch.float32)
    return out


def pad_routes(routes: list[torch.Tensor], T: int) -> torch.Tensor:
    """Per-rollout routes [L, T_b] (engine GenResult.routes, aligned with prompt + completion) -> replay tensor
    [L, B, T] padded with -1 (the "no expert" sentinel, never expert 0)."""
    L = routes[0].shape[0]
    out = torch.full((L, len(routes), T), -1, dtype=torch.long)
    for b, r in enumerate(routes):
        out[:, b, :r.shape[1]] = r
    return out


def routes_from_server(routed, n_tokens: int, skip_as_zero: bool) -> torch.Tensor:
    """A server's routed experts, JSON [n_pos][L][1] (vLLM's `routed_experts` shape; openzaya serve returns the same),
    as replay routes [L, n_tokens] aligned with prompt + completion (pad_routes' input). Positions the server did not
    report (the last sampled token is never fed) are -1. Skip class: openzaya serve reports -1; vLLM reports expert 0
    (weight 0, ids only), so with skip_as_zero every 0 becomes ZERO_OR_SKIP and the trainer's router picks between
    expert 0 and the skip class (model.Router)."""
    r_NL1 = torch.tensor(routed, dtype=torch.long)
    if r_NL1.dim() != 3 or r_NL1.shape[2] != 1 or r_NL1.shape[0] > n_tokens:
        raise ValueError(f"routed experts of shape {tuple(r_NL1.shape)} do not fit {n_tokens} tokens x layers x top-1")
    out_LT = torch.full((r_NL1.shape[1], n_tokens), -1, dtype=torch.long)
    out_LT[:, :r_NL1.shape[0]] = r_NL1[:, :, 0].T
    if skip_as_zero:
        out_LT = torch.where(out_LT == 0, ZERO_OR_SKIP, out_LT)
    return out_LT


def logprob_mismatch(logp_BT: torch.Tensor, behav_logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> tuple[float, float]:
    """(sum, max) of |trainer logprob - sampler logprob| over the completion tokens (prime-rl and verl log the mean
    and max per step; the caller divides the sum by its token count)."""
    diff_BT = (logp_BT.detach() - behav_logp_BT).abs() * mask_BT
    return float(diff_BT.sum()), float(diff_BT.max()) if diff_BT.numel() else 0.0
