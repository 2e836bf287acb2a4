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
