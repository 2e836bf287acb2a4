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
        assert s["tokens"] > 0 and s["misses"] > 0 and 0 <= s["demand_hit_rate"] <= 1
        assert 0 <= s["prefetch_hit_rate"] <= 1 and s["demand_hits"] + s["prefetch_hits"] + s["misses"] == s["uses"]
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


# -----------------------------------------------------------------------------
# statistics that tell the truth: demand vs prefetch hits, decode vs prefill, the effective budget, the dtypes


class _CountingSource:
    """A slower tier that fills a slot with the expert's number (no files): enough for the cache's bookkeeping."""

    def read_into(self, layer, e, gate_up, down):
        gate_up.fill_(e)
        down.fill_(e)


def test_cache_counts_demand_hits_prefetch_hits_and_misses_apart():
    from openzaya.offload import OffloadStats, _Loader

    cfg = tiny_config(num_experts=E)
    stats = OffloadStats()
    loader = _Loader(_CountingSource(), torch.device("cpu"), threads=1)
    cache = LayerCache(0, 2, cfg, "cpu", torch.float32, loader, stats)
    seen = []
    run = lambda needed: cache.run(needed, lambda e, gu, dn: seen.append((e, int(gu[0, 0]))))   # noqa: E731
    run([0])                    # miss
    run([0])                    # demand hit
    cache.prefetch([1])         # loaded ahead
    run([1])                    # prefetch hit (its first use) ...
    run([1, 0])                 # ... then demand hits
    cache.prefetch([2, 3])      # evicts 1 then 0 (least recently used first)
    run([2, 5])                 # 2: prefetch hit; 5: miss (evicts 3, prefetched and never used)
    d = stats.decode
    assert (d.misses, d.demand_hits, d.prefetch_hits, d.prefetched, d.loads) == (2, 3, 2, 3, 5)
    assert stats.prefill == type(stats.prefill)()     # nothing counted in the other phase
    assert all(e == v for e, v in seen)                # each compute saw its own expert's weights
    s = stats.summary()["decode"]
    assert s["uses"] == 7 and s["prefetch_accuracy"] == 2 / 3 and s["loads_per_token"] == 5   # no tokens: per 1
    assert (s["demand_hit_rate"], s["prefetch_hit_rate"], s["miss_rate"]) == (3 / 7, 2 / 7, 2 / 7)
    loader.close()


def _uses_per_phase(model, prompts, n_new):
    """Every (layer, expert) use of a greedy generate, from the routes the resident model takes: prefill counts the
    distinct experts of each layer over the admitted rows (one forward), decode those of each step."""
    from openzaya.engine import Engine

    eng = Engine(model, max_slots=len(prompts), max_len=64)
    res = eng.generate(prompts, GenParams(temperature=0, max_new_tokens=n_new, eos_ids=[]), return_routes=True)
    P = max(len(p) for p in prompts)
    prefill = sum(len({int(x) for r, p in zip(res, prompts) for x in r.routes[layer, :len(p)] if x >= 0})
                  for layer in range(model.config.num_hidden_layers))
    decode = sum(len({int(r.routes[layer, len(p) + t]) for r, p in zip(res, prompts)} - {-1})
                 for layer in range(model.config.num_hidden_layers) for t in range(n_new - 1))
    return prefill, decode, [r.tokens for r in res], P


def test_decode_and_prefill_counted_apart(ckpt):
    cfg = ZayaConfig.load(ckpt)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 7)]
    n_new = 6
    want_prefill, want_decode, want_tokens, _ = _uses_per_phase(resident(ckpt), prompts, n_new)
    for prefetch in (False, True):
        model = load_offloaded(ckpt, fraction=1 / E, prefetch=prefetch)   # one slot: decode loads, prefetch acts
        got = Engine(model, max_slots=3, max_len=64).generate(prompts, GenParams(temperature=0, max_new_tokens=n_new,
                                                                                 eos_ids=[]))
        assert [r.tokens for r in got] == want_tokens
        s = model.offload.stats.summary()
        pre, dec = s["prefill"], s["decode"]
        assert pre["tokens"] == sum(len(p) for p in prompts) and dec["tokens"] == 3 * (n_new - 1)
        assert (pre["uses"], dec["uses"]) == (want_prefill, want_decode)
        for ph in (pre, dec):
            assert ph["demand_hits"] + ph["prefetch_hits"] + ph["misses"] == ph["uses"]
            assert ph["loads"] == ph["misses"] + ph["prefetched"]
            assert ph["loads_per_token"] == ph["loads"] / ph["tokens"]
            assert ph["prefetch_hits"] <= ph["prefetched"]
        assert s["tokens"] == pre["tokens"] + dec["tokens"] and s["uses"] == pre["uses"] + dec["uses"]
        if not prefetch:
            assert s["prefetch_hits"] == s["prefetched"] == 0
        else:
            assert dec["prefetched"] > 0
        assert "decode: demand hits" in model.offload.stats.line()
        model.offload.close()


def test_effective_budget_is_stated_when_it_differs(ckpt):
    import warnings

    cfg = ZayaConfig.load(ckpt)
    with pytest.warns(UserWarning, match=f"2 of {E} experts per layer"):
        model = load_offloaded(ckpt, fraction=0.3)             # 2.4 experts per layer: 2 (25%)
    st = model.offload.stats
    assert st.slots == 2 and st.budget_bytes == 2 * cfg.num_hidden_layers * expert_nbytes(cfg)
    assert st.requested_budget_bytes == round(0.3 * all_expert_nbytes(cfg)) > st.budget_bytes
    s = st.summary()
    assert (s["budget_fraction"], s["requested_budget_bytes"]) == (0.25, st.requested_budget_bytes)
    assert "asked 30.0%" in st.line() and "25.0% of float32 experts" in st.line()
    model.offload.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # an exact budget: nothing to say
        model = load_offloaded(ckpt, fraction=0.25)
    assert model.offload.stats.budget_note() is None
    model.offload.close()


def test_compute_dtype_apart_from_expert_storage_dtype(ckpt, tmp_path):
    """A bf16 checkpoint computed in float32: the experts stay bf16 in the cache (the budget buys bf16 experts, as
    many as its bytes hold), are cast when used, and the logits equal the resident float32 model's; asking for
    float32 storage doubles the bytes of each expert."""
    save_pretrained(from_pretrained(ckpt), tmp_path / "bf16", dtype=torch.bfloat16)
    cfg = ZayaConfig.load(tmp_path / "bf16")
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    ref = from_pretrained(tmp_path / "bf16", dtype=torch.float32)
    for layer in ref.model.layers:
        layer.mlp.experts.use_grouped_mm = False
    with torch.no_grad():
        want = ref(ids)
    budget = 4 * cfg.num_hidden_layers * expert_nbytes(cfg, torch.bfloat16)
    for expert_dtype, slots in ((None, 4), (torch.float32, 2)):
        model = load_offloaded(tmp_path / "bf16", budget, dtype=torch.float32, expert_dtype=expert_dtype)
        st = model.offload.stats
        stored = expert_dtype or torch.bfloat16
        assert model.offload.caches[0].gate_up_SKD.dtype == stored and st.slots == slots
        assert st.expert_bytes == expert_nbytes(cfg, stored) and st.budget_bytes == budget
        assert (st.compute_dtype, st.expert_dtype) == ("float32", str(stored).replace("torch.", ""))
        assert model.model.embed_tokens.weight.dtype == torch.float32
        with torch.no_grad():
            assert torch.equal(model(ids), want)
        model.offload.close()
