"""Sharded training checkpoints (torch.distributed.checkpoint, DCP) and the Hugging Face export of a sharded model.

A checkpoint is a directory: DCP's files for the model and the optimizer (each rank writes its own shards; the
metadata records global shapes, so a checkpoint written by W ranks loads at any other world size and layout: 2 -> 1,
1 -> 2, FSDP2 <-> EP) plus `trainer.pt` (step, the routers' balancing-optimizer state, rank 0's RNG, configs),
written by rank 0. The model's state includes the routers' balancing biases (buffers). The same format serves one
process (DCP without a process group), so a run may change its world size between resumes.

Saving is atomic: every rank writes into `.<name>.tmp`, then (after a barrier) rank 0 renames the old directory to
`<name>.old`, the new one into place, and deletes the old one; a crash between the two renames leaves the previous
checkpoint complete at `<name>.old`, which `load` falls back to. DCP fsyncs its files; rank 0 fsyncs trainer.pt.
NOTE: on several nodes the directory must be on a filesystem that every rank sees (as DCP itself requires).

`export_hf` gathers the full weights to rank 0 (on the CPU) and writes the native layout through
`checkpoint.save_pretrained` (config.json + sharded safetensors), which transformers, vLLM and openzaya load.
Simplified: rank 0's RNG state is restored on every rank (nothing in the trainer draws random numbers after init).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from .parallel import reshard

TRAINER_STATE = "trainer.pt"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier():
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _quiet():
    """DCP warns at every call in one process that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is (disabled, )?unavailable or uninitialized")
        yield


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    reshard(model)
    return {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}


def save(path: str | Path, model, optimizer, trainer_state: dict):
    """Write model + optimizer shards and `trainer_state` (picklable, rank 0's) atomically to `path`. Every rank
    calls this."""
    import torch.distributed.checkpoint as dcp
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f"{path.name}.old")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    with _quiet():
        dcp.save(_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    if _rank() == 0:
        with open(tmp / TRAINER_STATE, "wb") as f:
            torch.save(trainer_state, f)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(path, old)
        os.rename(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()


def find(path: str | Path) -> Path | None:
    """The checkpoint directory to resume from: `path`, else the `.old` left by a crash mid-swap, else None."""
    path = Path(path)
    for p in (path, path.with_name(f"{path.name}.old")):
        if (p / TRAINER_STATE).exists():
            return p
    return None


def load(path: str | Path, model, optimizer) -> dict:
    """Load model + optimizer shards into this rank's (possibly differently sharded) model and optimizer; returns the
    trainer state. Every rank calls this."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    found = find(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no checkpoint (nor {Path(path).name}.old)")
    state = _state(model, optimizer)
    with _quiet():
        dcp.load(state, checkpoint_id=str(found), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    return torch.load(found / TRAINER_STATE, map_location="cpu", weights_only=False)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's tensors, on rank 0's CPU (other ranks get {}); every rank calls this."""
    if not dist.is_initialized():
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def gathered_model(model):
    """Rank 0: the whole (sharded) model as a plain one-process model on the CPU, built on the gathered tensors
    (in one process on the CPU: a view of `model`'s own weights, no copy); other ranks: None. Every rank calls this."""
    from .model import ZayaForCausalLM
    sd = full_state_dict(model)
    if _rank() != 0:
        return None
    with torch.device("meta"):
        plain = ZayaForCausalLM(model.config)
    plain.load_state_dict(sd, assign=True, strict=True)
    return plain.eval()


def export_hf(model, out_dir: str | Path, extra_files: dict | None = None, dtype: torch.dtype | None = None):
    """Save a (sharded) training model in the Hugging Face native layout at `out_dir`; every rank calls this."""
    from .checkpoint import save_pretrained
    plain = gathered_model(model)
    if plain is not None:
        save_pretrained(plain, out_dir, extra_files=extra_files, dtype=dtype)
    _barrier()
    return Path(out_dir)
