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


def test_atomic_file_and_dir_keep_the_old_version_on_a_crash(tmp_path):
    """The one atomic-save helper (trainer checkpoints, RL state, corpus manifests, save_pretrained, the tokenizer
    cache): a crash while writing leaves the previous file or directory; replace=False keeps a published one."""
    path = ckpt.atomic_file(tmp_path / "state.pt", lambda f: f.write(b"v1"))
    assert path.read_bytes() == b"v1"

    def crash(f):
        f.write(b"half of v2")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="simulated"):
        ckpt.atomic_file(path, crash)
    assert path.read_bytes() == b"v1"
    ckpt.atomic_file(path, lambda f: f.write(b"v2"))
    assert path.read_bytes() == b"v2"

    d = ckpt.atomic_dir(tmp_path / "d", lambda tmp: (tmp / "a.txt").write_text("first"))
    ckpt.atomic_dir(d, lambda tmp: (tmp / "a.txt").write_text("second"), replace=False)   # another process won
    assert (d / "a.txt").read_text() == "first"
    ckpt.atomic_dir(d, lambda tmp: (tmp / "b.txt").write_text("third"))
    assert sorted(p.name for p in d.iterdir()) == ["b.txt"]
    with pytest.raises(OSError, match="simulated"):
        ckpt.atomic_dir(d, lambda tmp: crash(open(tmp / "c.txt", "wb")))
    assert sorted(p.name for p in d.iterdir()) == ["b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "state.pt"]   # no temporary or .old left behind


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


# -----------------------------------------------------------------------------
# damaged checkpoints and what killed saves leave behind


def _dead_pid() -> int:
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(p.stdout)


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path):
    """A save killed mid-way leaves its temporary (a whole checkpoint each time); the next save or load of that path
    removes it. Temporaries of live processes and of other hosts are kept."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import textwrap
    import time

    model = random_model(tiny_config())
    save_pretrained(model, tmp_path / "m")
    child = textwrap.dedent(f"""
        import time
        from openzaya.checkpoint import atomic_dir
        def fill(tmp):
            (tmp / "model.safetensors").write_bytes(b"x" * 100000)
            time.sleep(120)
        atomic_dir({str(tmp_path / "m")!r}, fill)
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    tmp = tmp_path / f".m.tmp-{proc.pid}@{socket.gethostname()}"
    t_end = time.monotonic() + 60
    while not (tmp / "model.safetensors").exists() and time.monotonic() < t_end:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert tmp.is_dir()                                         # what a killed save leaves
    dead, host = _dead_pid(), socket.gethostname()
    kept = [tmp_path / f".m.tmp-{os.getppid()}@{host}", tmp_path / f".m.tmp-{dead}@another-host",
            tmp_path / f".other.tmp-{dead}@{host}"]
    for p in kept:
        p.mkdir()
    (tmp_path / f".m.tmp-{dead}").write_bytes(b"old-style name, this host")
    save_pretrained(model, tmp_path / "m")                      # the next save
    assert not tmp.exists() and not (tmp_path / f".m.tmp-{dead}").exists()
    assert all(p.exists() for p in kept)
    (tmp_path / f".m.tmp-{dead}@{host}").mkdir()
    from_pretrained(tmp_path / "m")                             # a load
    assert not (tmp_path / f".m.tmp-{dead}@{host}").exists() and all(p.exists() for p in kept)
    ckpt.atomic_file(tmp_path / "state.pt", lambda f: f.write(b"v1"))
    (tmp_path / f".state.pt.tmp-{dead}@{host}").write_bytes(b"torn")
    ckpt.atomic_file(tmp_path / "state.pt", lambda f: f.write(b"v2"))
    assert not (tmp_path / f".state.pt.tmp-{dead}@{host}").exists()


def _save_with(tmp_path, name, edit):
    model = random_model(tiny_config())
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    edit(sd)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            v.copy_(sd[k])
    save_pretrained(model, tmp_path / name)
    return tmp_path / name


def test_non_finite_weights_are_refused(tmp_path):
    def nan(sd):
        sd["model.layers.1.self_attn.o_proj.weight"][0, 3] = float("nan")

    path = _save_with(tmp_path, "nan", nan)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.o_proj\.weight has 1 non-finite"):
        from_pretrained(path)
    assert from_pretrained(path, check_finite=False).model.layers[1].self_attn.o_proj.weight.isnan().any()
    target = random_model(tiny_config())
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match="o_proj"):
        ckpt.load_weights_into(target, path)
    assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())   # nothing changed
    # a finite float32 weight that a cast to float16 turns into inf
    big = _save_with(tmp_path, "big", lambda sd: sd["model.norm.weight"].fill_(1e6))
    from_pretrained(big)
    with pytest.raises(ValueError, match=r"model\.norm\.weight has 32 non-finite values .* in torch\.float16"):
        from_pretrained(big, dtype=torch.float16)


def test_non_finite_experts_are_refused_when_offloaded(tmp_path):
    from openzaya.offload import load_offloaded

    path = _save_with(tmp_path, "e", lambda sd: sd["model.layers.2.mlp.experts.down_proj"][3].fill_(float("inf")))
    model = load_offloaded(path, fraction=1.0, prefetch=False)   # only the experts a step uses are read
    with pytest.raises(ValueError, match=r"model\.layers\.2\.mlp\.experts\.down_proj\[3\] has \d+ non-finite"):
        with torch.no_grad():
            for _ in range(8):   # until a token routes to expert 3 of layer 2
                model(torch.randint(0, 128, (4, 32)))
    model.offload.close()
    model = load_offloaded(path, fraction=1.0, check_finite=False, prefetch=False)
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 8)))
    model.offload.close()
    nan = _save_with(tmp_path, "n", lambda sd: sd["model.embed_tokens.weight"][5, 0].fill_(float("nan")))
    with pytest.raises(ValueError, match="embed_tokens"):
        load_offloaded(nan, fraction=1.0)


@pytest.mark.parametrize("edit,field", [
    ({"rms_norm_eps": 0}, "rms_norm_eps"), ({"rms_norm_eps": -1e-6}, "rms_norm_eps"),
    ({"rms_norm_eps": float("nan")}, "rms_norm_eps"), ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": float("inf")}}}, "rope_theta"),
    ({"rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": float("nan")}}}, "rope_theta"),
    ({"rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": 0}}}, "rope_theta"),
    ({"rope_parameters": {"hybrid": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0}}},
     "partial_rotary_factor"),
    ({"num_attention_heads": 0}, "num_attention_heads"), ({"num_key_value_heads": 0}, "num_key_value_heads"),
    ({"hidden_size": "32"}, "hidden_size"), ({"head_dim": 8.5}, "head_dim"), ({"vocab_size": -1}, "vocab_size"),
    ({"num_hidden_layers": 1_000_000, "layer_types": None}, "num_hidden_layers"),
    ({"sliding_window": 0}, "sliding_window"), ({"eos_token_id": [1, 10**6]}, "eos_token_id"),
    ({"max_position_embeddings": 0}, "max_position_embeddings"),
])
def test_invalid_config_values_are_refused(tmp_path, edit, field):
    path = tmp_path / "m"
    save_pretrained(random_model(tiny_config()), path)
    cfg = {**json.loads((path / "config.json").read_text()), **edit}
    (path / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}))
    with pytest.raises(ValueError, match=field):
        from_pretrained(path)


def test_config_changes_lists_the_differences():
    old = {"lr": 3e-3, "seq_len": 256, "seed": 0, "out": "a", "steps": 10}
    new = {"lr": 1e-3, "seq_len": 512, "seed": 0, "out": "b", "steps": 10, "extra": True}
    assert ckpt.config_changes(old, new, ignore=("out",)) == ["extra: None -> True", "lr: 0.003 -> 0.001",
                                                             "seq_len: 256 -> 512"]
    assert ckpt.config_changes(old, dict(old), ignore=()) == []
