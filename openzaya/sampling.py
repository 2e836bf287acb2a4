"""The engine's sampler (engine.py): one token per row from a batch's last-position logits, with the request knobs
OpenAI and vLLM define, plus the log-probabilities a server reports.

One step, in vLLM's v1 sampler order (vllm/v1/sample/sampler.py: raw logprobs, logits processors with logit_bias,
penalties, then temperature and the filters):
1. Raw logprobs: log_softmax of the model's logits at temperature 1. `GenResult.logprobs` and the top-k
   alternatives (`top_logprobs`) are taken here, whatever the knobs below do (vLLM's default `raw_logprobs` mode;
   RL needs these for importance ratios).
2. logit_bias (OpenAI): `bias[token]` is added to that token's logit.
3. Penalties. Repetition (vLLM, Hugging Face; CTRL, Keskar et al. 2019): every token that occurs in the prompt or in
   the completion so far has its logit divided by r when positive, multiplied by r otherwise. Then frequency and
   presence (OpenAI's definition): logit -= f * c + p * (c > 0), c = the token's count in the completion so far (the
   prompt is not counted).
4. Temperature 0: argmax of the adjusted logits. Otherwise softmax(adjusted / T), min-p (drop tokens below min_p x the
   top probability), top-k, top-p (the smallest prefix of the sorted distribution reaching mass top_p), then
   inverse-CDF sampling with one uniform per row drawn from that request's own generator.
The sampled token's `sampling_logprob` is its log-probability under the distribution of step 4 (0 when greedy).

What is off costs nothing: a batch where no row sets a bias or a penalty skips steps 2-3 (the logits reach step 4
untouched, so outputs are bit-identical to a sampler without them), and the top-k alternatives are computed only
when a row asks for them. Penalties need each slot's completion counts and seen tokens: `PenaltyState`, allocated
by the engine at the first request that sets one. A row with neutral values (r = 1, f = p = 0, no bias) in a batch
with others that set them goes through steps 2-3 unchanged: x / 1, x * 1 and x - 0 are exact.

`prompt_logprobs` scores a prompt's own tokens (the log-likelihood a server returns with `echo`), chunked over
positions so the [T, V] logits never exist at once.

Shape legend: B rows, V vocab, K alternatives per row, N (row, token) pairs of all logit biases, T positions, D hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class SamplingBatch:
    """The sampling settings of a batch's rows as tensors, built when the rows change (not every step)."""
    temp_B: torch.Tensor
    top_k_B: torch.Tensor
    top_p_B: torch.Tensor
    min_p_B: torch.Tensor
    greedy_only: bool
    use_min_p: bool                   # any row with min_p > 0
    use_sort: bool                    # any row with top-k or top-p
    top_logprobs: int = 0             # alternatives computed per row: the most any row asks for (0 = none)
    bias: tuple | None = None         # (row_N, token_N, value_N): every row's logit_bias; None when no row has one
    penalties: tuple | None = None    # (repetition_B, frequency_B, presence_B); None when no row sets one


def uses_penalties(p) -> bool:
    return p.repetition_penalty != 1 or p.frequency_penalty != 0 or p.presence_penalty != 0


def sampling_batch(params: list, device, vocab_size: int) -> SamplingBatch:
    """A `SamplingBatch` of the rows' `GenParams` (engine.py)."""
    def col(name, dtype=None):
        return torch.tensor([getattr(p, name) for p in params], dtype=dtype, device=device)

    sb = SamplingBatch(col("temperature"), col("top_k", torch.long), col("top_p"), col("min_p"),
                       greedy_only=all(p.temperature == 0 for p in params),
                       use_min_p=any(p.min_p > 0 for p in params),
                       use_sort=any(p.top_k > 0 or p.top_p < 1 for p in params),
                       top_logprobs=min(max(p.top_logprobs for p in params), vocab_size))
    if any(p.logit_bias for p in params):
        pairs = [(r, t, v) for r, p in enumerate(params) for t, v in (p.logit_bias or {}).items()]
        row_N, token_N, value_N = zip(*pairs)
        sb.bias = (torch.tensor(row_N, device=device), torch.tensor(token_N, device=device),
                   torch.tensor(value_N, dtype=torch.float32, device=device))
    if any(uses_penalties(p) for p in params):
        sb.penalties = (col("repetition_penalty"), col("frequency_penalty"), col("presence_penalty"))
    return sb


class PenaltyState:
    """Per cache slot: how often each token occurs in the completion so far (counts_SV) and which tokens occur in
    the prompt or the completion (seen_SV). [S, V] each: 20 MB for 16 slots at a 262K vocabulary, allocated only
    once a penalty is used."""

    def __init__(self, slots: int, vocab_size: int, device):
        self.counts_SV = torch.zeros(slots, vocab_size, device=device)
        self.seen_SV = torch.zeros(slots, vocab_size, dtype=torch.bool, device=device)

    def reset(self, slot: int, prompt: list[int]):
        self.counts_SV[slot] = 0
        self.seen_SV[slot] = False
        self.seen_SV[slot, torch.tensor(prompt, device=self.seen_SV.device)] = True

    def move(self, src: int, dst: int):
        self.counts_SV[dst] = self.counts_SV[src]
        self.seen_SV[dst] = self.seen_SV[src]

    def count(self, a: int, tok_B):
        """Rows a, a+1, ... produced tok_B."""
        b = a + tok_B.shape[0]
        self.counts_SV[a:b].scatter_add_(1, tok_B[:, None], torch.ones(tok_B.shape[0], 1, device=tok_B.device))
        self.seen_SV[a:b].scatter_(1, tok_B[:, None], True)

    def rows(self, a: int, b: int) -> tuple:
        return self.counts_SV[a:b], self.seen_SV[a:b]


def adjust_logits(logits_BV, sb: SamplingBatch, history: tuple | None):
    """Steps 2-3: logit_bias, then the penalties. `history` = (counts_BV, seen_BV) of the rows (for penalties).
    Penalties touch only the tokens a row has seen (N pairs, a few thousand at most against B x V), so they are
    computed on those alone: one pass over seen_BV to find them, then gather, adjust, scatter."""
    x_BV = logits_BV.clone()
    if sb.bias is not None:
        row_N, token_N, value_N = sb.bias
        x_BV.index_put_((row_N, token_N), value_N, accumulate=True)
    if sb.penalties is not None:
        rep_B, freq_B, pres_B = sb.penalties
        counts_BV, seen_BV = history
        row_N, token_N = seen_BV.nonzero(as_tuple=True)
        x_N, c_N = x_BV[row_N, token_N], counts_BV[row_N, token_N]
        rep_N = rep_B[row_N]
        x_N = torch.where(x_N > 0, x_N / rep_N, x_N * rep_N)
        x_BV[row_N, token_N] = x_N - freq_B[row_N] * c_N - pres_B[row_N] * (c_N > 0)
    return x_BV


def sample(logits_BV, sb: SamplingBatch, u_B, history: tuple | None = None):
    """Sample one token per row. Returns (tokens [B], raw logprob at T=1 [B], logprob under the sampled distribution
    [B], top) with top = (logprobs [B, K], tokens [B, K]) of the K most likely tokens by raw logprob, or None when no
    row asked. `u_B` are uniforms in [0, 1) (None for an all-greedy batch); `history` as in `adjust_logits`."""
    logits_BV = logits_BV.float()
    logp_BV = torch.log_softmax(logits_BV, dim=-1)
    top = logp_BV.topk(sb.top_logprobs, dim=-1) if sb.top_logprobs else None
    if sb.bias is not None or sb.penalties is not None:
        logits_BV = adjust_logits(logits_BV, sb, history)
    greedy_B = logits_BV.argmax(dim=-1)
    if sb.greedy_only:
        raw_B = logp_BV.gather(1, greedy_B[:, None])[:, 0]
        return greedy_B, raw_B, torch.zeros_like(raw_B), top
    temp_B = sb.temp_B
    probs_BV = torch.softmax(logits_BV / temp_B.clamp_min(1e-6)[:, None], dim=-1)
    if sb.use_min_p:
        floor_B1 = sb.min_p_B[:, None] * probs_BV.amax(dim=-1, keepdim=True)
        probs_BV = probs_BV.masked_fill(probs_BV < floor_B1, 0.0)
    if sb.use_sort:
        probs_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
        V = probs_BV.shape[-1]
        k_B = torch.where(sb.top_k_B > 0, sb.top_k_B, V)
        keep_BV = torch.arange(V, device=probs_BV.device)[None] < k_B[:, None]
        probs_BV = probs_BV * keep_BV
        cum_BV = probs_BV.cumsum(dim=-1)
        mass_before_BV = cum_BV - probs_BV                        # keeps the first token always
        probs_BV = probs_BV * (mass_before_BV < sb.top_p_B[:, None] * cum_BV[:, -1:])
    cdf_BV = probs_BV.cumsum(dim=-1)
    total_B1 = cdf_BV[:, -1:]
    idx_B = torch.searchsorted(cdf_BV, u_B[:, None] * total_B1, right=True)[:, 0].clamp_max(cdf_BV.shape[-1] - 1)
    sampled_lp_B = (probs_BV.gather(1, idx_B[:, None]) / total_B1).log()[:, 0]
    sampled_B = order_BV.gather(1, idx_B[:, None])[:, 0] if sb.use_sort else idx_B
    is_greedy_B = temp_B <= 0
    tok_B = torch.where(is_greedy_B, greedy_B, sampled_B)
    raw_B = logp_BV.gather(1, tok_B[:, None])[:, 0]
    return tok_B, raw_B, torch.where(is_greedy_B, 0.0, sampled_lp_B), top


def prompt_logprobs(x_TD, w_VD, target_T, k: int, max_chunk_logits: int = 2**24):
    """For hidden states x_TD (final norm applied) and the next token at each position: (log p(target_t) [T] as a
    list, the k most likely (token, logprob) pairs per position as a list of lists, or None when k = 0). Logits as
    the model's forward makes them (x W^T in the weights' dtype, then fp32), a chunk of positions at a time."""
    V = w_VD.shape[0]
    chunk = max(1, max_chunk_logits // V)
    lps, tops = [], []
    for i in range(0, x_TD.shape[0], chunk):
        logp_tV = torch.log_softmax(F.linear(x_TD[i:i + chunk], w_VD).float(), dim=-1)
        lps += logp_tV.gather(1, target_T[i:i + chunk, None])[:, 0].tolist()
        if k:
            vals_tK, ids_tK = logp_tV.topk(min(k, V), dim=-1)
            tops += [list(zip(ids, vals)) for ids, vals in zip(ids_tK.tolist(), vals_tK.tolist())]
    return lps, (tops if k else None)
