"""Dynamic expert offloading (openzaya/offload.py): identical outputs at every budget, the budget is never exceeded
(cache accounting and process RSS), native checkpoints read as they are, Engine and LocalBackend integration.

Run: .venv/bin/python -m pytest tests/test_offload.py
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open

from openzaya.backends import LocalBackend, Request, SamplingParams
from openzaya.checkpoint import from_pretrained, save_pretrained
from openzaya.engine import Engine, GenParams
from openzaya.model import ZayaConfig, ZayaForCausalLM
from openzaya.offload import (DiskExperts, LayerCache, all_expert_nbytes, budget_to_slots, expert_key,
                              expert_nbytes, load_offloaded, projected_resident_bytes)
from zaya_ref import random_model, tiny_config

E = 8


def diverse_router_model(cfg, seed=0):
    """A random model whose routers spread tokens over many experts (init routers send nearly all to one)."""
    model = random_model(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for r in model.routers():
            r.balancing_biases.zero_()
            for p in r.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * 3 * p.shape[1] ** -0.5)
    return model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_config(num_experts=E)
    path = tmp_path_factory.mktemp("offload") / "m"
    save_pretrained(diverse_router_model(cfg), path, max_shard_bytes=60_000)   # sharded on purpose
    assert (path / "model.safetensors.index.json").exists()
    return path


def resident(path, grouped=False):
    model = from_pretrained(path)
    for layer in model.model.layers:
        layer.mlp.experts.use_grouped_mm = grouped
    return model


def test_disk_reader_matches_safetensors_slices(ckpt, tmp_path):
    cfg = ZayaConfig.load(ckpt)
    files = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    disk = DiskExperts(ckpt, cfg)
    I, D = cfg.moe_intermediate_size, cfg.hidden_size
    for layer in range(cfg.num_hidden_layers):
        for e in (0, 3, E - 1):
            gu, dn = torch.empty(2 * I, D), torch.empty(D, I)
            disk.read_into(layer, e, gu, dn)
            for which, got in (("gate_up_proj", gu), ("down_proj", dn)):
                with safe_open(ckpt / files[expert_key(layer, which)], framework="pt") as f:
                    assert torch.equal(got, f.get_slice(expert_key(layer, which))[e])
    disk.close()
    # bf16 on disk, read into fp32 (cast) and into bf16 (direct)
    save_pretrained(from_pretrained(ckpt), tmp_path / "bf16", dtype=torch.bfloat16)
    disk = DiskExperts(tmp_path / "bf16", cfg)
    gu16, dn16, gu32, dn32 = torch.empty(2 * I, D, dtype=torch.bfloat16), torch.empty(D, I, dtype=torch.bfloat16), \
        torch.empty(2 * I, D), torch.empty(D, I)
    disk.read_into(1, 5, gu16, dn16)
    disk.read_into(1, 5, gu32, dn32)
    with safe_open(tmp_path / "bf16" / "model.safetensors", framework="pt") as f:
        ref = f.get_slice(expert_key(1, "gate_up_proj"))[5]
    assert torch.equal(gu16, ref) and torch.equal(gu32, ref.float())
    disk.close()


@pytest.mark.parametrize("slots", [1, 2, 4, E])
@pytest.mark.parametrize("prefetch,policy", [(False, "lru"), (True, "lru"), (True, "lfu")])
def test_logits_identical_at_every_budget(ckpt, slots, prefetch, policy):
    cfg = ZayaConfig.load(ckpt)
    ids = torch.randint(0, cfg.vocab_size, (3, 17), generator=torch.Generator().manual_seed(slots))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0                                                     # left padding in one row
    budget = slots * cfg.num_hidden_layers * expert_nbytes(cfg)
    model = load_offloaded(ckpt, budget, prefetch=prefetch, policy=policy)
    with torch.no_grad():
        got = model(ids, mask)
        loop = resident(ckpt)(ids, mask)
        grouped = resident(ckpt, grouped=True)(ids, mask)
    assert torch.equal(got, loop)                                       # same ops on the same values
    torch.testing.assert_close(got, grouped, atol=1e-5, rtol=1e-5)
    s = model.offload.stats.summary()
    assert s["tokens"] == int(mask.sum())
    assert s["resident_bytes"] <= s["budget_bytes"] == budget
    assert max(model.offload.stats.resident) <= slots
    model.offload.close()


def test_budget_validation(ckpt):
    cfg = ZayaConfig.load(ckpt)
    one = expert_nbytes(cfg)
    assert budget_to_slots(cfg, fraction=1.0) == E
    assert budget_to_slots(cfg, budget_bytes=10**12) == E
    assert budget_to_slots(cfg, budget_bytes=3 * one * cfg.num_hidden_layers + 1) == 3
    with pytest.raises(ValueError, match="below one expert per layer"):
        load_offloaded(ckpt, one * cfg.num_hidden_layers - 1)
    with pytest.raises(ValueError, match="exactly one"):
        budget_to_slots(cfg)
    p = projected_resident_bytes(cfg, 0.25, bytes_per_param=4)
    assert p["expert_bytes"] == all_expert_nbytes(cfg)
    assert p["resident_bytes"] == p["non_expert_bytes"] + p["expert_bytes"] // 4


def test_engine_greedy_tokens_identical_and_budget_never_exceeded(ckpt, monkeypatch):
    peak = {"over": 0}
    orig = LayerCache._load

    def checked_load(self, e, slot):     # the resident set is checked after every single load
        orig(self, e, slot)
        assert len(self.slot_of) <= self.slots and self.stats.resident[self.layer] == len(self.slot_of)
        peak["over"] = max(peak["over"], sum(self.stats.resident) * self.stats.expert_bytes - self.stats.budget_bytes)

    monkeypatch.setattr(LayerCache, "_load", checked_load)
    cfg = ZayaConfig.load(ckpt)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 5, 12, 7, 4)]
    params = [GenParams(temperature=0, max_new_tokens=n, eos_ids=[]) for n in (6, 14, 3, 10, 8, 12)]
    ref = Engine(resident(ckpt), max_slots=3, max_len=64)
    want = {c: ref.generate(prompts, params, continuous=c) for c in (True, False)}
    for slots in (1, 3, E):
        model = load_offloaded(ckpt, fraction=slots / E)
        eng = Engine(model, max_slots=3, max_len=64)
        for continuous in (True, False):
            got = eng.generate(prompts, params, continuous=continuous)
            assert [r.tokens for r in got] == [r.tokens for r in want[continuous]]
            for a, b in zip(got, want[continuous]):
                torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
        s = model.offload.stats.summary()
        assert s["tokens"] > 0 and s["misses"] > 0 and 0 <= s["hit_rate"] <= 1
        if slots == E:
            assert s["loads"] <= E * cfg.num_hidden_layers       # everything fits: each expert loaded once
        model.offload.close()
    assert peak["over"] <= 0


def test_local_backend_with_expert_cache(tmp_path):
    from test_local_backend import make_checkpoint

    path = make_checkpoint(tmp_path / "m")
    cfg = ZayaConfig.load(path)
    reqs = [Request(prompt="1 plus 2 is", params=SamplingParams(temperature=0, max_tokens=8)),
            Request(prompt="3 plus 4 is", params=SamplingParams(temperature=1.0, max_tokens=6, n=2, seed=3))]
    want = LocalBackend(path, max_slots=4, max_len=64).generate(reqs)
    gb = 2 * cfg.num_hidden_layers * expert_nbytes(cfg) / 1024**3
    backend = LocalBackend(path, max_slots=4, max_len=64, expert_cache_gb=gb)
    assert backend.model.offload.stats.budget_bytes <= gb * 1024**3
    got = backend.generate(reqs)
    assert [[c.token_ids for c in r] for r in got] == [[c.token_ids for c in r] for r in want]
    # the CLI flag of solve / eval reaches the backend
    from openzaya import cli

    a = cli.build_parser().parse_args(["solve", "q", "--model", str(path), "--expert-cache-gb", str(gb)])
    assert cli._backend(a).model.offload.stats.budget_bytes == backend.model.offload.stats.budget_bytes
    a = cli.build_parser().parse_args(["serve", "--model", str(path), "--expert-cache-gb", "0.5"])
    assert a.expert_cache_gb == 0.5
    # a compiled decode step cannot trace the offloaded experts' Python paging: refused, for the backend and the server
    from openzaya.serve import load_app
    with pytest.raises(ValueError, match="offloaded experts"):
        LocalBackend(path, max_slots=4, max_len=64, expert_cache_gb=gb, compile=True)
    with pytest.raises(ValueError, match="offloaded experts"):
        load_app(path, expert_cache_gb=gb, compile=True)


# -----------------------------------------------------------------------------
# Process RSS on a model with ~200 MB of experts: peak RSS grows by the resident bytes, not by all the experts

RSS_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from openzaya.checkpoint import from_pretrained
    from openzaya.offload import load_offloaded

    def kb(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    path, fraction = sys.argv[1], float(sys.argv[2])
    from openzaya.model import ZayaConfig, ZayaForCausalLM
    with torch.device("meta"):        # warm up torch's meta machinery (~70 MB of code and tables, any model size)
        ZayaForCausalLM(ZayaConfig())
    base = kb("VmRSS:")
    if fraction >= 1:   # resident: touch every weight, as a long run that has used every expert does
        model = from_pretrained(path)
        sum(float(p.sum()) for p in model.parameters())
    else:
        model = load_offloaded(path, fraction=fraction)
    with torch.inference_mode():
        for _ in range(3):
            model(torch.randint(0, 100, (2, 24)))
    out = {"peak_delta": kb("VmHWM:") - base}
    if fraction < 1:
        out["stats"] = model.offload.stats.summary()
    print(json.dumps(out))
""")


def _rss(path, fraction):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path), str(fraction)], capture_output=True,
                         text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_process_rss_stays_within_budget(tmp_path):
    cfg = ZayaConfig(vocab_size=256, hidden_size=512, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=64, moe_intermediate_size=512, num_experts=16,
                     router_hidden_size=32)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = ZayaForCausalLM(cfg)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_pretrained(model, tmp_path / "big", max_shard_bytes=64 * 2**20)
    del model
    experts = all_expert_nbytes(cfg)                                   # 3 x 16 x 3 MiB = 144 MiB
    off = _rss(tmp_path / "big", 0.125)
    full = _rss(tmp_path / "big", 1.0)
    s = off["stats"]
    assert s["resident_bytes"] <= s["budget_bytes"] <= 0.125 * experts
    assert full["peak_delta"] > 0.9 * experts, full
    # non-expert weights are ~8 MB here; allow 48 MB for them, activations and allocator slack
    assert off["peak_delta"] < s["budget_bytes"] + 48 * 2**20, (off, experts)
    assert full["peak_delta"] - off["peak_delta"] > 0.9 * (experts - s["budget_bytes"]), (full, off)
    print(f"peak RSS growth: resident {full['peak_delta'] / 2**20:.0f} MiB, offloaded (12.5%) "
          f"{off['peak_delta'] / 2**20:.0f} MiB, experts {experts / 2**20:.0f} MiB")
