"""Engine tests on tiny random ZAYA models: .venv/bin/python -m pytest tests/test_engine.py"""

import pytest
import torch

from openzaya.engine import Engine, GenParams, _find_stop
from openzaya.sampling import SamplingBatch, sample
from openzaya.model import ZayaConfig, ZayaForCausalLM
from zaya_ref import route_share_to_skip


def toy_decode(ids):
    return "".join(chr(97 + i % 26) for i in ids)


def tiny_model(seed=0, **kw):
    torch.manual_seed(seed)
    # A large init spread so that greedy outputs vary (std 0.02 makes a random model repeat one token).
    cfg = ZayaConfig(vocab_size=97, eos_token_id=None, initializer_range=0.3, **kw)
    return ZayaForCausalLM(cfg).eval()


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14], [3, 1, 4, 1, 5, 9, 2, 6], [7, 7]]
MAX_NEW = [5, 9, 3, 12, 7, 1]


@torch.no_grad()
def greedy_reference(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_greedy_matches_full_forward_with_continuous_batching():
    model = tiny_model(layer_types=["hybrid", "hybrid_sliding"], sliding_window=4)
    eng = Engine(model, max_slots=3, max_len=32)                 # fewer slots than prompts
    res = eng.generate(PROMPTS, [GenParams(temperature=0, max_new_tokens=n) for n in MAX_NEW])
    for p, n, r in zip(PROMPTS, MAX_NEW, res):
        assert r.tokens == greedy_reference(model, p, n)
        assert (r.finish_reason, r.prompt_tokens, r.completion_tokens) == ("length", len(p), n)


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "static"])
def test_greedy_and_routes_match_full_forward_with_skip_routes(continuous):
    """About half of every layer's tokens routed to skip (-1): prefill, left padding (static mode) and cached decode
    still give the full forward's greedy tokens and routes."""
    model = tiny_model(seed=8, layer_types=["hybrid", "hybrid_sliding"], sliding_window=4)
    route_share_to_skip(model, torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0)))
    res = Engine(model, max_slots=3, max_len=32).generate(
        PROMPTS, [GenParams(temperature=0, max_new_tokens=n) for n in MAX_NEW], continuous=continuous,
        return_routes=True)
    seen = []
    for p, n, r in zip(PROMPTS, MAX_NEW, res):
        assert r.tokens == greedy_reference(model, p, n)
        _, routes = model(torch.tensor([p + r.tokens]), return_routes=True)
        assert torch.equal(r.routes[:, :-1], routes[:, 0, :-1])
        seen.append(r.routes[:, :-1])
    seen = torch.cat(seen, dim=1)
    for layer in seen:                                   # both skip and real experts were exercised in every layer
        assert 0.2 < float((layer == -1).float().mean()) < 0.8 and layer.max() >= 0


def test_continuous_equals_alone_and_static():
    model = tiny_model(seed=1)
    params = [GenParams(temperature=0, max_new_tokens=n) for n in MAX_NEW]
    batched = Engine(model, max_slots=2, max_len=32).generate(PROMPTS, params)
    static = Engine(model, max_slots=4, max_len=32).generate(PROMPTS, params, continuous=False)
    alone_engine = Engine(model, max_slots=1, max_len=32)
    for p, gp, rb, rs in zip(PROMPTS, params, batched, static):
        alone = alone_engine.generate([p], gp)[0]
        assert rb.tokens == alone.tokens == rs.tokens
        assert rb.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_logprobs_are_raw_model_logprobs():
    model = tiny_model(seed=2)
    eng = Engine(model, max_slots=4, max_len=32)
    params = [GenParams(temperature=1.0, max_new_tokens=8, seed=i) for i in range(3)]
    params.append(GenParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, max_new_tokens=8, seed=9))
    res = eng.generate(PROMPTS[:4], params)
    for p, gp, r in zip(PROMPTS, params, res):
        ids = torch.tensor([p + r.tokens])
        logp = torch.log_softmax(model(ids)[0, len(p) - 1:-1].float(), -1)
        expected = logp.gather(1, torch.tensor(r.tokens)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(r.logprobs), expected, atol=1e-4, rtol=0)
        if gp.temperature == 1.0:   # no filters: the sampling distribution is the model's
            torch.testing.assert_close(torch.tensor(r.sampling_logprobs), expected, atol=1e-4, rtol=0)
        else:                       # filtered: every token is among the top 5 of the model
            top5 = logp.topk(5, dim=-1).indices
            assert all(t in top5[i] for i, t in enumerate(r.tokens))
            assert all(s >= lp - 1e-5 for s, lp in zip(r.sampling_logprobs, r.logprobs))


def test_decode_layout_of_experts_keeps_values_outputs_and_training(tmp_path):
    from openzaya.checkpoint import from_pretrained, save_pretrained
    from openzaya.optim import build_optimizer

    model = tiny_model(seed=5, num_experts=4)
    moved = tiny_model(seed=5, num_experts=4).relayout_experts_for_decode()
    w = moved.model.layers[0].mlp.experts.gate_up_proj
    assert not w.is_contiguous() and w.transpose(1, 2).is_contiguous()            # the storage is transposed
    moved.relayout_experts_for_decode()                                             # a second call changes nothing
    assert w.transpose(1, 2).is_contiguous()
    for (k, a), b in zip(model.state_dict().items(), moved.state_dict().values()):
        assert torch.equal(a, b), k                                                 # same names, shapes, values
    ids = torch.tensor([PROMPTS[4]])
    with torch.no_grad():
        torch.testing.assert_close(moved(ids), model(ids), atol=1e-5, rtol=0)
    params = [GenParams(temperature=0, max_new_tokens=n) for n in MAX_NEW]
    ref = Engine(model, max_slots=3, max_len=32).generate(PROMPTS, params)
    got = Engine(moved, max_slots=3, max_len=32).generate(PROMPTS, params)
    assert [r.tokens for r in got] == [r.tokens for r in ref]
    save_pretrained(moved, tmp_path / "m")                                          # saves the plain layout
    back = from_pretrained(tmp_path / "m")
    assert back.model.layers[0].mlp.experts.gate_up_proj.is_contiguous()
    assert torch.equal(back.model.layers[0].mlp.experts.gate_up_proj, w)
    moved.train()                                                                   # and it still trains
    opt = build_optimizer(moved, 1e-2)
    before = w.detach().clone()
    loss = -torch.log_softmax(moved(ids)[0, :-1], -1).gather(1, ids[0, 1:, None]).mean()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(before, w.detach())


def _sample(probs, u, temp=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """sampling.sample on rows of exact (dyadic) probabilities; returns (tokens, raw logprobs, sampling logprobs)."""
    B = len(probs)
    t = lambda x, dt=torch.float32: torch.tensor([x] * B if not isinstance(x, list) else x, dtype=dt)  # noqa: E731
    filters = (any(m > 0 for m in ([min_p] if not isinstance(min_p, list) else min_p)),
               any(k > 0 for k in ([top_k] if not isinstance(top_k, list) else top_k))
               or any(p < 1 for p in ([top_p] if not isinstance(top_p, list) else top_p)))
    sb = SamplingBatch(t(temp), t(top_k, torch.long), t(top_p), t(min_p), greedy_only=False, use_min_p=filters[0],
                       use_sort=filters[1])
    tok, raw, samp, _ = sample(torch.tensor(probs).log(), sb, torch.tensor(u))
    return tok.tolist(), raw, samp


def test_sample_hand_values():
    """Inverse-CDF sampling by hand (cdf of [1/8, 1/8, 1/4, 1/2] is 1/8, 1/4, 1/2, 1): the token whose cdf step
    holds u * total (right-continuous: u on a step boundary takes the next token), temperature, min-p, top-k and
    top-p against hand-filtered distributions, and the sampling logprob of each."""
    P = [0.125, 0.125, 0.25, 0.5]
    tok, raw, samp = _sample([P] * 5, [0.05, 0.25, 0.3, 0.5, 0.99])
    assert tok == [0, 2, 2, 3, 3]                                  # u = 1/4 and 1/2 sit on a step: the next token
    torch.testing.assert_close(samp, torch.tensor([P[i] for i in tok]).log())
    torch.testing.assert_close(raw, samp)                         # temperature 1, no filters: the same numbers
    # temperature 1/2 squares and renormalises: [1, 1, 4, 16] / 22
    tok, raw, samp = _sample([P, P], [0.03, 0.5], temp=0.5)       # cdf 1/22, 2/22, 6/22, 1
    q = torch.tensor([1.0, 1.0, 4.0, 16.0]) / 22
    assert tok == [0, 3] and torch.allclose(samp, q[[0, 3]].log()) and torch.allclose(raw, torch.tensor(P)[[0, 3]].log())
    # temperature 0 in a sampled batch: greedy, sampling logprob 0; a tie goes to the first maximum
    tok, raw, samp = _sample([[0.5, 0.5, 0.0, 0.0], P], [0.99, 0.99], temp=[0.0, 1.0])
    assert tok == [0, 3] and samp[0] == 0.0 and torch.allclose(samp[1], torch.tensor(0.5).log())
    # min-p 1/2 of each row's own maximum keeps probabilities >= the floor (1/4 stays): row 0 keeps [1/4, 1/2]
    U = [[0.25, 0.25, 0.25, 0.25]]
    tok, _, samp = _sample([P] + U, [0.2, 0.99], min_p=0.5)
    assert tok == [2, 3] and torch.allclose(samp, torch.tensor([1 / 3, 1 / 4]).log())
    Q = [0.375, 0.25, 0.25, 0.125]                                # the floor is per row: 0.6 * 3/8 here, not 0.6 * 1/2
    tok, _, samp = _sample([P, Q], [0.99, 0.99], min_p=0.6)
    assert tok == [3, 2] and torch.allclose(samp, torch.tensor([1.0, 2 / 7]).log())
    # top-k 2 keeps the two most likely (sorted: 1/2 then 1/4); top-p 1/2 keeps tokens whose mass before them is
    # below 1/2 (only the first)
    tok, _, samp = _sample([P, P], [0.5, 0.99], top_k=2)
    assert tok == [3, 2] and torch.allclose(samp, torch.tensor([2 / 3, 1 / 3]).log())
    tok, _, samp = _sample([P, P], [0.0, 0.99], top_p=0.5)
    assert tok == [3, 3] and torch.allclose(samp, torch.zeros(2))
    # top-p is a share of what top-k kept: top-k 2 leaves 3/4, top-p 0.6 of it is 0.45 < 1/2: only the first
    tok, _, samp = _sample([P], [0.99], top_k=2, top_p=0.6)
    assert tok == [3] and torch.allclose(samp, torch.zeros(1))
    tok, _, samp = _sample([P], [0.99], top_k=2, top_p=0.7)       # 0.7 * 3/4 = 0.525 > 1/2: both stay
    assert tok == [2] and torch.allclose(samp, torch.tensor([1 / 3]).log())


def test_seeds_reproduce():
    model = tiny_model(seed=3)
    eng = Engine(model, max_slots=3, max_len=32)
    params = [GenParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=s) for s in (1, 2, 3)]
    a = [r.tokens for r in eng.generate(PROMPTS[:3], params)]
    b = [r.tokens for r in eng.generate(PROMPTS[:3], params)]
    assert a == b
    other = [GenParams(temperature=1.0, top_p=0.95, max_new_tokens=10, seed=s + 100) for s in (1, 2, 3)]
    assert [r.tokens for r in eng.generate(PROMPTS[:3], other)] != a
    greedy_k1 = eng.generate(PROMPTS[:3], GenParams(temperature=1.0, top_k=1, max_new_tokens=10, seed=5))
    greedy = eng.generate(PROMPTS[:3], GenParams(temperature=0, max_new_tokens=10))
    assert [r.tokens for r in greedy_k1] == [r.tokens for r in greedy]


def test_stop_strings_cut_exactly():
    model = tiny_model(seed=4)
    eng = Engine(model, max_slots=2, max_len=40, decode=toy_decode)
    full = eng.generate([PROMPTS[1]], GenParams(temperature=0, max_new_tokens=20))[0]
    text = toy_decode(full.tokens)
    stop = text[6:8]                                             # a stop string inside the completion
    cut = text.find(stop)
    r = eng.generate([PROMPTS[1]], GenParams(temperature=0, max_new_tokens=20, stop=[stop, "zzzzzz"]))[0]
    assert r.finish_reason == "stop"
    assert r.text == text[:cut] and stop not in r.text
    assert r.tokens == full.tokens[:cut] and len(r.logprobs) == cut    # toy decode: one char per token
    # A stop string starting mid-token: the token holding its start is dropped, the text is cut exactly.
    multi = lambda ids: "".join(chr(97 + i % 26) * 2 for i in ids)   # two chars per token
    kept, t = _find_stop([0, 1, 2, 3], ["bc"], multi)              # "aabbccdd": "bc" starts in token 1
    assert (kept, t) == ([0], "aab")
    assert _find_stop([0, 1], ["q"], multi) is None


def test_eos_stops():
    model = tiny_model(seed=5)
    eng = Engine(model, max_slots=2, max_len=40, decode=toy_decode)
    full = eng.generate([PROMPTS[0]], GenParams(temperature=0, max_new_tokens=12))[0]
    eos = full.tokens[4]
    first = full.tokens.index(eos)
    r = eng.generate([PROMPTS[0]], GenParams(temperature=0, max_new_tokens=12, eos_ids=[eos]))[0]
    assert r.finish_reason == "stop"
    assert r.tokens == full.tokens[: first + 1]                  # the eos token is kept in tokens...
    assert r.text == toy_decode(full.tokens[:first])             # ...but not in the text


def test_too_long_prompt_is_a_clear_error():
    model = tiny_model(max_position_embeddings=16)
    eng = Engine(model, max_slots=2, max_len=12)
    with pytest.raises(ValueError, match=r"prompt 1 has 13 tokens.*limit of 12"):
        eng.generate([[1, 2], list(range(13))], GenParams(temperature=0))
    eng = Engine(model, max_slots=2, max_len=64)
    with pytest.raises(ValueError, match=r"prompt 0 has 17 tokens.*model context 16"):
        eng.generate([list(range(17))], GenParams(temperature=0))
    # A prompt that fits but leaves little room ends with "length" when its cache row is full.
    r = Engine(model, max_slots=1, max_len=12).generate([list(range(10))], GenParams(temperature=0, max_new_tokens=50))[0]
    assert (r.finish_reason, r.completion_tokens) == ("length", 3)


def test_routes_shape_and_replay():
    model = tiny_model(seed=6, num_hidden_layers=3)
    eng = Engine(model, max_slots=2, max_len=32)
    params = [GenParams(temperature=1.0, max_new_tokens=n, seed=n) for n in (6, 3, 8)]
    res = eng.generate(PROMPTS[:3], params, return_routes=True)
    for p, r in zip(PROMPTS, res):
        T = len(p) + r.completion_tokens
        assert r.routes.shape == (3, T) and r.routes.dtype == torch.long
        assert (r.routes[:, -1] == -1).all()                     # the last token never went through the model
        ids = torch.tensor([p + r.tokens])
        logits, routes = model(ids, return_routes=True)
        assert torch.equal(r.routes[:, :-1], routes[:, 0, :-1])  # same routing as a full forward
        replayed = model(ids, replay_routes=r.routes[:, None])
        torch.testing.assert_close(replayed[:, :-1], logits[:, :-1], atol=1e-4, rtol=0)


def test_static_mode_near_max_len_and_routes():
    # Two left-padding groups in one static batch; the short-budget row finishes first and keeps decoding in place.
    model = tiny_model(seed=7)
    prompts, params = [list(range(1, 11)), [5, 6]], [GenParams(temperature=0, max_new_tokens=n) for n in (3, 12)]
    static = Engine(model, max_slots=2, max_len=14).generate(prompts, params, continuous=False, return_routes=True)
    cont = Engine(model, max_slots=2, max_len=14).generate(prompts, params, return_routes=True)
    for p, rs, rc in zip(prompts, static, cont):
        assert rs.tokens == rc.tokens
        assert torch.equal(rs.routes, rc.routes)
        _, routes = model(torch.tensor([p + rs.tokens]), return_routes=True)
        assert torch.equal(rs.routes[:, :-1], routes[:, 0, :-1]) and (rs.routes[:, -1] == -1).all()


@pytest.mark.slow
def test_compiled_decode_matches_eager():
    """Engine(compile=True): the decode step under torch.compile (experts as one opaque custom op, attention over
    the whole preallocated cache) gives the eager greedy tokens and logprobs."""
    model = tiny_model(seed=2)
    params = [GenParams(temperature=0, max_new_tokens=n) for n in MAX_NEW]
    eager = Engine(model, max_slots=3, max_len=32).generate(PROMPTS, params)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = Engine(model, max_slots=3, max_len=32, compile=True).generate(PROMPTS, params)
    assert [r.tokens for r in compiled] == [r.tokens for r in eager]
    # rows finish at different steps (batch 3, 2, 1): one graph for every batch size >= 2, one for batch 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    for c, e in zip(compiled, eager):
        assert max(abs(a - b) for a, b in zip(c.logprobs, e.logprobs)) < 1e-4


def test_cuda_graphs_need_a_cuda_model():
    """Engine(cuda_graphs=True) is CUDA only (tests/test_gpu.py checks it on a GPU): elsewhere a clear error."""
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        Engine(tiny_model(), max_slots=2, max_len=16, cuda_graphs=True)


@pytest.mark.parametrize("continuous", [True, False], ids=["continuous", "static"])
def test_shared_prompt_prefill_equals_unshared(continuous, monkeypatch):
    """G samples of one prompt (RL's groups) are prefilled once and the repeats copy its cache rows: tokens, logprobs
    and routes equal the unshared path's (every row prefilled), greedy ones equal the full forward."""
    import openzaya.engine as engine_mod
    model = tiny_model(seed=8, layer_types=["hybrid", "hybrid_sliding"], sliding_window=4)
    route_share_to_skip(model, torch.randint(0, 97, (4, 16), generator=torch.Generator().manual_seed(0)))
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[1], PROMPTS[4], PROMPTS[1], PROMPTS[0]]
    params = [GenParams(temperature=1.0, max_new_tokens=9, seed=s) for s in range(5)]
    params.append(GenParams(temperature=0, max_new_tokens=7))

    def run():
        return Engine(model, max_slots=4, max_len=32).generate(prompts, params, continuous=continuous,
                                                              return_routes=True)
    calls = []
    shared_first = engine_mod._shared_prompts_first
    monkeypatch.setattr(engine_mod, "_shared_prompts_first", lambda g, p: calls.append(shared_first(g, p)) or calls[-1])
    shared = run()
    assert any(src is not None for _, src in calls)            # some group did share a prefill
    monkeypatch.setattr(engine_mod, "_shared_prompts_first", lambda g, p: (g, None))
    unshared = run()
    for a, b in zip(shared, unshared):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert torch.equal(a.routes, b.routes)
    assert shared[5].tokens == greedy_reference(model, prompts[5], 7)
    assert len({tuple(r.tokens) for r in (shared[0], shared[2], shared[4])}) == 3   # seeds still differ per sample


def test_shared_prompts_first_order():
    from openzaya.engine import _shared_prompts_first
    assert _shared_prompts_first([3, 1, 2], [[1], [2], [3], [4]]) == ([3, 1, 2], None)
    assert _shared_prompts_first([0, 1, 2, 3, 4], [[5, 6], [7], [5, 6], [7], [5, 6]]) == ([0, 1, 2, 3, 4], [0, 1, 0])
    assert _shared_prompts_first([2, 0, 1], [[5], [6], [5]]) == ([2, 1, 0], [0])
