"""Muon + AdamW (openzaya/optim.py).  Run: .venv/bin/python -m pytest tests/test_optim.py"""

import torch

from openzaya.optim import MuonAdamW, build_optimizer, newton_schulz, split_params
from tests.zaya_ref import tiny_config
from openzaya.model import ZayaForCausalLM


def test_newton_schulz_orthogonalises():
    g = torch.Generator().manual_seed(0)
    for shape in [(32, 16), (16, 48), (3, 20, 12)]:   # tall, wide, batched (experts)
        G = torch.randn(*shape, generator=g)
        X = newton_schulz(G, steps=5)
        s = torch.linalg.svdvals(X)
        assert s.min() > 0.5 and s.max() < 1.3, s        # the quintic iteration lands near 1, not exactly on it
        U, _, Vh = torch.linalg.svd(G, full_matrices=False)
        polar = U @ Vh
        cos = (X * polar).sum((-2, -1)) / (X.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cos > 0.95).all(), cos                   # same direction as the exact polar factor U V^T
        # scale invariance: orthogonalisation ignores the gradient's magnitude
        torch.testing.assert_close(newton_schulz(G * 1000.0), X, atol=1e-4, rtol=1e-4)


def test_adamw_path_matches_torch():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5, 3))
    p2 = torch.nn.Parameter(p1.detach().clone())
    ours = MuonAdamW([dict(params=[p1], kind="adamw", lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)])
    ref = torch.optim.AdamW([p2], lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    for i in range(10):
        g = torch.randn(5, 3)
        p1.grad, p2.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p1, p2, atol=1e-6, rtol=1e-6)


def test_muon_step_and_split():
    model = ZayaForCausalLM(tiny_config())
    muon, adamw = split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    mnames = {names[id(p)] for p in muon}
    anames = {names[id(p)] for p in adamw}
    assert "model.embed_tokens.weight" in anames                        # embedding / tied head: AdamW
    assert any(n.endswith("experts.gate_up_proj") for n in mnames)     # 3D expert tensors: Muon
    assert any(n.endswith("q_proj.weight") for n in mnames)
    assert all(model.get_parameter(n).ndim == 1 for n in anames if "conv" not in n and "embed" not in n)
    assert len(muon) + len(adamw) == len(list(model.parameters()))
    # one Muon step on a matrix moves it by lr * 0.2 * sqrt(max dim) * (near-orthogonal matrix)
    w = torch.nn.Parameter(torch.zeros(8, 32))
    opt = MuonAdamW([dict(params=[w], kind="muon", lr=0.1, momentum=0.0, nesterov=False, weight_decay=0.0)])
    w.grad = torch.randn(8, 32)
    opt.step()
    rms = w.detach().pow(2).mean().sqrt()
    expected = 0.1 * 0.2 * 32 ** 0.5 * (8 / (8 * 32)) ** 0.5            # orthogonal 8x32: RMS = 1/sqrt(32)
    assert abs(rms - expected) / expected < 0.3


def test_state_dict_round_trip_continues_identically():
    """A Muon + AdamW optimizer saved after two steps and loaded into a fresh one (fresh model copy) continues exactly
    as the original: same momentum buffers and Adam moments, same next step."""
    import copy

    torch.manual_seed(0)
    model = ZayaForCausalLM(tiny_config())
    opt = build_optimizer(model, 1e-2)
    grads = [{n: torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]

    def step(m, o, g):
        for n, p in m.named_parameters():
            p.grad = g[n].clone()
        o.step()

    for g in grads[:2]:
        step(model, opt, g)
    sd = copy.deepcopy(opt.state_dict())
    assert len(sd["state"]) == len(list(model.parameters()))        # every parameter has state after a step
    twin, fresh = copy.deepcopy(model), copy.deepcopy(model)
    twin_opt = build_optimizer(twin, 1e-2)
    twin_opt.load_state_dict(sd)
    for m, o in ((model, opt), (twin, twin_opt), (fresh, build_optimizer(fresh, 1e-2))):
        step(m, o, grads[2])
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n
    # the same step from an optimizer without the loaded state lands elsewhere: the round trip carried something
    assert not all(torch.equal(a, b) for a, b in zip(fresh.parameters(), twin.parameters()))
