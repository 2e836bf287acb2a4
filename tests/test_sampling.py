"""The sampler's request knobs (openzaya/sampling.py, engine.py): logit_bias, repetition / frequency / presence
penalties against hand-computed values and a naive per-token reference, top-k alternatives and prompt log-probs
against a full forward pass, and the knobs-off path unchanged.

Run: .venv/bin/python -m pytest tests/test_sampling.py
"""

import math

import pytest
import torch

from openzaya.engine import Engine, GenParams
from openzaya.sampling import PenaltyState, adjust_logits, sample, sampling_batch
from test_engine import PROMPTS, tiny_model


def test_bias_and_penalties_hand_computed():
    """One row, vocab 5: logits [2, -1, 0.5, 3, 1]; the prompt holds token 1, the completion so far is 3, 2, 3.
    logit_bias {0: +1, 4: -2}, repetition 2, frequency 0.5, presence 0.25:
      bias:        [3, -1, 0.5, 3, -1]
      repetition:  tokens 1, 2, 3 were seen: -1 * 2 = -2, 0.5 / 2 = 0.25, 3 / 2 = 1.5 -> [3, -2, 0.25, 1.5, -1]
      freq/pres:   counts [0, 0, 1, 2, 0]: 0.25 - 0.5 - 0.25 = -0.5, 1.5 - 1.0 - 0.25 = 0.25
      result:      [3, -2, -0.5, 0.25, -1]"""
    p = GenParams(temperature=0, logit_bias={0: 1.0, 4: -2.0}, repetition_penalty=2.0, frequency_penalty=0.5,
                  presence_penalty=0.25)
    state = PenaltyState(1, 5, "cpu")
    state.reset(0, [1])
    for t in (3, 2, 3):
        state.count(0, torch.tensor([t]))
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0]])
    sb = sampling_batch([p], "cpu", 5)
    got = adjust_logits(logits, sb, state.rows(0, 1))
    assert got.tolist() == [[3.0, -2.0, -0.5, 0.25, -1.0]]
    tok, raw, slp, top = sample(logits, sb, None, state.rows(0, 1))
    assert tok.tolist() == [0] and slp.tolist() == [0.0] and top is None   # raw argmax would be token 3
    assert raw.item() == pytest.approx(torch.log_softmax(logits, -1)[0, 0].item())   # logprobs stay raw
    # sampled at temperature 1: the distribution sampled from is softmax of the adjusted logits
    p1 = GenParams(temperature=1.0, repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25,
                   logit_bias={0: 1.0, 4: -2.0})
    want = torch.softmax(torch.tensor([3.0, -2.0, -0.5, 0.25, -1.0]), -1)
    for u, t in [(0.0, 0), (float(want[0]) + 1e-4, 1), (0.9999, 4)]:
        tok, _, slp, _ = sample(logits, sampling_batch([p1], "cpu", 5), torch.tensor([u]), state.rows(0, 1))
        assert tok.item() == t and slp.item() == pytest.approx(math.log(want[t]), abs=1e-6)


def _naive_adjust(logits, prompt, completion, p: GenParams):
    """The knobs applied token by token in Python (vLLM's order: bias, repetition, frequency / presence)."""
    x = logits.tolist()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    for t in range(len(x)):
        if t in prompt or t in completion:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        c = completion.count(t)
        x[t] -= p.frequency_penalty * c + p.presence_penalty * (c > 0)
    return torch.tensor(x)


@torch.no_grad()
def _naive_greedy(model, prompt, n, p):
    ids, out = list(prompt), []
    for _ in range(n):
        logits = model(torch.tensor([ids]))[0, -1].float()
        t = int(_naive_adjust(logits, prompt, out, p).argmax())
        out.append(t)
        ids.append(t)
    return out


def test_engine_penalties_match_a_naive_reference_with_slot_moves():
    """Greedy decoding with every knob on, several requests through 2 slots (rows finish, the last row moves into
    the hole, new ones are admitted into reused slots): the tokens of a per-token Python reference, and the raw
    logprobs of a full forward pass."""
    model = tiny_model(seed=3)
    knobs = [GenParams(temperature=0, max_new_tokens=n, repetition_penalty=r, frequency_penalty=f,
                       presence_penalty=pp, logit_bias=b)
             for n, r, f, pp, b in [(9, 1.3, 0.4, 0.3, {5: 2.0}), (4, 1.0, 1.5, 0.0, None),
                                    (12, 2.0, 0.0, 0.0, {7: -3.0, 8: 1.0}), (6, 1.0, 0.0, 1.0, None),
                                    (7, 1.0, 0.0, 0.0, None)]]
    prompts = PROMPTS[:5]
    res = Engine(model, max_slots=2, max_len=32).generate(prompts, knobs)
    for p, gp, r in zip(prompts, knobs, res):
        assert r.tokens == _naive_greedy(model, p, gp.max_new_tokens, gp)
        full = torch.log_softmax(model(torch.tensor([p + r.tokens]))[0].float(), -1)
        want = [full[len(p) - 1 + i, t].item() for i, t in enumerate(r.tokens)]
        assert r.logprobs == pytest.approx(want, abs=1e-4)
    # the incremental interface (serving) gives the same tokens
    eng = Engine(model, max_slots=2, max_len=32)
    handles = [eng.submit(p, gp) for p, gp in zip(prompts, knobs)]
    got = {}
    while eng.num_running or eng.num_waiting:
        got.update({o.handle: o.result.tokens for o in eng.step() if o.result is not None})
    assert [got[h] for h in handles] == [r.tokens for r in res]


def test_knobs_off_rows_are_bit_identical_next_to_knobbed_ones():
    """In one batch of logits, rows without knobs sample exactly what they sample in a batch where no row has any
    (the knobbed row's neutral values x / 1, x * 1, x - 0 change nothing)."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50) * 3
    u = torch.rand(3)
    plain = [GenParams(temperature=0.8, top_k=10), GenParams(temperature=1.0), GenParams(temperature=0, min_p=0.1)]
    knobbed = [plain[0], GenParams(temperature=1.0, repetition_penalty=1.7, frequency_penalty=0.5,
                                   logit_bias={4: 9.0}, top_logprobs=3), plain[2]]
    state = PenaltyState(3, 50, "cpu")
    for r in range(3):
        state.reset(r, [1, 2, 3])
        state.count(r, torch.tensor([4]))
    ref = sample(logits, sampling_batch(plain, "cpu", 50), u)
    got = sample(logits, sampling_batch(knobbed, "cpu", 50), u, state.rows(0, 3))
    for a, b in zip(ref[:3], got[:3]):
        assert torch.equal(a[[0, 2]], b[[0, 2]])
    assert ref[2][1].item() != got[2][1].item()                                # the knobbed row did change
    assert torch.equal(got[3][1][:, 0], logits.argmax(-1))                     # top-1 of the raw logits


def test_presence_penalty_forbids_repeats_batch_mates_keep_their_tokens():
    model = tiny_model(seed=4)
    plain = [GenParams(temperature=t, max_new_tokens=10, seed=i) for i, t in enumerate([0, 1.0, 0.7])]
    alone = Engine(model, max_slots=4, max_len=32).generate(PROMPTS[:3], plain)
    strict = GenParams(temperature=0, max_new_tokens=10, presence_penalty=1e4, logit_bias={3: 5.0})
    mixed = Engine(model, max_slots=4, max_len=32).generate(PROMPTS[:4], plain + [strict])
    assert [r.tokens for r in mixed[:3]] == [r.tokens for r in alone]     # batch-mates of a penalised row
    for a, b in zip(mixed[:3], alone):      # other batch sizes: only the batched matmuls' rounding differs
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    assert len(set(mixed[3].tokens)) == 10                                 # never the same token twice


def test_top_logprobs_are_the_raw_distributions_top_k():
    model = tiny_model(seed=5)
    params = [GenParams(temperature=1.0, max_new_tokens=6, seed=1, top_logprobs=4, top_k=3),
              GenParams(temperature=0, max_new_tokens=5, top_logprobs=2, repetition_penalty=3.0),
              GenParams(temperature=0, max_new_tokens=5)]
    res = Engine(model, max_slots=3, max_len=32).generate(PROMPTS[:3], params)
    for p, gp, r in zip(PROMPTS, params[:2], res):
        full = torch.log_softmax(model(torch.tensor([p + r.tokens]))[0].float(), -1)
        assert len(r.top_logprobs) == len(r.tokens)
        for i, alts in enumerate(r.top_logprobs):
            vals, ids = full[len(p) - 1 + i].topk(gp.top_logprobs)
            assert [t for t, _ in alts] == ids.tolist()
            assert [lp for _, lp in alts] == pytest.approx(vals.tolist(), abs=1e-4)
            assert r.logprobs[i] <= alts[0][1] + 1e-6
    assert res[2].top_logprobs is None


def test_prompt_logprobs_score_the_prompt_and_max_new_tokens_zero():
    """prompt_logprobs = log p(prompt[t] | prompt[:t]) from a full forward, the first None; k alternatives each;
    max_new_tokens 0 returns no token; requests without it, admitted in the same call, decode as alone."""
    model = tiny_model(seed=6)
    prompts = [PROMPTS[1], PROMPTS[4], PROMPTS[3], PROMPTS[0]]
    params = [GenParams(temperature=0, max_new_tokens=0, prompt_logprobs=0),
              GenParams(temperature=0, max_new_tokens=3, prompt_logprobs=2),
              GenParams(temperature=0, max_new_tokens=5), GenParams(temperature=1.0, max_new_tokens=4, seed=2)]
    eng = Engine(model, max_slots=4, max_len=32)
    res = eng.generate(prompts, params)
    alone = Engine(model, max_slots=1, max_len=32).generate(prompts[2:], params[2:])
    assert [r.tokens for r in res[2:]] == [r.tokens for r in alone]
    assert res[2].prompt_logprobs is None
    assert (res[0].tokens, res[0].finish_reason, res[0].completion_tokens) == ([], "length", 0)
    assert res[0].prompt_top_logprobs is None and len(res[1].tokens) == 3
    for p, r in zip(prompts[:2], res[:2]):
        full = torch.log_softmax(model(torch.tensor([p]))[0].float(), -1)
        assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == len(p)
        want = [full[t - 1, p[t]].item() for t in range(1, len(p))]
        assert r.prompt_logprobs[1:] == pytest.approx(want, abs=1e-4)
    full = torch.log_softmax(model(torch.tensor([prompts[1]]))[0].float(), -1)
    assert res[1].prompt_top_logprobs[0] is None
    assert [[t for t, _ in alts] for alts in res[1].prompt_top_logprobs[1:]] == \
        [full[t].topk(2).indices.tolist() for t in range(len(prompts[1]) - 1)]
    # the incremental interface: a scoring request finishes at admission, without a token
    h = eng.submit(prompts[0], params[0])
    out = eng.step()
    assert [(o.handle, o.token) for o in out] == [(h, None)] and out[0].result.tokens == []
    assert out[0].result.prompt_logprobs[1:] == pytest.approx(res[0].prompt_logprobs[1:], abs=1e-4)


def test_bad_knob_values_are_refused_at_submit():
    eng = Engine(tiny_model(), max_slots=2, max_len=32)
    for bad in [GenParams(repetition_penalty=0.0), GenParams(frequency_penalty=float("nan")),
                GenParams(logit_bias={97: 1.0}), GenParams(logit_bias={1: float("inf")}), GenParams(top_logprobs=-1),
                GenParams(prompt_logprobs=-1), GenParams(max_new_tokens=-1)]:
        with pytest.raises(ValueError):
            eng.submit([1, 2], bad)
