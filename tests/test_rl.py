"""The RL spine's pure functions against hand-computed values, and router-replay exactness.

Run: .venv/bin/python -m pytest tests/test_rl.py -q
"""

import math
import random

import pytest
import torch

from openzaya import rl
from openzaya.engine import Engine, GenParams
from zaya_ref import random_model, tiny_config


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32), atol=tol)


# ---- group sampling

def test_group_helpers():
    assert rl.split_groups([1, 2, 3, 4, 5, 6], 3) == [[1, 2, 3], [4, 5, 6]]
    assert rl.group_sample_seeds(2, 4) == [8, 9, 10, 11]
    with pytest.raises(AssertionError):
        rl.split_groups([1, 2, 3], 2)


# ---- advantages

def test_maxrl_advantages():
    # r = [1, 0, 0, 1], mean 0.5: (1 - .5)/.5 = 1, (0 - .5)/.5 = -1
    assert close(rl.maxrl_advantages(torch.tensor([1., 0., 0., 1.])), [1., -1., -1., 1.])
    # r = [1, 0, 0, 0], mean .25: 3, -1, -1, -1
    assert close(rl.maxrl_advantages(torch.tensor([1., 0., 0., 0.])), [3., -1., -1., -1.])
    # an all-zero group contributes nothing
    assert close(rl.maxrl_advantages(torch.zeros(4)), [0., 0., 0., 0.])


def test_grpo_and_drgrpo_advantages():
    r = torch.tensor([1., 0., 0., 1.])
    # mean .5, unbiased std sqrt(4 * .25 / 3) = 0.57735
    s = math.sqrt(1 / 3)
    assert close(rl.grpo_advantages(r), [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s], 1e-4)
    assert close(rl.drgrpo_advantages(r), [0.5, -0.5, -0.5, 0.5])
    assert close(rl.drgrpo_advantages(torch.tensor([2., 4.])), [-1., 1.])
    assert close(rl.grpo_advantages(torch.tensor([3.])), [0.])
    assert close(rl.grpo_advantages(torch.ones(3)), [0., 0., 0.])


# ---- dynamic sampling

def test_dynamic_sampling_and_solve_rate():
    assert not rl.group_has_signal([1., 1., 1.])
    assert not rl.group_has_signal([0., 0.])
    assert rl.group_has_signal([0., 1.])
    assert rl.solve_rate([1., 0., 1., 1.]) == 0.75
    assert rl.keep_group([1., 0., 1., 1.], [1., 0., 1., 1.], max_solve_rate=0.75)
    assert not rl.keep_group([1., 0., 1., 1., 1.], [1., 0., 1., 1., 1.], max_solve_rate=0.75)   # 0.8 > 0.75
    assert not rl.keep_group([1., 1.], [1., 1.])


# ---- length reward (eqs. 8-10)

def test_length_reward_hand_computed():
    # G = 4, correct = [1, 1, 0, 1], p = .75; l_min = 10 (shortest correct), l_max = 110, span 100, T_l = 10
    lengths, correct = [10, 60, 30, 110], [1., 1., 0., 1.]
    got = rl.length_reward(lengths, correct, best_solve_rate=0.8, l_max=110, c=1.0)
    # l=10: <= l_min + T_l -> lambda~ .5 -> .75 * .5 = .375
    # l=60: lambda = .5 - .5 = 0 -> 0;  wrong -> 0;  l=110: lambda = .5 - 1 = -.5 -> -.375
    assert close(got, [0.375, 0.0, 0.0, -0.375])
    # gate: p must exceed p* - T_acc (0.75 > 0.9 - 0.1 is False) -> all zero
    assert rl.length_reward(lengths, correct, best_solve_rate=0.9, l_max=110) == [0.0] * 4
    # gate: p must exceed 1/G: one correct of 4 -> p = .25 > .25 False
    assert rl.length_reward(lengths, [1., 0., 0., 0.], best_solve_rate=0.0, l_max=110) == [0.0] * 4
    # c scales
    assert close(rl.length_reward(lengths, correct, 0.0, 110, c=0.5), [0.1875, 0.0, 0.0, -0.1875])


def test_length_bonus_goes_to_the_numerator_only():
    r = torch.tensor([1., 1., 0., 1.])            # mean .75
    bonus = [0.375, 0.0, 0.0, -0.375]
    adv = rl.with_length_reward(r, bonus)
    base = (r - 0.75) / 0.75
    assert close(adv, base + torch.tensor(bonus) / 0.75)
    assert close(rl.with_length_reward(r, bonus, rl.drgrpo_advantages), (r - 0.75) + torch.tensor(bonus))


# ---- LZ77 canary

def test_repetition_canary():
    rng = random.Random(0)
    words = ["alpha", "river", "stone", "cloud", "seven", "green", "north", "table", "light", "eight", "proof"]
    prose = " ".join(rng.choice(words) + str(rng.randint(0, 999)) for _ in range(400))
    assert not rl.repetition_canary(prose)
    assert min(rl.lz77_chunk_ratios(prose)) > 0.3
    looped = "the answer is 4. " * 300                     # the classic degenerate loop
    ratios = rl.lz77_chunk_ratios(looped)
    assert ratios[1] < 0.05 and rl.repetition_canary(looped)
    # ratio = compressed / raw bytes per chunk: one chunk of 1024 'a' compresses to a handful of bytes
    r = rl.lz77_chunk_ratios("a" * 1024)
    assert len(r) == 1 and r[0] < 0.02
    # a short trailing chunk is not judged; a short single text is
    assert len(rl.lz77_chunk_ratios("x" * 1100)) == 1
    assert len(rl.lz77_chunk_ratios("hello")) == 1 and rl.lz77_chunk_ratios("hello")[0] > 1


# ---- per-token losses and trust regions

def test_dppo_mask_and_loss():
    behav = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.55, 0.65, 0.38]])).requires_grad_()
    keep = rl.dppo_tv_mask(new, behav, delta=0.1)
    assert keep.tolist() == [[True, False, False]]                    # |.05| ok, |.15| and |.12| masked
    loss, keep2 = rl.dppo_loss(new, behav, torch.tensor([2.0]), delta=0.1)
    assert close(loss, [[-2.0 * 1.1, 0.0, 0.0]])                       # -A * ratio where kept
    loss.sum().backward()
    # d(-A * exp(new - behav))/d new = -A * ratio on kept tokens, exactly 0 on masked ones
    assert close(new.grad, [[-2.2, 0.0, 0.0]])


def test_ppo_clip_higher():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.1, 1.4, 0.7]]))
    loss, unclipped = rl.ppo_clip_loss(new, old, torch.tensor([1.0]), 0.2, 0.28)
    # A>0: max(-r, -clip(r)) -> -1.1, -1.28 (clipped at 1 + .28), -0.7 (r below 1 - .2 keeps -r, the larger)
    assert close(loss, [[-1.1, -1.28, -0.7]])
    assert unclipped.tolist() == [[True, False, True]]
    loss, _ = rl.ppo_clip_loss(new, old, torch.tensor([-1.0]), 0.2, 0.28)
    # A<0: max(r, clip(r)) -> 1.1, 1.4, 0.8
    assert close(loss, [[1.1, 1.4, 0.8]])


def test_tis_weights():
    w = rl.tis_weights(torch.log(torch.tensor([[0.5, 0.9]])), torch.log(torch.tensor([[0.5, 0.3]])), cap=2.0)
    assert close(w, [[1.0, 2.0]])                                    # 0.9/0.3 = 3 capped at 2


def test_aggregations():
    loss = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
    mask = torch.tensor([[1., 1., 0.], [1., 0., 0.]])
    assert close(rl.rollout_sum_mean(loss, mask), (3 + 4) / 2)        # sum within rollout, mean over rollouts
    assert close(rl.rollout_sum_mean(loss, mask, norm=2.0), (3 + 4) / 4)
    assert close(rl.token_mean(loss, mask), (1 + 2 + 4) / 3)


def test_padding_helpers():
    ids, mask = rl.pad_rollouts([[1, 2], [3]], [[7, 8, 9], [5]], pad_id=0)
    assert ids.tolist() == [[1, 2, 7, 8, 9], [3, 5, 0, 0, 0]]
    # position t predicts ids[t+1]: targets 7, 8, 9 for row 0 (positions 1..3), 5 for row 1 (position 0)
    assert mask.tolist() == [[0, 1, 1, 1], [1, 0, 0, 0]]
    lp = rl.pad_behaviour_logprobs([2, 1], [[-.1, -.2, -.3], [-.5]], ids.shape[1])
    assert close(lp, [[0, -.1, -.2, -.3], [-.5, 0, 0, 0]])
    r = rl.pad_routes([torch.tensor([[0, 1], [2, -1]]), torch.tensor([[3], [1]])], 3)
    assert r.shape == (2, 2, 3) and r[:, 1].tolist() == [[3, -1, -1], [1, -1, -1]]


# ---- boundaries, defaults and clamps (each pins behaviour a mutation run found unchecked: bench/mutation.py)

def test_advantage_boundaries():
    r64 = torch.tensor([4e-12, 0.0, 0.0, 0.0], dtype=torch.float64)          # mean exactly 1e-12: not "zero"
    assert torch.equal(rl.maxrl_advantages(r64), torch.tensor([3.0, -1.0, -1.0, -1.0], dtype=torch.float64))
    assert close(rl.grpo_advantages(torch.tensor([0.0, 1.0])), [-1 / math.sqrt(2), 1 / math.sqrt(2)], 1e-4)  # G = 2
    s = math.sqrt(1 / 3)                                                      # eps is added to the std
    assert close(rl.grpo_advantages(torch.tensor([1., 0., 0., 1.]), eps=0.5), [0.5 / (s + 0.5), -0.5 / (s + 0.5),
                                                                              -0.5 / (s + 0.5), 0.5 / (s + 0.5)])
    # the length bonus: mean exactly 1e-12 still divides; an all-zero group returns the advantages untouched
    bonus = rl.with_length_reward(r64, [0.5, 0.0, 0.0, 0.0])
    assert torch.equal(bonus, torch.tensor([3.0 + 0.5e12, -1.0, -1.0, -1.0], dtype=torch.float64))
    assert torch.equal(rl.with_length_reward(torch.zeros(4), [0.1, 0.0, 0.0, 0.0]), torch.zeros(4))
    exact = rl.with_length_reward(torch.tensor([1.0, 0.0], dtype=torch.float64), [0.1, 0.0])   # bonus in the dtype
    assert exact.dtype == torch.float64 and exact[0].item() == 1.0 + 0.1 / 0.5


def test_dynamic_sampling_boundaries():
    assert not rl.group_has_signal([])                                       # an empty group: no signal, no error
    assert not rl.group_has_signal([0.0, 1e-9]) and rl.group_has_signal([0.0, 2e-9])
    assert rl.solve_rate([1.0]) == 1.0 and rl.solve_rate([]) == 0.0
    assert rl.keep_group([0.0, 1.0], [1.0, 1.0])                             # default max_solve_rate 1.0 keeps 100%
    assert rl.keep_group([0.0, 1.0, 1.0, 1.0], [0.0, 1.0, 1.0, 1.0], 0.75)    # exactly at the warmup limit
    assert not rl.keep_group([0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0], 0.75)


def test_length_reward_boundaries():
    # default c = 1: p = 0.5, the shortest correct gets c * p * 0.5
    assert rl.length_reward([10, 20, 30, 40], [1, 1, 0, 0], 0.0, 40) == pytest.approx([0.25, 0.5 * (0.5 - 10 / 30), 0, 0])
    # p must be strictly above p* - T_acc (0.75 - 0.25 = 0.5 exactly) and above 1/G
    assert rl.length_reward([10, 20, 30, 40], [1, 1, 0, 0], 0.75, 40, t_acc=0.25) == [0.0] * 4
    assert rl.length_reward([10, 20, 30, 40], [1, 1, 0, 0], 0.0, 40, c=1.0) != [0.0] * 4
    eight = [10, 20, 30, 40, 50, 60, 70, 80]
    assert rl.length_reward(eight, [1, 1, 0, 0, 0, 0, 0, 0], 0.0, 80) == pytest.approx([0.125, 0.25 * (0.5 - 10 / 70)]
                                                                                     + [0.0] * 6)   # p = 2/G > 1/G
    assert rl.length_reward(eight, [1, 0, 0, 0, 0, 0, 0, 0], 0.0, 80) == [0.0] * 8                 # p = 1/G
    # l_min + T_l exactly (span 10, T_l 1.0) still counts as short; one token more does not
    assert rl.length_reward([10, 11, 12], [1, 1, 1], 0.0, 20) == pytest.approx([0.5, 0.5, 0.5 - 0.2])
    # span at least 1 token; lengths beyond l_max clamp at lambda = -1/2
    assert rl.length_reward([10, 11], [1, 1], 0.0, 11) == pytest.approx([0.5, -0.5])
    assert rl.length_reward([10, 40], [1, 1], 0.0, 20) == pytest.approx([0.5, -0.5])


def _lz77_oracle(text: str, chunk: int = 1024) -> list[float]:
    """The canary's documented measurement, written out: one raw-deflate stream (level 1, 1 KB window), a sync flush
    per chunk, compressed bytes / raw bytes; a short trailing chunk (< chunk // 2) is not judged."""
    import zlib
    raw, comp, out = text.encode(), zlib.compressobj(1, zlib.DEFLATED, -10), []
    for i in range(0, len(raw), chunk):
        piece = raw[i:i + chunk]
        n = len(comp.compress(piece)) + len(comp.flush(zlib.Z_SYNC_FLUSH))
        if len(piece) >= chunk // 2 or i == 0:
            out.append(n / len(piece))
    return out


def test_lz77_ratios_follow_the_documented_parameters():
    rng = random.Random(3)
    words = [''.join(rng.choice("abcdefghij") for _ in range(rng.randint(2, 7))) for _ in range(60)]
    prose = " ".join(rng.choice(words) for _ in range(700))
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1536))
    far_repeat = noise[:1024] + noise[1024:1536] + noise[:512]      # the repeat sits 1.5 KB back: outside the window
    for text in (prose, far_repeat, prose[:1536], prose[:1535]):
        assert rl.lz77_chunk_ratios(text) == _lz77_oracle(text), len(text)
    assert len(rl.lz77_chunk_ratios(prose[:1536])) == 2 and len(rl.lz77_chunk_ratios(prose[:1535])) == 1
    assert len(rl.lz77_chunk_ratios(prose[:1537], 1025)) == 2                # 512 = 1025 // 2 is judged
    assert len(rl.lz77_chunk_ratios(prose[:1400])) == 1                      # 376 < 512 is not
    assert rl.lz77_chunk_ratios(far_repeat)[1] > 0.6    # 1 KB window: no match 1.5 KB back (a 2 KB one gives 0.36)


def test_canary_threshold_and_chunking():
    rng = random.Random(4)
    noise = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(1024))
    text = noise + "a" * 512                                                  # a looping 512-byte tail
    assert rl.repetition_canary(text)                                         # judged at the default 1024
    assert not rl.repetition_canary(text, chunk_bytes=2048)                   # one mixed chunk
    r = rl.lz77_chunk_ratios(noise)[0]
    assert not rl.repetition_canary(noise, threshold=r) and rl.repetition_canary(noise, threshold=r + 1e-9)


def test_trust_region_defaults_boundaries_and_clamps():
    one, half = torch.tensor([[0.0]]), torch.log(torch.tensor([[0.5]]))       # p = 1 and 0.5 exactly: |dp| = 0.5
    assert not rl.dppo_tv_mask(one, half)[0, 0]                               # default delta 0.1
    assert rl.dppo_tv_mask(one, half, 0.5)[0, 0]                              # |dp| = delta is inside
    loss, keep = rl.dppo_loss(one, half, torch.tensor([1.0]), delta=0.6)
    assert keep[0, 0] and close(loss, [[-2.0]])                               # ratio 1 / 0.5
    assert not rl.dppo_loss(one, half, torch.tensor([1.0]))[1][0, 0]          # default delta 0.1
    far = torch.tensor([[0.0, -30.0]]), torch.tensor([[-30.0, 0.0]])          # log-ratios +30, -30: clamped to 20
    loss, _ = rl.dppo_loss(*far, torch.tensor([1.0]), delta=2.0)
    torch.testing.assert_close(loss, -torch.tensor([[math.exp(20), math.exp(-20)]]), rtol=1e-5, atol=0)
    loss, _ = rl.ppo_clip_loss(*far, torch.tensor([-1.0]))                    # A < 0: the unclipped large ratio wins
    torch.testing.assert_close(loss[0, 0], torch.tensor(math.exp(20)), rtol=1e-5, atol=0)
    loss, _ = rl.ppo_clip_loss(*far, torch.tensor([1.0]))                     # A > 0: -A r for the tiny ratio
    torch.testing.assert_close(loss[0, 1], torch.tensor(-math.exp(-20)), rtol=1e-5, atol=0)
    new, old = torch.log(torch.tensor([[0.3, 0.9]])), torch.log(torch.tensor([[0.2, 0.6]]))   # ratios 1.5, 1.5
    loss, _ = rl.ppo_clip_loss(new, old, torch.tensor([1.0]))                 # default clip 0.2 / 0.2: 1.5 -> 1.2
    assert close(loss, [[-1.2, -1.2]])
    loss, _ = rl.ppo_clip_loss(old, new, torch.tensor([-1.0]))                # ratio 2/3 -> 0.8 with A < 0
    assert close(loss, [[0.8, 0.8]])
    w = rl.tis_weights(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]))   # default cap 2: e -> 2
    assert close(w, [[2.0, 1.0]])
    w = rl.tis_weights(*far, cap=1e10)                                        # the log-ratio clamp holds under the cap
    torch.testing.assert_close(w, torch.tensor([[math.exp(20), math.exp(-20)]]), rtol=1e-5, atol=0)


def test_token_mean_of_one_token_and_single_route():
    assert close(rl.token_mean(torch.tensor([[3.0, 5.0]]), torch.tensor([[1.0, 0.0]])), 3.0)
    routes = rl.pad_routes([torch.tensor([[1, 2], [0, -1]])], 3)              # one rollout, two layers
    assert torch.equal(routes, torch.tensor([[[1, 2, -1]], [[0, -1, -1]]]))


# ---- router replay (R3)

def test_router_replay_reproduces_behaviour_logprobs():
    """The engine's rollout (cached prefill + decode) records routes and logprobs; the training forward over the
    whole sequence with those routes replayed gives the same logprobs and the same routing, weights unchanged."""
    torch.manual_seed(0)
    cfg = tiny_config()
    model = random_model(cfg, seed=3, noise=0.3)
    eng = Engine(model, max_slots=4, max_len=64)
    prompts = [[5, 9, 11, 3], [7, 2], [1, 2, 3, 4, 5, 6]]
    res = eng.generate(prompts, GenParams(temperature=1.0, max_new_tokens=12, eos_ids=[], seed=1), return_routes=True)
    comps = [r.tokens for r in res]
    ids, mask = rl.pad_rollouts(prompts, comps, pad_id=0)
    replay = rl.pad_routes([r.routes for r in res], ids.shape[1])
    with torch.no_grad():   # the trainer's call (chunked LM head), then the routes actually taken
        lp = model.token_logprobs(ids, ids[:, 1:], replay_routes=replay)
        _, routes = model(ids, replay_routes=replay, return_routes=True)
    behav = rl.pad_behaviour_logprobs([len(p) for p in prompts], [r.logprobs for r in res], ids.shape[1])
    assert (mask.sum(1) == torch.tensor([len(c) for c in comps], dtype=torch.float32)).all()
    assert torch.allclose(lp * mask, behav * mask, atol=1e-5), (lp * mask - behav * mask).abs().max()
    for b, r in enumerate(res):           # every fed position was routed as recorded (all experts appear)
        n = r.routes.shape[1] - 1
        assert torch.equal(routes[:, b, :n], r.routes[:, :n])
    assert set(torch.cat([r.routes.flatten() for r in res]).tolist()) >= {0, 1, 2, 3}
    # ratio pi_theta / pi_behaviour is exactly 1 up to float rounding, so nothing is masked by the TV region
    _, keep = rl.dppo_loss(lp, behav, torch.ones(len(res)), 0.1)
    assert bool(keep[mask.bool()].all())
