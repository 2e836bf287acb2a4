"""Model tests: parity with transformers' ZayaForCausalLM, cache, padding, router replay, balancing, overfitting.

Run: .venv/bin/python -m pytest tests/test_model.py
"""

import math

import pytest
import torch
import torch.nn.functional as F

from openzaya.model import ZayaCache, ZayaConfig, ZayaForCausalLM, count_params, zaya1_8b
from zaya_ref import random_model, reference_from, route_share_to_skip, tiny_config

CONFIGS = {
    "sliding": tiny_config(),
    "one_layer_full": tiny_config(num_hidden_layers=1, layer_types=["hybrid"], sliding_window=None, num_experts=3),
    "wide_conv": tiny_config(num_hidden_layers=2, layer_types=["hybrid_sliding"] * 2, sliding_window=7,
                             cca_time0=3, cca_time1=2, num_attention_heads=6, num_key_value_heads=3),
}


def assert_skip_share(routes_LBT, num_experts, keep_BT=None, lo=0.2, hi=0.8):
    """Every layer sends between lo and hi of the real tokens to skip (-1) and the rest to real experts: both paths
    are exercised."""
    for l, r in enumerate(routes_LBT):
        real = r if keep_BT is None else r[keep_BT.bool()]
        share = float((real == -1).float().mean())
        assert lo < share < hi, f"layer {l}: skip share {share:.2f} outside ({lo}, {hi})"
        assert real.min() >= -1 and real.max() < num_experts


@pytest.mark.parametrize("skip", [False, True], ids=["no_skip", "skip"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_matches_transformers(name, skip):
    model = random_model(CONFIGS[name])
    ids = torch.randint(0, 128, (3, 17))   # longer than every sliding window
    if skip:                               # about half the tokens of every layer routed to skip
        route_share_to_skip(model, ids)
    ref = reference_from(model)
    with torch.no_grad():
        (ours, routes), theirs = model(ids, return_routes=True), ref(ids).logits
    if skip:
        assert_skip_share(routes, model.config.num_experts)
    else:
        assert (routes >= 0).all()
    err = (ours - theirs).abs().max().item()
    print(f"{name}: max |ours - transformers| = {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("skip", [False, True], ids=["no_skip", "skip"])
def test_left_padded_batch_matches_each_row(skip):
    model = random_model(CONFIGS["sliding"])
    lengths = [15, 9, 4, 1]
    T = max(lengths)
    rows = [torch.randint(0, 128, (n,)) for n in lengths]
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):], mask[i, T - len(r):] = r, 1
    if skip:
        route_share_to_skip(model, ids, attention_mask=mask)
    ref = reference_from(model)
    with torch.no_grad():
        batch, routes = model(ids, attention_mask=mask, return_routes=True)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        theirs = ref(ids, attention_mask=mask, position_ids=positions).logits
        for i, r in enumerate(rows):
            alone, alone_routes = model(r[None], return_routes=True)
            assert torch.equal(alone_routes[:, 0], routes[:, i, T - len(r):])
            assert (batch[i, T - len(r):] - alone[0]).abs().max() < 1e-4
            assert (batch[i, T - len(r):] - theirs[i, T - len(r):]).abs().max() < 1e-4
    assert (routes[:, ~mask.bool()] == -1).all()           # padding: the sentinel, never expert 0
    if skip:
        assert_skip_share(routes, model.config.num_experts, mask)
    else:
        assert (routes[:, mask.bool()] >= 0).all()
    assert torch.isfinite(batch).all()


def _decode(model, ids, mask, chunks, routes=None):
    """Logits of `ids` fed through a cache in chunks; the routes of each chunk are appended to `routes` if given."""
    cache = ZayaCache(model.config, ids.shape[0], 64)
    outs, t = [], 0
    for n in chunks:
        logits, r = model(ids[:, t:t + n], attention_mask=mask[:, t:t + n], cache=cache, return_routes=True)
        outs.append(logits)
        if routes is not None:
            routes.append(r)
        mask = mask.clone()
        mask[:, t:t + n] = 1  # only the first chunk carries left padding
        t += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("skip", [False, True], ids=["no_skip", "skip"])
def test_cached_decode_matches_full_forward(skip):
    model = random_model(CONFIGS["sliding"])
    B, T = 3, 40
    ids = torch.randint(0, 128, (B, T))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, :3] = 0
    mask[2, :6] = 0
    if skip:
        route_share_to_skip(model, ids, attention_mask=mask)
    keep = mask.bool()
    with torch.no_grad():
        full, full_routes = model(ids, attention_mask=mask, return_routes=True)
        for chunks in ([8] + [1] * 32,            # prefill 8, then 32 single-token steps
                       [8, 5, 1, 13, 7, 6]):      # multi-token continuation
            routes = []
            got = _decode(model, ids, mask, chunks, routes)
            err = (got - full)[keep].abs().max().item()
            print(f"cached vs full: {err:.2e}")
            assert err < 1e-4
            assert torch.equal(torch.cat(routes, dim=2)[:, keep], full_routes[:, keep])   # same routing
    if skip:
        assert_skip_share(full_routes, model.config.num_experts, mask)


@pytest.mark.parametrize("skip", [False, True], ids=["no_skip", "skip"])
def test_cached_decode_matches_transformers_cache(skip):
    model = random_model(CONFIGS["sliding"])
    ids = torch.randint(0, 128, (2, 12))
    if skip:
        route_share_to_skip(model, ids)
        assert_skip_share(model(ids, return_routes=True)[1], model.config.num_experts)
    ref = reference_from(model)
    with torch.no_grad():
        out = ref(ids[:, :5], use_cache=True)
        theirs = [out.logits]
        cache = out.cache
        for t in range(5, 12):
            out = ref(ids[:, t:t + 1], cache=cache, use_cache=True)
            cache = out.cache
            theirs.append(out.logits)
        ours = _decode(model, ids, torch.ones_like(ids), [5] + [1] * 7)
    assert (torch.cat(theirs, 1) - ours).abs().max() < 1e-4


@pytest.mark.parametrize("grouped", [True, False])
def test_dispatch_equals_dense_loop(grouped):
    """Grouped dispatch (grouped GEMM or per-expert loop) equals a naive per-token loop, values and gradients."""
    model = random_model(CONFIGS["sliding"])
    moe = model.model.layers[1].mlp
    moe.experts.use_grouped_mm = grouped
    x_ND = torch.randn(50, model.config.hidden_size, requires_grad=True)
    route_N, weight_N, _ = moe.gate(x_ND.detach(), torch.randn(50, model.config.router_hidden_size), None)
    route_N[:5] = -1  # some skip tokens
    weight_N = (weight_N * (route_N >= 0)).detach()
    dense = []
    for n in range(50):  # naive per-token loop
        e = int(route_N[n])
        if e < 0:
            dense.append(torch.zeros_like(x_ND[n]))
            continue
        gate, up = (moe.experts.gate_up_proj[e] @ x_ND[n]).chunk(2)
        dense.append((moe.experts.down_proj[e] @ (F.silu(gate) * up)) * weight_N[n])
    dense = torch.stack(dense)
    probe = torch.randn_like(dense)
    g_dense = torch.autograd.grad((dense * probe).sum(), [x_ND, moe.experts.gate_up_proj, moe.experts.down_proj])
    out = moe.experts(x_ND, route_N, weight_N)
    g_out = torch.autograd.grad((out * probe).sum(), [x_ND, moe.experts.gate_up_proj, moe.experts.down_proj])
    assert torch.allclose(out, dense, atol=1e-5)
    for a, b in zip(g_out, g_dense):
        assert torch.allclose(a, b, atol=1e-5)


def test_experts_custom_op_equals_eager_dispatch():
    """torch.ops.openzaya.experts (what a compiled decode step calls) is the same computation as Experts.forward."""
    cfg = tiny_config()
    experts = random_model(cfg, seed=4).model.layers[0].mlp.experts
    x = torch.randn(9, cfg.hidden_size)
    route = torch.tensor([0, -1, 3, 3, 1, -1, 2, 0, 3])
    w = torch.rand(9)
    with torch.no_grad():
        y = torch.ops.openzaya.experts(x, route, w, experts.gate_up_proj, experts.down_proj, True)
        assert torch.equal(y, experts(x, route, w)) and (y[route < 0] == 0).all()


@pytest.mark.parametrize("grouped", [True, False])
def test_sync_free_experts_equal_dispatch(grouped):
    """The sync-free experts path that a CUDA graph captures (no host read of token counts; skip rows sorted past the
    grouped GEMM's last offset and masked) gives what the grouped dispatch gives, skip and padding rows zero."""
    from openzaya.model import _experts_forward, _experts_forward_static

    cfg = tiny_config()
    experts = random_model(cfg, seed=5).model.layers[0].mlp.experts
    x = torch.randn(11, cfg.hidden_size)
    route = torch.tensor([2, -1, 3, 0, 0, -1, 1, 3, -1, 2, 0])
    w = torch.rand(11)
    args = (x, route, w, experts.gate_up_proj, experts.down_proj, grouped)
    with torch.no_grad():
        y = _experts_forward_static(*args)
        assert torch.allclose(y, _experts_forward(*args), atol=1e-6) and (y[route < 0] == 0).all()
        all_skip = torch.full((11,), -1)
        assert (_experts_forward_static(x, all_skip, w, *args[3:]) == 0).all()


def test_skip_tokens_cost_nothing(monkeypatch):
    """Tokens routed to skip never reach an expert matmul (the reference sends them to expert 0 with weight 0)."""
    model = random_model(CONFIGS["sliding"])
    experts = model.model.layers[0].mlp.experts
    rows = []
    linear, grouped = F.linear, getattr(F, "grouped_mm", None)
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: rows.append(x.shape[0]) or linear(x, w, b))
    if grouped is not None:
        monkeypatch.setattr(F, "grouped_mm", lambda x, w, **k: rows.append(x.shape[0]) or grouped(x, w, **k))
    x_ND = torch.randn(10, model.config.hidden_size)
    route_N = torch.tensor([-1] * 7 + [0, 2, 2])
    for use_grouped in (True, False):
        rows.clear()
        experts.use_grouped_mm = use_grouped
        experts(x_ND, route_N, torch.ones(10))
        assert sum(rows) == 2 * 3, rows   # gate_up and down over the 3 routed tokens only


def test_router_replay_reproduces_logits_and_trains_router():
    model = random_model(CONFIGS["sliding"])
    ids = torch.randint(0, 128, (2, 16))
    logits, routes = model(ids, return_routes=True)
    assert routes.shape == (3, 2, 16) and routes.min() >= -1
    model.zero_grad()
    replayed = model(ids, replay_routes=routes)
    assert torch.equal(replayed, logits)
    replayed.logsumexp(-1).mean().backward()
    for r in model.routers():
        assert r.router_mlp.out_proj.weight.grad.abs().sum() > 0
        assert r.down_proj.weight.grad.abs().sum() > 0
    # forcing other experts changes the output: the replay really drives dispatch
    forced = torch.where(routes >= 0, (routes + 1) % model.config.num_experts, routes)
    assert not torch.allclose(model(ids, replay_routes=forced), logits)


def test_padding_and_skip_use_sentinel_not_expert0():
    model = random_model(CONFIGS["sliding"])
    for r in model.routers():
        r.balancing_biases[-1] = 10.0   # skip always wins
    ids = torch.randint(0, 128, (1, 6))
    _, routes = model(ids, return_routes=True)
    assert (routes == -1).all()
    for r in model.routers():
        r.balancing_biases[-1] = -10.0
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    _, routes = model(ids, attention_mask=mask, return_routes=True)
    assert (routes[:, 0, :2] == -1).all() and (routes[:, 0, 2:] >= 0).all()


def _skewed_router_model():
    """Two layers, 4 experts; routers whose choice depends on the token, skewed towards experts 0 and 1."""
    torch.manual_seed(0)
    cfg = tiny_config(num_experts=4, num_hidden_layers=2, layer_types=["hybrid"] * 2, sliding_window=None)
    model = ZayaForCausalLM(cfg)
    with torch.no_grad():
        for r in model.routers():
            for p in r.parameters():
                p.add_(torch.randn_like(p) * 0.5)
            r.balancing_biases[:2] += 0.05
    return model


def _pooled_load(counts):
    """(max/mean expert load of the worst layer, smallest skip share over layers) of per-step load counts [L, E+1]
    summed over the steps: pooling thousands of tokens takes the sampling noise (~1.1 at 512 tokens) out."""
    c_LC = torch.stack(counts).sum(0)
    e_LE = c_LC[:, :-1]
    return float((e_LE.max(1).values / e_LE.mean(1)).max()), float((c_LC[:, -1] / c_LC.sum(1)).min())


def _train_load_balance(balance: bool, steps: int = 80):
    model = _skewed_router_model().train()
    model.balance_enabled, model.balance_lr = balance, 3e-2
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.randint(0, 128, (64, 33))
    counts = []
    for step in range(steps):
        batch = data[torch.randint(0, 64, (16,))]   # 512 tokens a step
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        counts.append(torch.stack([r.load_counts for r in model.routers()]))
        model.update_balancing_biases()
    return _pooled_load(counts[:5])[0], _pooled_load(counts[-10:])[0]   # (start, end): 2560 and 5120 tokens


def test_bias_balancing_evens_expert_load():
    on_first, on_last = _train_load_balance(True)
    off_first, off_last = _train_load_balance(False)
    print(f"max/mean expert load: balancing on {on_first:.2f} -> {on_last:.2f}; off {off_first:.2f} -> {off_last:.2f}")
    assert on_last < on_first
    assert on_last < 1.3          # measured 1.15 (pooled over the last 10 steps)
    assert off_last > on_last
    assert off_last > 1.5         # measured 1.92: without balancing the skew stays


def test_balancing_update_hand_values_with_skip():
    """Two updates by eq. 5 from given load counts, against hand values: p_e over routed tokens only (skip and
    padding are not in the denominator), gradient p_e - 1/E, AdamW-style moments with bias correction; the skip
    bias keeps its value."""
    model = ZayaForCausalLM(tiny_config(num_hidden_layers=1, layer_types=["hybrid"], sliding_window=None))
    model.balance_lr = 0.1
    r = model.routers()[0]
    b0 = r.balancing_biases.clone()
    b1, b2, eps = 0.9, 0.999, 1e-8
    m, v, expected = [0.0] * 4, [0.0] * 4, b0.tolist()
    for step, counts in enumerate([[40.0, 30.0, 20.0, 10.0, 100.0], [10.0, 20.0, 30.0, 40.0, 900.0]], start=1):
        r.load_counts = torch.tensor(counts)
        model.update_balancing_biases()
        assert r.load_counts is None                                  # reset for the next window
        for e in range(4):
            g = counts[e] / 100.0 - 0.25                              # 100 routed tokens either way
            m[e] = b1 * m[e] + (1 - b1) * g
            v[e] = b2 * v[e] + (1 - b2) * g * g
            expected[e] -= 0.1 * (m[e] / (1 - b1 ** step)) / ((v[e] / (1 - b2 ** step)) ** 0.5 + eps)
        torch.testing.assert_close(r.balancing_biases, torch.tensor(expected), atol=1e-6, rtol=0)
        if step == 1:   # Adam's first step is lr * g / |g|: overloaded experts 0, 1 down, underloaded 2, 3 up
            torch.testing.assert_close(r.balancing_biases - b0, torch.tensor([-0.1, -0.1, 0.1, 0.1, 0.0]),
                                       atol=1e-6, rtol=0)
    assert r.balancing_biases[-1] == b0[-1] == -1.0


def test_load_counts_keep_skip_apart_and_ignore_padding():
    """A training forward counts each real token's class: experts 0..E-1, skip at index E; padding nowhere."""
    model = random_model(CONFIGS["sliding"])
    ids = torch.randint(0, 128, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    route_share_to_skip(model, ids, attention_mask=mask)
    model.train()
    with torch.no_grad():
        _, routes = model(ids, attention_mask=mask, return_routes=True)
    E = model.config.num_experts
    for r, route_BT in zip(model.routers(), routes):
        real = route_BT[mask.bool()]
        expect = torch.bincount(torch.where(real < 0, E, real), minlength=E + 1).float()
        assert torch.equal(r.load_counts, expect) and expect[E] > 0 and r.load_counts.sum() == mask.sum()
    first = [r.load_counts.clone() for r in model.routers()]
    with torch.no_grad():                                   # a second micro-batch before the update: counts add up
        model(ids[:2])
    for r, c in zip(model.routers(), first):
        assert r.load_counts.sum() == c.sum() + 2 * 12 and (r.load_counts >= c).all()
    model.update_balancing_biases()
    assert all(s["max_mean"] != s["max_mean"] and s["skip"] != s["skip"] for s in model.expert_load_stats())  # nan
    with torch.no_grad():
        model(ids, attention_mask=mask)
    stats = model.expert_load_stats()
    for s, r in zip(stats, model.routers()):
        assert s["skip"] == pytest.approx(float(r.load_counts[E] / r.load_counts.sum()))
        assert s["max_mean"] == pytest.approx(float(r.load_counts[:E].max() / r.load_counts[:E].mean()))


def test_bias_balancing_with_skip_active():
    """Balancing alone (routers fixed, no training) on a model that routes ~40% of tokens to skip: the expert load
    evens out, the skip bias keeps its value, and skip keeps a share (balancing acts among the experts only).
    Putting skip tokens into the load denominator makes every expert look underloaded, so all expert biases rise
    and skip dies out (measured: skip share 0.00 at the end, vs 0.20 here)."""
    model = _skewed_router_model()
    data = torch.randint(0, 128, (64, 32))
    route_share_to_skip(model.eval(), data, 0.4, sharpen=1.0)
    skip_bias = [float(r.balancing_biases[-1]) for r in model.routers()]
    model.train()
    model.balance_lr = 3e-2
    counts = []
    with torch.no_grad():
        for step in range(60):
            model(data[torch.randint(0, 64, (16,))])
            counts.append(torch.stack([r.load_counts for r in model.routers()]))
            model.update_balancing_biases()
    (load0, skip0), (load1, skip1) = _pooled_load(counts[:5]), _pooled_load(counts[-10:])
    print(f"balancing with skip: load {load0:.2f} -> {load1:.2f}, skip share {skip0:.2f} -> {skip1:.2f}")
    assert skip0 > 0.3 and load0 > 2.0                   # measured 0.47, 2.42
    assert load1 < 1.3                                   # measured 1.15
    assert skip1 > 0.1                                   # measured 0.20
    assert [float(r.balancing_biases[-1]) for r in model.routers()] == skip_bias


def test_overfits_fixed_batch():
    torch.manual_seed(0)
    model = ZayaForCausalLM(tiny_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = torch.randint(0, 128, (4, 24))
    losses = []
    for _ in range(150):
        loss = F.cross_entropy(model(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        model.update_balancing_biases()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.1 * losses[0]


def test_lm_head_logprobs_hand_values_and_chunked_equals_full():
    """Hand values, then the chunked (recomputing) path against log_softmax of the full logits: values and
    gradients for h and W, ignored targets (-100) scoring 0 with no gradient, a chunk that does not divide N."""
    from openzaya.model import lm_head_logprobs
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])                 # row 0: probs (0.75, 0.25); row 1: (0.5, 0.5)
    assert torch.allclose(lm_head_logprobs(h, w, torch.tensor([1, 0])), torch.tensor([math.log(0.25), math.log(0.5)]))

    torch.manual_seed(0)
    N, D, V = 301, 16, 50
    h = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, V, (N,))
    t[::7] = -100
    g = torch.randn(N, dtype=torch.float64)
    ref = torch.log_softmax(h @ w.T, -1).gather(1, t.clamp_min(0)[:, None])[:, 0] * (t >= 0)
    (ref * g).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    for budget in (N * V, 40 * V):                                       # one chunk (plain graph), 8 chunks
        h.grad = w.grad = None
        out = lm_head_logprobs(h, w, t, max_chunk_logits=budget)
        (out * g).sum().backward()
        assert out.dtype == torch.float32 and (out[::7] == 0).all()
        assert torch.allclose(out.double(), ref, atol=1e-5)
        assert torch.allclose(h.grad, gh, atol=1e-5) and torch.allclose(w.grad, gw, atol=1e-5)


def test_token_logprobs_equals_forward_logits():
    model = random_model(tiny_config(), seed=1, noise=0.3)
    ids = torch.randint(0, 128, (2, 20))
    targets = ids[:, 1:].clone()
    targets[0, :3] = -100
    lp = model.token_logprobs(ids, targets)
    ref = torch.log_softmax(model(ids)[:, :-1], -1).gather(-1, targets.clamp_min(0)[..., None])[..., 0]
    assert torch.allclose(lp, ref * (targets >= 0), atol=1e-5) and (lp[0, :3] == 0).all()


def test_param_counts_match_module_and_spec():
    for cfg in CONFIGS.values():
        model = ZayaForCausalLM(cfg)
        assert count_params(cfg)["total"] == sum(p.numel() for p in model.parameters())
    c = count_params(zaya1_8b())
    # spec §7: 8.30B non-embedding, 0.537B tied embedding, 8.84B stored, ~0.754B active (excl. embedding)
    assert abs(c["non_embedding"] / 1e9 - 8.30) < 0.01
    assert abs(c["embedding"] / 1e9 - 0.537) < 0.001
    assert abs(c["total"] / 1e9 - 8.84) < 0.01
    assert abs(c["active_per_token"] / 1e9 - 0.754) < 0.005


def test_config_roundtrip_and_errors(tmp_path):
    cfg = tiny_config()
    cfg.save(tmp_path / "config.json")
    assert ZayaConfig.load(tmp_path) == cfg
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        tiny_config(num_experts_per_tok=2)
    with pytest.raises(ValueError, match="sliding_window"):
        tiny_config(sliding_window=None)
    with pytest.raises(ValueError, match="layer_types"):
        tiny_config(layer_types=["hybrid", "dense", "hybrid"])
    with pytest.raises(ValueError, match="legacy"):
        ZayaConfig.from_dict({"model_type": "zaya", "zaya_layers": ["a", 16]})


def test_transformers_config_reads_ours():
    from zaya_ref import hf_config

    cfg = tiny_config()
    h = hf_config(cfg)
    assert ZayaConfig.from_dict(h.to_dict()) == cfg


def test_cache_overflow_is_a_clear_error():
    model = random_model(CONFIGS["sliding"])
    cache = ZayaCache(model.config, 1, 8)
    with pytest.raises(ValueError, match="cache overflow"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_inference_weight_caches_follow_weight_updates():
    """Derived weights cached for no-grad decoding (fused q/k/v, composed convolution) are rebuilt after updates."""
    model = random_model(CONFIGS["sliding"])
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        before = model(ids)
        for name, p in model.named_parameters():
            if "qkv_proj" in name:
                p.mul_(1.5)
        after = model(ids)
    assert not torch.allclose(before, after)
    assert torch.allclose(after, model(ids), atol=0)           # grad on: no cache, same numbers


def _dense_experts(experts, x_ND, route_N, weight_N):
    """A naive per-token loop over the experts, in x's dtype: skip (-1) rows are zero."""
    out = torch.zeros_like(x_ND)
    for n, e in enumerate(route_N.tolist()):
        if e >= 0:
            gate, up = (experts.gate_up_proj[e] @ x_ND[n]).chunk(2)
            out[n] = (experts.down_proj[e] @ (F.silu(gate) * up)) * weight_N[n].to(x_ND.dtype)
    return out


def test_experts_low_precision_and_which_path_runs(monkeypatch):
    """bf16 and fp16 experts (router weights stay fp32) give x's dtype and the fp32 result within their rounding, on
    the grouped, looped and sync-free paths; more tokens than hidden units (N > D). The path taken: the grouped GEMM
    by default (fp32, bf16), the per-expert loop when use_grouped_mm is False (the fallback the dispatch tests rely
    on) and for fp16 on the CPU (`_has_grouped_mm` leaves fp16 to the loop there)."""
    from openzaya.model import Experts, _experts_forward, _experts_forward_static

    cfg = tiny_config()
    experts = random_model(cfg, seed=7).model.layers[0].mlp.experts
    assert Experts(cfg).use_grouped_mm is True
    N = cfg.hidden_size + 9
    torch.manual_seed(0)
    x = torch.randn(N, cfg.hidden_size)
    route = torch.randint(-1, cfg.num_experts, (N,))
    w = torch.rand(N)
    calls = []
    grouped = F.grouped_mm
    monkeypatch.setattr(F, "grouped_mm", lambda *a, **k: calls.append(a[0].dtype) or grouped(*a, **k))
    with torch.no_grad():
        want = _dense_experts(experts, x, route, w)
        for dtype, tol in [(torch.float32, 1e-5), (torch.bfloat16, 0.05), (torch.float16, 0.01)]:
            args = (x.to(dtype), route, w, experts.gate_up_proj.to(dtype), experts.down_proj.to(dtype))
            for use_grouped in (True, False):
                calls.clear()
                for fn in (_experts_forward, _experts_forward_static):
                    y = fn(*args, use_grouped)
                    assert y.dtype == dtype and (y[route < 0] == 0).all()
                    err = (y.float() - want).abs().max().item()
                    assert err < tol * want.abs().max().item(), (dtype, use_grouped, fn.__name__, err)
                grouped_expected = use_grouped and dtype != torch.float16
                assert calls == ([dtype] * 4 if grouped_expected else []), (dtype, use_grouped, calls)


def test_router_weights_eda_and_norm_eps():
    """Router.forward by hand from its own probabilities: the combine weight is the chosen expert's probability,
    0 for skip and padding; block 0 has no EDA state, so a latent passed to it changes nothing, while block 1 adds
    r_prev * scale; the router MLP's norm uses the config's eps (tiny latents show it)."""
    cfg = tiny_config()
    model = random_model(cfg, noise=0.5)
    r0, r1 = model.routers()[:2]
    torch.manual_seed(1)
    x = torch.randn(12, cfg.hidden_size)
    r_prev = torch.randn(12, cfg.router_hidden_size)
    keep = torch.ones(12, dtype=torch.bool)
    keep[:2] = False
    with torch.no_grad():
        p = torch.softmax(r1.router_mlp(r1.down_proj(x) + r_prev * r1.router_states_scale), -1)
        margin = (p[:, :-1] + r1.balancing_biases[:-1]).max(-1).values - p[:, -1]
        r1.balancing_biases[-1] = margin.median()                           # about half the tokens skip
        route, weight, r_NR = r1(x, r_prev, keep)
        want_r = r1.down_proj(x) + r_prev * r1.router_states_scale
        probs = torch.softmax(r1.router_mlp(want_r), -1)
        choice = (probs + r1.balancing_biases).argmax(-1)
        want_route = torch.where(keep & (choice < cfg.num_experts), choice, -1)
        assert torch.equal(r_NR, want_r) and torch.equal(route, want_route)
        assert (route[2:] == -1).any() and (route >= 0).any()
        assert torch.equal(weight, torch.where(want_route >= 0, probs.gather(1, choice[:, None])[:, 0], 0.0))
        assert torch.equal(r0(x, r_prev, None)[2], r0(x, None, None)[2])
        norm = r1.router_mlp.norm
        tiny = torch.full((1, cfg.router_hidden_size), 1e-3)                # mean square 1e-6 next to eps 1e-5
        assert torch.allclose(norm(tiny), norm.weight * 1e-3 / math.sqrt(1e-6 + cfg.rms_norm_eps), rtol=1e-5)


def _eq5_by_hand(windows, E, lr, betas, eps):
    """The balancing biases after each window of load counts [E+1] by eq. 5 (p_e over routed tokens, at least 1 in
    the denominator; AdamW-style moments with bias correction), from zero expert biases."""
    b1, b2 = betas
    m, v, bias, out = [0.0] * E, [0.0] * E, [0.0] * E, []
    for step, counts in enumerate(windows, start=1):
        routed = max(sum(counts[:E]), 1.0)
        for e in range(E):
            g = counts[e] / routed - 1 / E
            m[e] = b1 * m[e] + (1 - b1) * g
            v[e] = b2 * v[e] + (1 - b2) * g * g
            bias[e] -= lr * (m[e] / (1 - b1 ** step)) / ((v[e] / (1 - b2 ** step)) ** 0.5 + eps)
        out.append(list(bias))
    return out


def test_balancing_update_arguments_small_counts_and_one_rank_group(tmp_path):
    """Eq. 5 with the update's own betas and eps (a large eps shows its sign), windows of a single routed token and
    of none (the denominator is at least 1: nothing routed moves every bias up by the same amount), and the
    all-reduce branch under an initialised one-rank gloo group: the same numbers."""
    import torch.distributed as dist

    model = ZayaForCausalLM(tiny_config(num_hidden_layers=1, layer_types=["hybrid"], sliding_window=None))
    model.balance_lr = 0.1
    r = model.routers()[0]
    r.balancing_biases[:4] = 0.0
    windows = [[1.0, 0.0, 0.0, 0.0, 5.0], [0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0, 3.0],
               [3.0, 0.0, 1.0, 2.0, 1.0]]
    want = _eq5_by_hand(windows, 4, 0.1, (0.5, 0.9), 0.3)
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        for i, (counts, expect) in enumerate(zip(windows, want)):
            if i == 2:
                dist.destroy_process_group()
            r.load_counts = torch.tensor(counts)
            model.update_balancing_biases(betas=(0.5, 0.9), eps=0.3)
            torch.testing.assert_close(r.balancing_biases, torch.tensor(expect + [-1.0]), atol=1e-6, rtol=0)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_expert_load_hand_values():
    from openzaya.model import expert_load

    nan = expert_load(None)
    assert nan["max_mean"] != nan["max_mean"] and nan["skip"] != nan["skip"]
    zero = expert_load(torch.zeros(5))
    assert zero["max_mean"] != zero["max_mean"] and zero["skip"] != zero["skip"]
    assert expert_load(torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0])) == {"max_mean": 4.0, "skip": 0.75}
    assert expert_load(torch.tensor([0, 0, 0, 2])) == {"max_mean": 0.0, "skip": 1.0}     # all skip; int counts
    assert expert_load(torch.tensor([6.0, 2.0, 2.0, 2.0, 0.0])) == {"max_mean": 2.0, "skip": 0.0}


def test_replay_zero_or_skip_picks_the_higher_of_expert0_and_skip():
    """Replayed routes: e >= 0 is expert e, -1 skip, ZERO_OR_SKIP (-2, vLLM's "expert 0 with weight 0") whichever of
    expert 0 and skip scores higher with the balancing biases, expert 0 on a tie; padding stays -1. A router with a
    zero output projection gives every class exactly the same probability, so the biases alone decide."""
    from openzaya.model import ZERO_OR_SKIP

    cfg = tiny_config()
    r = random_model(cfg).routers()[1]
    E = cfg.num_experts
    with torch.no_grad():
        r.router_mlp.out_proj.weight.zero_()
        x, r_prev = torch.randn(5, cfg.hidden_size), torch.randn(5, cfg.router_hidden_size)
        replay = torch.tensor([ZERO_OR_SKIP, 2, -1, ZERO_OR_SKIP, ZERO_OR_SKIP])
        keep = torch.tensor([True, True, True, True, False])
        p = 1 / (E + 1)
        for biases, want in [([0.0, -1.0, 0.0, 0.0, 0.0], [0, 2, -1, 0, -1]),      # expert 0 ties skip: expert 0
                             ([-0.5, 0.5, 0.0, 0.0, 0.0], [-1, 2, -1, -1, -1]),    # skip wins (expert 1 is not 0)
                             ([0.25, 0.0, 0.0, 0.0, -0.5], [0, 2, -1, 0, -1])]:
            r.balancing_biases.copy_(torch.tensor(biases))
            route, weight, _ = r(x, r_prev, keep, replay)
            assert route.tolist() == want
            torch.testing.assert_close(weight, torch.tensor([p if w >= 0 else 0.0 for w in want]))
