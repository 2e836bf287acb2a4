"""openzaya serve's RL routes (openzaya/serve_rl.py, transfer.py): weight updates from disk hardened against hostile
or broken checkpoints (issue 22), vLLM's weight-transfer protocol by broadcast (gloo on the CPU), pause / resume,
routed experts and router replay with the skip class normalised, and the names the trainer writes against vLLM's
ZAYA loader (tests/assets/vllm_zaya_weight_names.json).

Run: .venv/bin/python -m pytest tests/test_serve_rl.py -q
"""

import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from openzaya import rl, serve_rl, transfer
from openzaya.checkpoint import save_pretrained, state_for_saving
from openzaya.serve import ServeConfig, load_app
from openzaya.tokenizer import train_bpe
from server_thread import ServerThread
from zaya_ref import random_model, tiny_config

ASSET = Path(__file__).parent / "assets" / "vllm_zaya_weight_names.json"


def checkpoint(path: Path, seed: int = 0, skip_bias: float | None = None, **cfg_kw) -> Path:
    """A tiny random ZAYA with a byte tokenizer at `path`; skip_bias widens the routers so tokens spread over the
    experts and some take the skip class."""
    tok = train_bpe(["hello world 123"], vocab_size=264)
    model = random_model(tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                     pad_token_id=tok.pad_id, **cfg_kw), seed=seed)
    if skip_bias is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for r in model.routers():
                for lin in (r.down_proj, r.router_mlp.fc1, r.router_mlp.fc2, r.router_mlp.out_proj):
                    lin.weight.copy_(torch.randn(lin.weight.shape, generator=g) * 2 / lin.weight.shape[1] ** 0.5)
                r.balancing_biases.zero_()
                r.balancing_biases[-1] = skip_bias
    save_pretrained(model, path)
    tok.save(path)
    return path


def greedy(server, prompt="hello", n_tokens=6) -> list[int]:
    r = httpx.post(server.url + "/v1/completions", json={"model": server.app.state.srv.model_name, "prompt": prompt,
                   "max_tokens": n_tokens, "temperature": 0, "return_token_ids": True}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


class Served(ServerThread):
    """`openzaya serve --enable-weight-updates` of `model_dir` in a thread (tests/test_rl_scale.py uses it too)."""

    def __init__(self, model_dir, port: int = 0, **cfg):
        self.app = load_app(model_dir, ServeConfig(max_slots=4, max_len=128, weight_updates=True, **cfg))
        super().__init__(self.app, port=port)

    def weights(self):
        return {k: v.clone() for k, v in self.app.state.srv.engine.model.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def served(tmp_path):
    with Served(checkpoint(tmp_path / "m")) as s:
        yield s


# -----------------------------------------------------------------------------
# update_weights_from_disk: everything is checked before the model is touched


def _edit_config(src: Path, dst: Path, **changes) -> Path:
    import shutil
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_malformed_disk_updates_are_400_and_the_old_weights_keep_serving(served, tmp_path):
    good = checkpoint(tmp_path / "good", seed=1)
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((good / "model.safetensors").read_bytes())
    before, out_before = served.weights(), greedy(served)
    cases = {"millions of layers": _edit_config(good, tmp_path / "c1", num_hidden_layers=3_000_000),
             "zero heads": _edit_config(good, tmp_path / "c2", num_attention_heads=0),
             "a string size": _edit_config(good, tmp_path / "c3", hidden_size="32"),
             "untied embeddings": _edit_config(good, tmp_path / "c4", tie_word_embeddings=False),
             "no directory": tmp_path / "nothing-here"}
    fifo = _edit_config(good, tmp_path / "fifo")
    (fifo / "model.safetensors").unlink()
    os.mkfifo(fifo / "model.safetensors")                       # a read would block for ever
    cases["a FIFO"] = fifo
    fifo_cfg = _edit_config(good, tmp_path / "fifo_cfg")
    (fifo_cfg / "config.json").unlink()
    os.mkfifo(fifo_cfg / "config.json")
    cases["a FIFO config.json"] = fifo_cfg
    dev = _edit_config(good, tmp_path / "dev")
    (dev / "model.safetensors").unlink()
    (dev / "model.safetensors").symlink_to("/dev/zero")
    cases["a device"] = dev
    out = _edit_config(good, tmp_path / "out")
    (out / "model.safetensors").unlink()
    (out / "model.safetensors").symlink_to(outside)
    cases["a symlink out of the directory"] = out
    idx = _edit_config(good, tmp_path / "idx")
    (idx / "model.safetensors").rename(tmp_path / "escaped.safetensors")
    (idx / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"model.norm.weight":
                                                                                  "../escaped.safetensors"}}))
    cases["an index entry out of the directory"] = idx
    big = _edit_config(good, tmp_path / "big")
    with open(big / "model.safetensors", "r+b") as f:
        f.truncate(64 << 21)                                     # sparse: 128 MiB, over this model's limit
    cases["over the size limit"] = big
    nan = tmp_path / "nan"
    bad_model = random_model(tiny_config(vocab_size=264, bos_token_id=1, eos_token_id=2, pad_token_id=0), seed=2)
    with torch.no_grad():
        bad_model.model.norm.weight[3] = float("nan")
    save_pretrained(bad_model, nan)
    cases["a NaN weight"] = nan
    for what, path in cases.items():
        t0 = time.perf_counter()
        r = httpx.post(served.url + "/update_weights_from_disk", json={"model_path": str(path)}, timeout=60)
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert time.perf_counter() - t0 < 10, what
        print(what, "->", r.json()["error"]["message"][:150])
    r = httpx.post(served.url + "/update_weights_from_disk", content=json.dumps({"model_path": "a\ud800"}).encode(),
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and "valid Unicode" in r.text
    assert same(served.weights(), before) and greedy(served) == out_before
    assert served.app.state.srv.weights_version == 0
    r = httpx.post(served.url + "/update_weights_from_disk", json={"model_path": str(good), "weight_version": "v7"})
    assert r.status_code == 200 and r.json()["weight_version"] == "v7", r.text
    assert httpx.get(served.url + "/weight_info").json() == {"weight_version": "v7", "updates": 1}
    assert not same(served.weights(), before)


def test_a_tied_checkpoint_whose_lm_head_differs_is_refused(served, tmp_path):
    from safetensors.torch import load_file, save_file
    good = checkpoint(tmp_path / "good", seed=1)
    sd = load_file(good / "model.safetensors")
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"] + 1.0
    save_file(sd, good / "model.safetensors", metadata={"format": "pt"})
    r = httpx.post(served.url + "/update_weights_from_disk", json={"model_path": str(good)}, timeout=60)
    assert r.status_code == 400 and "ties the embeddings" in r.text, r.text


def test_inference_goes_on_while_an_update_is_read(served, tmp_path, monkeypatch):
    """The read runs off the scheduler thread: a request sent while a (slow) update is read finishes first; a read
    past the request timeout is a 408 that leaves the weights alone."""
    good = checkpoint(tmp_path / "good", seed=1)
    read = serve_rl.read_checkpoint

    def slow_read(model, path):
        time.sleep(3.0)
        return read(model, path)
    monkeypatch.setattr(serve_rl, "read_checkpoint", slow_read)
    done = {}

    def update():
        done["r"] = httpx.post(served.url + "/update_weights_from_disk", json={"model_path": str(good)}, timeout=60)
        done["t"] = time.perf_counter()
    th = threading.Thread(target=update)
    th.start()
    time.sleep(0.5)
    greedy(served, n_tokens=4)
    t_request = time.perf_counter()
    th.join()
    assert done["r"].status_code == 200 and t_request < done["t"] - 1.0, (done, t_request)
    served.app.state.srv.cfg.request_timeout_s = 1.0
    before = served.weights()
    r = httpx.post(served.url + "/update_weights_from_disk", json={"model_path": str(checkpoint(tmp_path / "g2"))})
    assert r.status_code == 408 and same(served.weights(), before), r.text


def test_weight_routes_need_the_flag_and_the_key(tmp_path):
    m = checkpoint(tmp_path / "m")
    with ServerThread(load_app(m, ServeConfig(max_slots=2, max_len=64))) as s:
        for path in ("/update_weights_from_disk", "/init_weight_transfer_engine", "/update_weights", "/pause"):
            assert httpx.post(s.url + path, json={}).status_code in (404, 400), path
        assert httpx.post(s.url + "/pause").status_code == 404
    with Served(m, api_key="k") as s:
        for path in serve_rl.PATHS:
            r = httpx.request("GET" if path in ("/weight_info", "/is_paused") else "POST", s.url + path, json={})
            assert r.status_code == 401, path


# -----------------------------------------------------------------------------
# vLLM's weight-transfer protocol, by broadcast over gloo


def join(served) -> transfer.TransferGroup:
    sock = transfer.listen_socket("127.0.0.1")
    info = {"master_address": "127.0.0.1", "master_port": sock.getsockname()[1], "rank_offset": 1, "world_size": 2}
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
        served.url + "/init_weight_transfer_engine", json={"init_info": info}, timeout=60)))
    th.start()
    group = transfer.TransferGroup(0, 2, torch.device("cpu"), "127.0.0.1", info["master_port"], sock=sock)
    th.join()
    assert out["r"].status_code == 200, out["r"].text
    return group


def broadcast_update(served, group, tensors: dict) -> httpx.Response:
    names = list(tensors)
    info = {"names": names, "dtype_names": [str(tensors[k].dtype).removeprefix("torch.") for k in names],
            "shapes": [list(tensors[k].shape) for k in names], "packed": False}
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", httpx.post(
        served.url + "/update_weights", json={"update_info": info}, timeout=60)))
    th.start()
    for k in names:
        group.broadcast(tensors[k].contiguous())
    th.join()
    return out["r"]


def test_broadcast_updates_follow_vllms_protocol(served, tmp_path):
    new = random_model(tiny_config(vocab_size=264, bos_token_id=1, eos_token_id=2, pad_token_id=0), seed=5)
    tensors = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state_for_saving(new).items()}
    for info in ({"world_size": 2}, {"world_size": 2, "nccl_unique_id_b64": "AAAA"},          # CPU server: a store
                 {"world_size": 2, "master_address": "127.0.0.1", "master_port": 1, "rank_offset": 2}):
        assert httpx.post(served.url + "/init_weight_transfer_engine", json={"init_info": info}).status_code == 400
    assert httpx.post(served.url + "/update_weights", json={"update_info": {"names": ["model.norm.weight"],
                      "dtype_names": ["float32"], "shapes": [[32]]}}).status_code == 400      # no group yet
    group = join(served)
    before, out_before = served.weights(), greedy(served)
    names = list(tensors)
    bad = {"update_info": {"names": names[:1], "dtype_names": ["float32"], "shapes": [[7, 7]]}}
    r = httpx.post(served.url + "/update_weights", json=bad)
    assert r.status_code == 400 and "shape" in r.text, r.text                     # refused before receiving
    for info in ({"names": ["lm_head.weight"], "dtype_names": ["float32"], "shapes": [[264, 32]]},   # tied model
                 {"names": names[:1], "dtype_names": ["float32"], "shapes": [list(tensors[names[0]].shape)],
                  "packed": True}):
        assert httpx.post(served.url + "/update_weights", json={"update_info": info}).status_code == 400
    poisoned = dict(tensors)
    poisoned["model.norm.weight"] = poisoned["model.norm.weight"].clone()
    poisoned["model.norm.weight"][0] = float("inf")
    r = broadcast_update(served, group, poisoned)
    assert r.status_code == 400 and "non-finite" in r.text, r.text
    assert same(served.weights(), before) and greedy(served) == out_before
    assert broadcast_update(served, group, tensors).status_code == 200
    assert httpx.post(served.url + "/finish_weight_update", json={"weight_version": "3"}).status_code == 200
    assert httpx.get(served.url + "/weight_info").json() == {"weight_version": "3", "updates": 1}
    got = served.app.state.srv.engine.model.state_dict()
    for k, v in tensors.items():
        assert torch.equal(got[k], v.float()), k
    group.close()


def test_pause_keep_holds_decoding_and_abort_fails_what_is_in_flight(served):
    name = served.app.state.srv.model_name
    assert httpx.post(served.url + "/pause", params={"mode": "keep"}).json() == {"status": "paused"}
    assert httpx.get(served.url + "/is_paused").json() == {"is_paused": True}
    out = {}
    th = threading.Thread(target=lambda: out.setdefault("r", httpx.post(served.url + "/v1/completions", json={
        "model": name, "prompt": "hi", "max_tokens": 4, "temperature": 0}, timeout=60)))
    th.start()
    time.sleep(1.0)
    assert "r" not in out                                  # held while paused
    httpx.post(served.url + "/resume")
    th.join()
    assert out["r"].status_code == 200
    out.clear()
    th = threading.Thread(target=lambda: out.setdefault("r", httpx.post(served.url + "/v1/completions", json={
        "model": name, "prompt": "hi", "max_tokens": 100, "temperature": 0}, timeout=60)))
    httpx.post(served.url + "/pause", params={"mode": "keep"})
    th.start()
    time.sleep(0.5)
    httpx.post(served.url + "/pause", params={"mode": "abort"})
    th.join()
    assert out["r"].status_code == 503 and "aborted" in out["r"].text
    httpx.post(served.url + "/resume")
    assert len(greedy(served)) == 6


# -----------------------------------------------------------------------------
# Routed experts from the server, replayed in the trainer


def test_server_routes_replay_the_servers_logprobs_with_the_skip_class_normalised(tmp_path):
    """Routes returned by openzaya serve (-1 = skip) reproduce the server's logprobs in the trainer; the same routes
    in vLLM's encoding (skip = expert 0, ids only) do too once normalised, and do not when taken at face value."""
    from openzaya.checkpoint import from_pretrained
    m = checkpoint(tmp_path / "m", seed=3, skip_bias=-0.05)
    model = from_pretrained(m)
    with Served(m, return_routed_experts=True) as s:
        r = httpx.post(s.url + "/v1/completions", json={"model": s.app.state.srv.model_name, "prompt": [5, 60, 61, 62],
                       "n": 4, "max_tokens": 12, "temperature": 1.0, "seed": 3, "logprobs": 1,
                       "return_token_ids": True, "return_routed_experts": True}, timeout=60)
    assert r.status_code == 200, r.text
    skips, naive_worst = 0, 0.0
    for c in r.json()["choices"]:
        prompt, tokens, lp = [5, 60, 61, 62], c["token_ids"], c["logprobs"]["token_logprobs"]
        n = len(prompt) + len(tokens)
        ids = torch.tensor([prompt + tokens])
        assert len(c["routed_experts"]) == n - 1 and len(c["routed_experts"][0]) == model.config.num_hidden_layers

        def replayed(routes_LT):
            with torch.no_grad():
                out = model.token_logprobs(ids, ids[:, 1:], replay_routes=rl.pad_routes([routes_LT], n))
            return out[0, len(prompt) - 1:]
        ours = replayed(rl.routes_from_server(c["routed_experts"], n, skip_as_zero=False))
        assert (ours - torch.tensor(lp)).abs().max() < 1e-4
        vllm_style = [[[max(e, 0) for e in layer] for layer in pos] for pos in c["routed_experts"]]
        skips += sum(e < 0 for pos in c["routed_experts"] for layer in pos for e in layer)
        normalised = replayed(rl.routes_from_server(vllm_style, n, skip_as_zero=True))
        assert (normalised - torch.tensor(lp)).abs().max() < 1e-4
        naive = replayed(rl.routes_from_server(vllm_style, n, skip_as_zero=False))
        naive_worst = max(naive_worst, float((naive - torch.tensor(lp)).abs().max()))
    assert skips > 0 and naive_worst > 1e-3, (skips, naive_worst)


def test_routes_from_server_shapes():
    r = rl.routes_from_server([[[0], [2]], [[-1], [0]]], 4, skip_as_zero=False)
    assert r.tolist() == [[0, -1, -1, -1], [2, 0, -1, -1]]
    r = rl.routes_from_server([[[0], [2]], [[-1], [0]]], 3, skip_as_zero=True)
    assert r.tolist() == [[-2, -1, -1], [2, -2, -1]]
    with pytest.raises(ValueError, match="do not fit"):
        rl.routes_from_server([[[0]]] * 5, 4, skip_as_zero=False)


# -----------------------------------------------------------------------------
# Names and the NCCL rendezvous, as vLLM reads them


def vllm_expected_names(cfg) -> set[str]:
    a = json.loads(ASSET.read_text())
    names = set(a["global"]) | (set() if cfg.tie_word_embeddings else set(a["untied_only"]))
    for i in range(cfg.num_hidden_layers):
        for pattern in a["per_layer"] + (a["not_layer_0"] if i > 0 else []) + \
                (a["with_attention_bias"] if cfg.attention_bias else []):
            names.add(pattern.format(i=i))
    return names


@pytest.mark.parametrize("tied", [True, False])
def test_written_names_are_the_names_vllms_zaya_loader_accepts(tmp_path, tied):
    """The checkpoint the trainer writes (disk sync, final model) and the names it broadcasts are exactly what
    vLLM's ZayaForCausalLM.load_weights accepts: nothing refused, nothing left unloaded."""
    from openzaya import dcp
    from safetensors import safe_open
    renames = json.loads(ASSET.read_text())["renames"]
    cfg = tiny_config(tie_word_embeddings=tied)
    model = random_model(cfg)
    dcp.export_hf(model, tmp_path / "hf")
    with safe_open(tmp_path / "hf" / "model.safetensors", framework="pt") as f:
        written = set(f.keys())
    assert written == set(state_for_saving(model))                     # what BroadcastSync sends, too

    def as_vllm(name):
        for a, b in renames.items():
            name = name.replace(a, b)
        return name
    assert {as_vllm(k) for k in written} == vllm_expected_names(cfg)
    assert ("lm_head.weight" in written) == (not tied)


def test_the_nccl_unique_id_is_pickled_as_vllms_class(monkeypatch):
    """transfer.unique_id_pickle's bytes unpickle, in a process with vLLM, as vLLM's ncclUniqueId (faked here by
    module path) holding the id; and our reader takes vLLM's own pickle of that class back without vLLM."""
    import ctypes
    import pickle
    import sys
    import types
    mod, cls = transfer.VLLM_UNIQUE_ID
    parts = mod.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    fake = type(cls, (ctypes.Structure,), {"_fields_": [("internal", ctypes.c_byte * 128)], "__module__": mod})
    sys.modules[mod].ncclUniqueId = fake
    raw = bytes(range(128))
    obj = pickle.loads(transfer.unique_id_pickle(raw))
    assert type(obj) is fake and bytes(obj) == raw
    assert transfer.unique_id_from_pickle(pickle.dumps(obj)) == raw
    with pytest.raises(pickle.UnpicklingError):
        transfer.unique_id_from_pickle(pickle.dumps(os.system))
