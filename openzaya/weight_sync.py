"""The trainer's side of weight sync: push a policy version to an inference server, then verify that it serves it.

Servers are `openzaya serve --enable-weight-updates` and vLLM (0.34 line; `owned_by` of /v1/models tells them apart).
Two ways to push (`--weight-sync`):
- `disk`: the trainer writes the native layout (config.json + safetensors + tokenizer, atomically) to one directory;
  openzaya reloads it with POST /update_weights_from_disk {model_path, weight_version}; vLLM is paused
  (/pause?mode=keep), reloads it with POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path"}}
  (its worker method, served in dev mode: VLLM_SERVER_DEV_MODE=1), is told the version (/update_weight_version) and
  resumed, as NeMo-RL's remote-vLLM synchronizer does.
- `broadcast`: vLLM's weight-transfer protocol. Once per server, POST /init_weight_transfer_engine while the trainer
  joins the same group (transfer.py: rank 0 = trainer, rank 1 = the server; NCCL by unique id on CUDA, gloo by a
  store the trainer hosts on the CPU); then per version POST /start_weight_update, POST /update_weights {names,
  dtype_names, shapes} while the trainer broadcasts each tensor in that order, and POST /finish_weight_update
  {weight_version}. vLLM loads in place, so it is paused around the update (mode "keep");
  openzaya stages the tensors and swaps between two engine steps, so it keeps serving.
  One two-rank group per server: a dead server breaks only its own group, and a restarted one gets a new group
  (the trainer sends K copies; one group over the whole fleet would send one).
Every push is verified (`verify`): the server must report the pushed version (GET /weight_info, vLLM's route), and a
greedy probe completion's logprobs must match the trainer's own logprobs of the same tokens under the pushed weights
(mean |difference| within `tolerance`): a server that answers 200 and keeps its old weights fails the run.
Names sent are the checkpoint's (`checkpoint.state_for_saving`), which vLLM's ZAYA loader accepts
(tests/assets/vllm_zaya_weight_names.json).
"""

from __future__ import annotations

import base64
import concurrent.futures
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import torch

from .checkpoint import save_pretrained, state_for_saving
from .transfer import TransferGroup, address_towards, listen_socket

SYNC_TIMEOUT_S = 600.0


@dataclass
class Server:
    """One inference server as the trainer's rollout pool sees it."""
    url: str                        # the root, without /v1
    kind: str = "openzaya"          # openzaya | vllm
    model: str = ""                 # its model id
    healthy: bool = True
    inflight: int = 0               # requests sent and not answered
    version: int | None = None      # the last version pushed and verified (None: not admitted yet)
    pushed: list[int] = field(default_factory=list)
    routes: bool = True             # ask it for routed experts (off once it said it cannot)
    group: TransferGroup | None = None


def server_root(url: str) -> str:
    url = url.rstrip("/")
    return url[:-3] if url.endswith("/v1") else url


def describe(url: str, client: httpx.Client) -> Server:
    """The server's model id and kind, from GET /v1/models."""
    r = client.get(server_root(url) + "/v1/models", timeout=30)
    r.raise_for_status()
    first = r.json()["data"][0]
    kind = first.get("owned_by", "")
    if kind not in ("openzaya", "vllm"):
        raise ValueError(f"{url}: a server owned by {kind!r}; RL weight sync supports openzaya serve and vLLM (SGLang "
                         f"loads only Zyphra's legacy weight names: a push would change nothing)")
    return Server(url=server_root(url), kind=kind, model=first["id"])


class ServerDown(RuntimeError):
    """A server that failed (5xx, a broken transfer group): the pool marks it down and goes on without it."""


def _ok(r: httpx.Response, what: str, server: Server):
    """The JSON of a 200; a 5xx is ServerDown, any other status a RuntimeError (a refused update stops the run)."""
    if r.status_code != 200:
        kind = ServerDown if r.status_code >= 500 else RuntimeError
        raise kind(f"{server.url}: {what} failed (HTTP {r.status_code}): {r.text[:500]}")
    return r.json()


class DiskSync:
    """Push through storage: `prepare` writes the policy to `directory`, `push` has one server reload it."""

    def __init__(self, directory: Path, tokenizer_files: dict):
        self.directory, self.tokenizer_files = Path(directory), tokenizer_files

    def prepare(self, plain, version: int):
        save_pretrained(plain, self.directory, extra_files={**self.tokenizer_files, "VERSION": str(version)})

    def push(self, client: httpx.Client, s: Server, version: int):
        path = str(self.directory.resolve())
        if s.kind == "openzaya":
            _ok(client.post(s.url + "/update_weights_from_disk", json={"model_path": path,
                            "weight_version": str(version)}, timeout=SYNC_TIMEOUT_S), "update_weights_from_disk", s)
            return
        _ok(client.post(s.url + "/pause", params={"mode": "keep"}), "pause", s)
        _ok(client.post(s.url + "/collective_rpc", json={"method": "reload_weights", "kwargs": {"weights_path": path}},
                        timeout=SYNC_TIMEOUT_S), "collective_rpc reload_weights", s)
        _ok(client.post(s.url + "/update_weight_version", json={"new_version": str(version)}), "update_weight_version",
            s)
        _ok(client.post(s.url + "/resume"), "resume", s)

    def close(self):
        pass


class BroadcastSync:
    """Push by broadcast (vLLM's weight-transfer protocol); `device` is the trainer's (CUDA: NCCL, CPU: gloo), and
    `dtype` the one the tensors travel in."""

    def __init__(self, device: torch.device, dtype: torch.dtype | None):
        self.device, self.dtype = torch.device(device), dtype
        self.tensors: dict[str, torch.Tensor] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(1)   # the HTTP call that the broadcast answers

    def prepare(self, plain, version: int):
        self.tensors = {k: (v if self.dtype is None or not v.is_floating_point() else v.to(self.dtype))
                        for k, v in state_for_saving(plain).items()}

    def join(self, client: httpx.Client, s: Server):
        """A new two-rank group with `s`, this trainer rank 0: on CUDA by an NCCL unique id the trainer draws
        (vLLM's nccl_unique_id_b64 mode), on the CPU by a store the trainer hosts (gloo)."""
        info, kw = {"rank_offset": 1, "world_size": 2}, {}
        if self.device.type == "cuda":
            from .transfer import _Nccl
            kw["unique_id"] = _Nccl().unique_id()
            info["nccl_unique_id_b64"] = base64.b64encode(kw["unique_id"]).decode()
        else:
            host = address_towards(urlparse(s.url).hostname)
            kw["sock"] = listen_socket(host)
            kw.update(master_address=host, master_port=kw["sock"].getsockname()[1])
            info.update(master_address=host, master_port=kw["master_port"])
        call = self.pool.submit(client.post, s.url + "/init_weight_transfer_engine", json={"init_info": info},
                                timeout=SYNC_TIMEOUT_S)
        try:
            s.group = TransferGroup(0, 2, self.device, timeout_s=120, **kw)
        finally:
            _ok(call.result(), "init_weight_transfer_engine", s)

    def push(self, client: httpx.Client, s: Server, version: int):
        if s.group is None:
            self.join(client, s)
        if s.kind == "vllm":
            _ok(client.post(s.url + "/pause", params={"mode": "keep"}), "pause", s)
        _ok(client.post(s.url + "/start_weight_update"), "start_weight_update", s)
        names = list(self.tensors)
        info = {"names": names, "dtype_names": [str(self.tensors[k].dtype).removeprefix("torch.") for k in names],
                "shapes": [list(self.tensors[k].shape) for k in names], "packed": False}
        call = self.pool.submit(client.post, s.url + "/update_weights", json={"update_info": info},
                                timeout=SYNC_TIMEOUT_S)
        try:
            for k in names:
                if call.done():      # the server answered before taking everything: its answer says why
                    break
                s.group.broadcast(self.tensors[k].to(s.group.device).contiguous())
            s.group.synchronize()
        except RuntimeError as e:    # the transfer broke (the server died): not reused, the next push joins anew
            s.group.close()
            s.group = None
            raise ServerDown(f"{s.url}: the weight broadcast failed: {e}") from e
        _ok(call.result(), "update_weights", s)
        _ok(client.post(s.url + "/finish_weight_update", json={"weight_version": str(version)}),
            "finish_weight_update", s)
        if s.kind == "vllm":
            _ok(client.post(s.url + "/resume"), "resume", s)

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


# -----------------------------------------------------------------------------
# Verification


def probe(client: httpx.Client, s: Server, prompt_ids: list[int], max_tokens: int = 8) -> tuple[list[int], list]:
    """A greedy completion of `prompt_ids` on `s`: (token ids, their logprobs)."""
    body = {"model": s.model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0.0, "logprobs": 1,
            "return_token_ids": True}
    ch = _ok(client.post(s.url + "/v1/completions", json=body, timeout=SYNC_TIMEOUT_S), "probe", s)["choices"][0]
    return list(ch["token_ids"]), list(ch["logprobs"]["token_logprobs"])


@torch.no_grad()
def reference_logprobs(plain, prompt_ids: list[int], tokens: list[int]) -> list[float]:
    """The trainer's logprobs of `tokens` after `prompt_ids` under `plain` (the pushed weights)."""
    ids = torch.tensor([prompt_ids + tokens])
    return plain.token_logprobs(ids, ids[:, 1:])[0, len(prompt_ids) - 1:].tolist()


def verify(client: httpx.Client, s: Server, version: int, plain, prompt_ids: list[int], tolerance: float) -> float:
    """The server serves `version`: it says so, and its probe logprobs are the trainer's (mean |difference| within
    `tolerance`). Returns that difference; raises RuntimeError naming the server otherwise."""
    told = _ok(client.get(s.url + "/weight_info"), "weight_info", s).get("weight_version")
    if told != str(version):
        raise RuntimeError(f"{s.url}: after a push of policy version {version} the server reports version {told!r}")
    tokens, server_lp = probe(client, s, prompt_ids)
    ours = reference_logprobs(plain, prompt_ids, tokens)
    diff = sum(abs(a - b) for a, b in zip(ours, server_lp)) / max(len(ours), 1)
    if not diff <= tolerance:
        raise RuntimeError(f"{s.url} accepted policy version {version} but does not serve it: its probe logprobs "
                           f"differ from the trainer's by {diff:.4f} on average (tolerance {tolerance}); the push "
                           f"changed nothing, or changed the wrong weights")
    return diff
