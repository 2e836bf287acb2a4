"""Checkpoint tests: native HF layout both ways, sharding, dtypes, atomic saves, clear errors.

Run: .venv/bin/python -m pytest tests/test_checkpoint.py
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import openzaya.checkpoint as ckpt
from openzaya.checkpoint import from_pretrained, save_pretrained
from zaya_ref import random_model, tiny_config


def _ids():
    return torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))


def test_ours_to_transformers_and_back(tmp_path):
    import transformers

    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "ours")
    ref = transformers.ZayaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    # NOTE: transformers re-initialises balancing_biases on load (spec §10.1 item 9): put the stored ones back
    # from the file itself, so the comparison checks everything else that transformers read.
    with safe_open(tmp_path / "ours" / "model.safetensors", "pt") as f:
        for i, layer in enumerate(ref.model.layers):
            layer.mlp.gate.balancing_biases.copy_(f.get_tensor(f"model.layers.{i}.mlp.gate.balancing_biases"))
    with torch.no_grad():
        assert (ref(_ids()).logits - model(_ids())).abs().max() < 1e-5

    ref.save_pretrained(tmp_path / "theirs")
    back = from_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        assert (back(_ids()) - model(_ids())).abs().max() < 1e-5


def test_loads_stored_balancing_biases(tmp_path):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "m")
    back = from_pretrained(tmp_path / "m")
    for a, b in zip(model.routers(), back.routers()):
        assert torch.equal(a.balancing_biases, b.balancing_biases)


def test_sharded_roundtrip_and_bf16(tmp_path):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "m", max_shard_bytes=20_000)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    back = from_pretrained(tmp_path / "m")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    half = from_pretrained(tmp_path / "m", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    assert half.routers()[0].balancing_biases.dtype == torch.float32
    with torch.no_grad():
        err = (half(_ids()) - model(_ids())).abs().max().item()
    # bf16 weights, fp32 residual stream: measured 0.015; zeroing every expert's gate_up_proj moves the fp32
    # logits by 0.11 here, so the bound (3x the measured error) still sees a lost expert
    assert err < 0.05, err


def test_crash_mid_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "m")
    before = (tmp_path / "m" / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    with pytest.raises(OSError, match="simulated"):
        save_pretrained(model, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == before
    from_pretrained(tmp_path / "m")


def test_clear_errors(tmp_path):
    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "m")
    sd = ckpt.load_state_dict(tmp_path / "m")

    bad = dict(sd)
    bad.pop("model.layers.1.self_attn.o_proj.weight")
    save_file(bad, tmp_path / "m" / "model.safetensors")
    with pytest.raises(KeyError, match="model.layers.1.self_attn.o_proj.weight"):
        from_pretrained(tmp_path / "m")

    bad = dict(sd)
    bad["model.norm.weight"] = torch.ones(7)
    save_file(bad, tmp_path / "m" / "model.safetensors")
    with pytest.raises(ValueError, match="model.norm.weight"):
        from_pretrained(tmp_path / "m")

    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["num_experts_per_tok"] = 2
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        from_pretrained(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        from_pretrained(tmp_path / "nowhere")
