"""The RL side of `openzaya serve`: new weights from an RL trainer, by storage or by broadcast, and the version served.

Routes (`router`, included by serve.py; each but /weight_info answers 404 unless the server runs with
`--enable-weight-updates`, and every one is behind the API key when one is set). Names, query parameters and bodies
are vLLM's RL API (vllm/entrypoints/rl/online/api_router.py, the 0.34 line) so one trainer drives both servers, plus
SGLang's disk endpoint:
- `POST /update_weights_from_disk {"model_path", "weight_version"?}` (SGLang) and `POST /collective_rpc
  {"method": "reload_weights", "kwargs": {"weights_path"}}` (the one worker method vLLM's RL trainers call through
  its dev-mode collective_rpc): load a checkpoint directory in the native layout.
- `POST /init_weight_transfer_engine {"init_info": {master_address, master_port | nccl_unique_id_b64, rank_offset,
  world_size}}` (transfer.py: gloo on a CPU server, NCCL on a CUDA one), then per version `POST
  /start_weight_update` (nothing to prepare here), `POST /update_weights {"update_info": {names, dtype_names, shapes,
  packed}}` (receives each tensor by broadcast from the trainer) and `POST /finish_weight_update {"weight_version"}`.
- `POST /pause?mode=keep|abort|wait`, `POST /resume`, `GET /is_paused`: hold decoding (keep), fail what is in flight
  (abort), or wait for it to finish, then hold. openzaya swaps weights between two engine steps, so a trainer need not
  pause it; vLLM loads in place and must be paused.
- `GET /weight_info` -> {"weight_version", "updates"}; `POST /update_weight_version {"new_version"}`.

An update is validated in full before the model is touched, and read off the scheduler thread (inference goes on
while it is read; only the final in-place copy runs between two engine steps). Disk: the directory's files must be
regular files inside it (no FIFOs, devices, or symlinks or index entries leading out), config.json a JSON object of
at most 1 MiB whose values pass `checkpoint.check_config` and whose architecture (sizes, tied embeddings) is the
served model's, the weights at most 4 bytes per served parameter + 64 MiB, every tensor present with the served
shape and finite, a tied checkpoint's lm_head (if written) equal to its embedding; the read has the request timeout.
Broadcast: names, shapes and dtypes are checked before anything is received, every tensor is received into a
staging copy (one more copy of the weights, on the model's device) and checked finite before the swap. A malformed
update answers 400 (408 when the read times out) and the server keeps serving the old weights. Updates are
serialised (one at a time).
"""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from fastapi import APIRouter, Request as HTTPRequest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .checkpoint import (INDEX, SIZE_FIELDS, TIED_KEY, WEIGHTS, check_config, load_checked_state_dict, load_config,
                         load_state_dict, refuse_non_finite, state_for_saving, weight_files)
from .openai_format import APIError
from .transfer import TransferGroup

PATHS = ("/update_weights_from_disk", "/collective_rpc", "/init_weight_transfer_engine", "/start_weight_update",
         "/update_weights", "/finish_weight_update", "/pause", "/resume", "/is_paused", "/weight_info",
         "/update_weight_version")
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class WeightState:
    """What the server knows of its weights: the version label the trainer gave, the transfer group."""
    version: str | None = None      # None until a trainer names one
    group: TransferGroup | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


# -----------------------------------------------------------------------------
# request bodies (vLLM's shapes; unknown fields ignored, numbers bounded, text valid Unicode)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @field_validator("*", mode="before")
    @classmethod
    def _encodable(cls, v):
        for s in v if isinstance(v, list) else [v]:
            try:
                s.encode() if isinstance(s, str) else None
            except UnicodeEncodeError as e:   # a lone surrogate (JSON can carry one as an escape): 400
                raise ValueError(f"text is not valid Unicode (a lone surrogate at character {e.start})") from None
        return v


class FromDiskBody(_Body):
    model_path: str = Field(..., min_length=1, max_length=4096)
    weight_version: str | None = Field(None, max_length=256)


class RPCBody(_Body):
    method: str = Field(..., max_length=256)
    args: list = Field(default_factory=list, max_length=8)
    kwargs: dict = Field(default_factory=dict)


class InitInfo(_Body):
    """vLLM's NCCL init info: a store to meet at (master_address + master_port), or (CUDA) the NCCL unique id."""
    master_address: str | None = Field(None, min_length=1, max_length=255)
    master_port: int | None = Field(None, ge=1, le=65535)
    nccl_unique_id_b64: str | None = Field(None, max_length=256)
    rank_offset: int = Field(1, ge=1, le=4096)
    world_size: int = Field(..., ge=2, le=4097)


class InitBody(_Body):
    init_info: InitInfo


class UpdateInfo(_Body):
    names: list[str] = Field(..., min_length=1, max_length=1 << 20)
    dtype_names: list[Literal["float32", "bfloat16", "float16"]]
    shapes: list[list[int]]
    packed: bool = False


class UpdateBody(_Body):
    update_info: UpdateInfo


class VersionBody(_Body):
    weight_version: str | None = Field(None, max_length=256)


class NewVersionBody(_Body):
    new_version: str = Field(..., max_length=256)


# -----------------------------------------------------------------------------
# reading a checkpoint directory, checked (runs on a worker thread)


def _regular_inside(path: Path, root: Path, what: str) -> int:
    """The size of `path`, which must be a regular file inside `root` once symlinks are resolved."""
    real = path.resolve()
    if root not in real.parents:
        raise ValueError(f"{what} {path.name} leads out of the checkpoint directory")
    mode = real.lstat().st_mode if real.exists() else None
    if mode is None:
        raise FileNotFoundError(f"no {path.name} in the checkpoint directory ({what})")
    if not stat.S_ISREG(mode):
        raise ValueError(f"{what} {path.name} is not a regular file")
    return real.stat().st_size


def _same_architecture(served, cfg) -> None:
    diff = [f"{k}: served {getattr(served, k)!r}, checkpoint {getattr(cfg, k)!r}"
            for k in (*SIZE_FIELDS, "num_experts_per_tok", "tie_word_embeddings")
            if getattr(served, k) != getattr(cfg, k)]
    if diff:
        raise ValueError("the checkpoint's model shape is not the served model's: " + "; ".join(diff))


def checked_files(ckpt_dir: Path, max_bytes: int) -> None:
    """config.json, the index and the weight files: regular files inside `ckpt_dir`, within the size limits."""
    root = ckpt_dir.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"{ckpt_dir}: no such directory")
    if _regular_inside(ckpt_dir / "config.json", root, "config.json") > MAX_CONFIG_BYTES:
        raise ValueError(f"config.json is larger than {MAX_CONFIG_BYTES} bytes")
    config = json.loads((ckpt_dir / "config.json").read_text())
    if not isinstance(config, dict):
        raise ValueError("config.json is not a JSON object")
    check_config(config)
    if (ckpt_dir / INDEX).exists() or (ckpt_dir / INDEX).is_symlink():
        if _regular_inside(ckpt_dir / INDEX, root, "the index") > MAX_INDEX_BYTES:
            raise ValueError(f"{INDEX} is larger than {MAX_INDEX_BYTES} bytes")
        index = json.loads((ckpt_dir / INDEX).read_text())
        if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
            raise ValueError(f"{INDEX} has no weight_map object")
        shards = {str(f) for f in index["weight_map"].values()}
    else:
        shards = {WEIGHTS}
    total = sum(_regular_inside(ckpt_dir / s, root, "weight file") for s in shards)
    if total > max_bytes:
        raise ValueError(f"the weight files hold {total} bytes, over this server's limit of {max_bytes} "
                         f"(4 bytes per served parameter + 64 MiB)")


def read_checkpoint(model, ckpt_dir: Path) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in the served dtype, on the CPU, after every check (module docstring)."""
    ckpt_dir = Path(ckpt_dir)
    checked_files(ckpt_dir, 4 * sum(p.numel() for p in model.parameters()) + (64 << 20))
    cfg = load_config(ckpt_dir)
    _same_architecture(model.config, cfg)
    files = weight_files(ckpt_dir)
    dtype = next(model.parameters()).dtype
    if cfg.tie_word_embeddings and TIED_KEY in files and "model.embed_tokens.weight" in files:
        both = load_state_dict(ckpt_dir, skip=set(files) - {TIED_KEY, "model.embed_tokens.weight"})
        if not torch.equal(both[TIED_KEY], both["model.embed_tokens.weight"]):
            raise ValueError("the config ties the embeddings but lm_head.weight differs from model.embed_tokens.weight")
    return load_checked_state_dict(ckpt_dir, cfg, model.state_dict(), dtype, "cpu")


def routed_experts(routes_LT: torch.Tensor) -> list:
    """A result's routes [L, prompt + completion] as vLLM's `routed_experts` JSON [positions][L][1], the last
    position (a sampled token never fed to the model) left out; -1 = skip class (openzaya's encoding)."""
    return routes_LT[:, :max(routes_LT.shape[1] - 1, 0)].T[:, :, None].tolist()


def _copy_into(model, sd: dict[str, torch.Tensor]) -> int:
    """The in-place swap (scheduler thread, between two engine steps)."""
    with torch.no_grad():
        target = model.state_dict()
        for k, v in sd.items():
            target[k].copy_(v)
    return len(sd)


# -----------------------------------------------------------------------------
# routes


router = APIRouter()


def _srv(request: HTTPRequest):
    srv = request.app.state.srv
    if not srv.cfg.weight_updates:
        raise APIError(404, "weight updates are off (start the server with --enable-weight-updates)", code="not_found")
    return srv


def _applied(srv, version: str | None):
    srv.weights_version += 1
    srv.rl.version = version if version is not None else str(srv.weights_version)


async def _off_thread(srv, fn, what: str):
    """fn() on a worker thread within the request timeout; a bad update is a 400 (408 past the timeout)."""
    try:
        return await asyncio.wait_for(asyncio.to_thread(fn), timeout=srv.cfg.request_timeout_s)
    except asyncio.TimeoutError:
        raise APIError(408, f"{what}: not done within {srv.cfg.request_timeout_s:g} s", "timeout_error") from None
    except (KeyError, ValueError, OSError, RuntimeError) as e:
        raise APIError(400, f"{what}: {type(e).__name__}: {e}") from None


async def load_from_disk(srv, path: str, version: str | None) -> dict:
    async with srv.rl.lock:
        sd = await _off_thread(srv, lambda: read_checkpoint(srv.engine.model, Path(path)), f"cannot load {path}")
        n = await srv.sched.call(lambda: _copy_into(srv.engine.model, sd))
        _applied(srv, version)
    return {"success": True, "message": f"loaded {n} tensors from {path}", "weights_version": srv.weights_version,
            "weight_version": srv.rl.version}


@router.post("/update_weights_from_disk")
async def update_weights_from_disk(body: FromDiskBody, request: HTTPRequest):
    """SGLang's endpoint: load a checkpoint directory (the served architecture) into the running engine."""
    return await load_from_disk(_srv(request), body.model_path, body.weight_version)


@router.post("/collective_rpc")
async def collective_rpc(body: RPCBody, request: HTTPRequest):
    """vLLM's dev-mode worker RPC, for the one method RL trainers call: reload_weights(weights_path)."""
    srv = _srv(request)
    path = body.kwargs.get("weights_path", body.args[0] if body.args else None)
    if body.method != "reload_weights" or not isinstance(path, str):
        raise APIError(400, "only reload_weights with a weights_path is served here", param="method")
    await load_from_disk(srv, path, None)
    return {"results": [None]}


@router.post("/init_weight_transfer_engine")
async def init_weight_transfer_engine(body: InitBody, request: HTTPRequest):
    srv, info = _srv(request), body.init_info
    if info.rank_offset >= info.world_size:
        raise APIError(400, f"rank_offset {info.rank_offset} must be below world_size {info.world_size}")
    device = next(srv.engine.model.parameters()).device
    store = info.master_address is not None and info.master_port is not None
    if store == (info.nccl_unique_id_b64 is not None) or (not store and device.type != "cuda"):
        raise APIError(400, "init_info needs master_address + master_port, or (a CUDA server) nccl_unique_id_b64, "
                            "not both", param="init_info")
    try:
        uid = None if store else base64.b64decode(info.nccl_unique_id_b64, validate=True)
    except ValueError:
        raise APIError(400, "nccl_unique_id_b64 is not base64", param="init_info") from None
    async with srv.rl.lock:
        if srv.rl.group is not None:
            srv.rl.group.close()
            srv.rl.group = None
        srv.rl.group = await _off_thread(srv, lambda: TransferGroup(
            info.rank_offset, info.world_size, device, info.master_address, info.master_port, unique_id=uid,
            timeout_s=min(srv.cfg.request_timeout_s, 300.0)), "cannot join the weight-transfer group")
    return {"message": "Weight transfer initialized"}


@router.post("/start_weight_update")
async def start_weight_update(request: HTTPRequest):
    _srv(request)
    return {"message": "Weight update started"}


def check_update(model, info: UpdateInfo) -> list[tuple[str, torch.dtype, tuple]]:
    """(name, dtype, shape) of each tensor to receive, after checking them against the served model."""
    if info.packed:
        raise ValueError("packed updates are not supported (send packed=false)")
    if not (len(info.names) == len(info.dtype_names) == len(info.shapes)):
        raise ValueError("names, dtype_names and shapes must have the same length")
    if len(set(info.names)) != len(info.names):
        raise ValueError("a weight is named twice")
    expected = {k: tuple(v.shape) for k, v in state_for_saving(model).items()}
    out = []
    for name, dt, shape in zip(info.names, info.dtype_names, info.shapes):
        if name not in expected:
            raise ValueError(f"unknown weight {name!r} (names are the checkpoint's)")
        if tuple(shape) != expected[name]:
            raise ValueError(f"weight {name} has shape {tuple(shape)}, the served model {expected[name]}")
        out.append((name, DTYPES[dt], tuple(shape)))
    return out


def receive(group: TransferGroup, model, plan) -> dict[str, torch.Tensor]:
    """Every tensor of the update, by broadcast, into staging copies in the served dtype, each checked finite."""
    dtype = next(model.parameters()).dtype
    staged = {}
    for name, dt, shape in plan:
        buf = torch.empty(shape, dtype=dt, device=group.device)
        group.broadcast(buf)
        staged[name] = buf
    group.synchronize()
    for name, buf in staged.items():
        refuse_non_finite(name, buf, "the update")
        staged[name] = buf.to(dtype)
    return staged


@router.post("/update_weights")
async def update_weights(body: UpdateBody, request: HTTPRequest):
    srv = _srv(request)
    if srv.rl.group is None:
        raise APIError(400, "no weight-transfer group: POST /init_weight_transfer_engine first")
    try:
        plan = check_update(srv.engine.model, body.update_info)
    except ValueError as e:
        raise APIError(400, f"update_info: {e}", param="update_info") from None
    async with srv.rl.lock:
        staged = await _off_thread(srv, lambda: receive(srv.rl.group, srv.engine.model, plan), "weight update")
        n = await srv.sched.call(lambda: _copy_into(srv.engine.model, staged))
        srv.weights_version += 1
    return {"message": f"Weights updated ({n} tensors)"}


@router.post("/finish_weight_update")
async def finish_weight_update(body: VersionBody, request: HTTPRequest):
    srv = _srv(request)
    srv.rl.version = body.weight_version if body.weight_version is not None else str(srv.weights_version)
    return {"message": "Weight update finished"}


@router.post("/update_weight_version")
async def update_weight_version(body: NewVersionBody, request: HTTPRequest):
    srv = _srv(request)
    srv.rl.version = body.new_version
    return {"success": True, "new_version": body.new_version}


@router.get("/weight_info")
async def weight_info(request: HTTPRequest):
    srv = request.app.state.srv
    return {"weight_version": srv.rl.version, "updates": srv.weights_version}


@router.post("/pause")
async def pause(request: HTTPRequest, mode: Literal["abort", "wait", "keep"] = "abort", clear_cache: bool = True):
    srv = _srv(request)
    if mode == "abort":
        srv.sched.abort_all("aborted: the server was paused for a weight update")
    elif mode == "wait":
        deadline = asyncio.get_running_loop().time() + srv.cfg.request_timeout_s
        while srv.sched.in_system and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
    srv.sched.set_paused(True)
    return {"status": "paused"}


@router.post("/resume")
async def resume(request: HTTPRequest):
    _srv(request).sched.set_paused(False)
    return {"status": "resumed"}


@router.get("/is_paused")
async def is_paused(request: HTTPRequest):
    return {"is_paused": _srv(request).sched.paused}

