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


def test_sampling_batch_fields_by_hand():
    """The batch tensors and flags of three rows' settings, by hand: the flags say exactly when a filter, the bias
    or the penalties are needed (off costs nothing), top_logprobs is the most any row asks, capped at the vocabulary,
    and integer bias values (what JSON gives) become float32 like the logits they are added to."""
    rows = [GenParams(temperature=0.5, top_k=3, min_p=0.25, logit_bias={4: 2, 1: -1.5}, top_logprobs=2),
            GenParams(temperature=0, top_p=0.75, frequency_penalty=0.5, top_logprobs=9),
            GenParams(temperature=1.0, presence_penalty=-0.25, repetition_penalty=1.5, logit_bias={0: 3})]
    sb = sampling_batch(rows, "cpu", 6)
    assert sb.temp_B.tolist() == [0.5, 0.0, 1.0] and sb.temp_B.dtype == torch.float32
    assert sb.top_k_B.tolist() == [3, 0, 0] and sb.top_k_B.dtype == torch.long
    assert sb.top_p_B.tolist() == [1.0, 0.75, 1.0] and sb.min_p_B.tolist() == [0.25, 0.0, 0.0]
    assert (sb.greedy_only, sb.use_min_p, sb.use_sort, sb.top_logprobs) == (False, True, True, 6)
    row_N, token_N, value_N = sb.bias
    assert (row_N.tolist(), token_N.tolist(), value_N.tolist()) == ([0, 0, 2], [4, 1, 0], [2.0, -1.5, 3.0])
    assert value_N.dtype == torch.float32
    assert [x.tolist() for x in sb.penalties] == [[1.0, 1.0, 1.5], [0.0, 0.5, 0.0], [0.0, 0.0, -0.25]]
    logits = torch.zeros(3, 6)
    want = [[0.0, -1.5, 0.0, 0.0, 2.0, 0.0], [0.0] * 6, [3.0, 0.0, 0.0, 0.0, 0.0, 0.0]]
    assert adjust_logits(logits, sb, (torch.zeros(3, 6), torch.zeros(3, 6, dtype=torch.bool))).tolist() == want
    # each flag alone; all off: no tensors for bias and penalties, top-1 capped at a vocabulary of one
    off = sampling_batch([GenParams(temperature=0), GenParams(temperature=0, top_logprobs=1)], "cpu", 1)
    assert (off.greedy_only, off.use_min_p, off.use_sort, off.top_logprobs, off.bias, off.penalties) == \
        (True, False, False, 1, None, None)
    for gp, flags in [(GenParams(min_p=1e-3), (True, False)), (GenParams(top_k=1), (False, True)),
                      (GenParams(top_p=0.999), (False, True)), (GenParams(top_k=-1, min_p=0.0), (False, False))]:
        sb = sampling_batch([GenParams(temperature=0), gp], "cpu", 6)
        assert (sb.greedy_only, sb.use_min_p, sb.use_sort) == (False, *flags)
    for gp in [GenParams(repetition_penalty=0.5), GenParams(frequency_penalty=-1.0), GenParams(presence_penalty=2.0)]:
        assert sampling_batch([GenParams(), gp], "cpu", 6).penalties is not None
    assert sampling_batch([GenParams(logit_bias={})], "cpu", 6).bias is None


def test_penalty_state_by_hand():
    """Counts and seen tokens per slot: reset clears a used slot and marks its prompt, count adds rows a, a+1, ...,
    move copies a slot (both tensors) and leaves the source as it was."""
    st = PenaltyState(3, 5, "cpu")
    assert st.counts_SV.dtype == torch.float32 and st.seen_SV.dtype == torch.bool
    st.reset(0, [1, 1, 4])
    st.reset(2, [0])
    st.count(1, torch.tensor([3, 2]))                    # slot 1 produced 3, slot 2 produced 2
    st.count(1, torch.tensor([3, 0]))
    assert st.counts_SV.tolist() == [[0] * 5, [0, 0, 0, 2, 0], [1, 0, 1, 0, 0]]
    assert st.seen_SV.tolist() == [[False, True, False, False, True], [False, False, False, True, False],
                                   [True, False, True, False, False]]
    st.move(2, 0)
    assert st.counts_SV[0].tolist() == st.counts_SV[2].tolist() == [1, 0, 1, 0, 0]
    assert st.seen_SV[0].tolist() == st.seen_SV[2].tolist() == [True, False, True, False, False]
    st.reset(2, [4])
    assert st.counts_SV[2].tolist() == [0] * 5 and st.seen_SV[2].tolist() == [False] * 4 + [True]
    counts, seen = st.rows(1, 3)
    assert counts.tolist() == [[0, 0, 0, 2, 0], [0] * 5] and seen.shape == (2, 5)


def test_bias_alone_and_penalties_alone_are_applied():
    """A batch with only a logit_bias, or only a penalty, still goes through step 2-3 (either one turns it on); an
    all-integer bias (JSON's `{"3": 5}`) is added as float32."""
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    for ints in ({3: 5}, {3: 5.0}):
        sb = sampling_batch([GenParams(temperature=0, logit_bias=ints)], "cpu", 4)
        assert sb.penalties is None and sb.bias[2].dtype == torch.float32
        assert sample(logits, sb, None)[0].tolist() == [3]                   # 1 + 5 beats 2
    st = PenaltyState(1, 4, "cpu")
    st.reset(0, [0])
    sb = sampling_batch([GenParams(temperature=0, repetition_penalty=4.0)], "cpu", 4)
    assert sb.bias is None
    assert sample(logits, sb, None, st.rows(0, 1))[0].tolist() == [3]        # 2 / 4 = 0.5 < 1
