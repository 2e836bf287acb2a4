"""Shared helpers for tests: tiny random ZAYA configs and the transformers reference model with our weights."""

import torch

from openzaya.model import ZayaConfig, ZayaForCausalLM


def tiny_config(**kw) -> ZayaConfig:
    base = dict(vocab_size=128, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, moe_intermediate_size=32, num_experts=4, router_hidden_size=8,
                layer_types=["hybrid", "hybrid_sliding", "hybrid"], sliding_window=5)
    base.update(kw)
    return ZayaConfig(**base)


def random_model(cfg: ZayaConfig, seed: int = 0, noise: float = 0.1) -> ZayaForCausalLM:
    """A model whose every parameter (and balancing bias) is perturbed, so no init symmetry hides a bug."""
    torch.manual_seed(seed)
    model = ZayaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
        for r in model.routers():
            r.balancing_biases.add_(torch.randn_like(r.balancing_biases) * 0.05)
    return model


def hf_config(cfg: ZayaConfig):
    import transformers

    d = cfg.to_dict()
    for k in ("dtype", "architectures", "model_type"):
        d.pop(k)
    return transformers.ZayaConfig(**d)


def reference_from(model: ZayaForCausalLM):
    """transformers.ZayaForCausalLM holding exactly our weights (fp32, eager-free default attention)."""
    import transformers

    ref = transformers.ZayaForCausalLM(hf_config(model.config)).eval()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert unexpected == [] and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return ref


@torch.no_grad()
def route_share_to_skip(model: ZayaForCausalLM, ids, share: float = 0.5, attention_mask=None, sharpen: float = 10.0,
                        min_gap: float = 1e-4) -> ZayaForCausalLM:
    """Set each router's skip bias so that about `share` of the real tokens of `ids` take the skip class (route -1).

    With the default skip bias (-1) skip never wins, so parity and cache tests would never exercise it. First the
    routers' output projections are scaled by `sharpen`: a small random router gives every token nearly the same
    probabilities, so no bias would split the tokens. Then, layer by layer
    (a layer's routes change what later routers see): the margin m_n = max_e(p_e + b_e) - p_skip of every real token
    is read from the router's logits; skip wins exactly when b_skip > m_n, so b_skip is put in the middle of the
    widest gap between sorted margins near the `share` quantile. That gap is kept >= `min_gap`, so a rounding
    difference between two implementations cannot flip a route. Expert biases are left as they are. Returns model."""
    keep_N = None if attention_mask is None else attention_mask.reshape(-1).bool()
    for r in model.routers():
        r.router_mlp.out_proj.weight.mul_(sharpen)
    for r in model.routers():
        logits = []
        hook = r.router_mlp.register_forward_hook(lambda mod, args, out: logits.append(out.detach()))
        model(ids, attention_mask=attention_mask)
        hook.remove()
        p_NC = torch.softmax(logits[0].float(), dim=-1)
        if keep_N is not None:
            p_NC = p_NC[keep_N]
        b = r.balancing_biases.float()
        margin_N = (p_NC[:, :-1] + b[:-1]).max(-1).values - p_NC[:, -1]
        m = margin_N.sort().values
        n = m.numel()
        lo, hi = max(1, int(n * (share - 0.15))), min(n - 1, int(n * (share + 0.15)))
        gaps = m[lo:hi + 1] - m[lo - 1:hi]
        i = int(gaps.argmax())
        assert gaps[i] >= min_gap, f"no gap of {min_gap} between router margins near the {share} quantile"
        r.balancing_biases[-1] = (m[lo - 1 + i] + m[lo + i]) / 2
    return model
