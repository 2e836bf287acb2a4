"""Checkpoints in the Hugging Face native layout: `config.json` + safetensors (sharded with an index when large).

Weight names are exactly those of transformers' `ZayaForCausalLM` (spec §9), so a directory written by
`transformers` loads here and the reverse. Loading is memory-mapped (safetensors) and dtype-aware; the model is
built on the meta device and the loaded tensors are assigned in place, so peak memory is one copy of the weights.
Saving is atomic: everything is written to a temporary sibling directory, fsynced, then swapped in with renames, so
a crash mid-save never destroys the last good checkpoint (if a crash hits between the two renames, the previous
checkpoint is left complete at `<dir>.old`). `atomic_dir` and `atomic_file` are that rule for every directory and
file the package publishes (trainer checkpoints, RL trainer state, corpus manifests, the tokenizer cache). Their
temporaries are named `.<name>.tmp-<pid>@<host>`; the next save of the same path, and every load of a checkpoint
directory, removes those of processes of this host that are no longer alive (a killed save left a whole checkpoint
behind each time). Where a directory is expected, a Hugging Face Hub repo id works too: `resolve_model_dir` fetches
(or finds) its files in huggingface_hub's cache.

Loading refuses, naming the field or tensor: config values out of range (`check_config`: non-positive sizes or
eps, non-finite rope theta, token ids outside the vocabulary, wrong types, a layer count the weights do not have)
and non-finite weights (NaN / inf, also those a cast to a smaller dtype creates; `check_finite=False` loads them
anyway). Resuming a run with other settings than it was saved with is refused by the trainer through
`config_changes` (the differences, listed).

NOTE: transformers 5.23 re-initialises `balancing_biases` on load (spec §10.1, item 9); we always load the stored
values.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
from pathlib import Path
from typing import BinaryIO, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import ZayaConfig, ZayaForCausalLM

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TIED_KEY = "lm_head.weight"


def _fsync_dir(directory: Path):
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    """The temporary sibling a save of `path` writes first: `.<name>.tmp-<pid>@<host>` (the host: on a shared
    filesystem, a pid is only this host's to check)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}@{socket.gethostname()}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # someone else's process
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporaries of saves of `path` whose process is dead (killed mid-save): `.<name>.tmp-<pid>` (no
    host: written by an older version, on this host) or `.<name>.tmp-<pid>@<this host>`. Temporaries of live
    processes, or of other hosts, are kept. Returns what was removed."""
    path = Path(path)
    pattern = re.compile(re.escape(f".{path.name}.tmp-") + r"(\d+)(?:@(.+))?")
    removed = []
    if not path.parent.is_dir():
        return removed
    for p in path.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m is None or (m[2] is not None and m[2] != socket.gethostname()) or _pid_alive(int(m[1])):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def atomic_file(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write the file `path` atomically and durably: `write(f)` fills a temporary sibling opened "wb", which is
    flushed, fsynced and renamed over `path`; a crash leaves the old file or the new one, never a torn one (an
    error inside `write` removes the temporary file). Stale temporaries of dead processes are removed first."""
    path = Path(path)
    remove_stale_temporaries(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def atomic_dir(out_dir: str | Path, fill: Callable[[Path], object], replace: bool = True) -> Path:
    """Write the directory `out_dir` atomically and durably: `fill(tmp)` writes a temporary sibling directory, whose
    files are fsynced, then it is swapped in with renames (an existing `out_dir` moves to `<out_dir>.old`, removed
    after the swap). replace=False: an `out_dir` that exists by then (another process published it first) is kept
    and ours discarded. An error inside `fill` removes the temporary directory. Stale temporaries of dead processes
    are removed first."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    tmp = _temporary(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        for p in tmp.iterdir():  # durability before the swap
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_dir.exists() and not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        return out_dir
    old = out_dir.with_name(f"{out_dir.name}.old")
    if out_dir.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    _fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
    return out_dir


def state_for_saving(model: ZayaForCausalLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds, by their native names (a tied lm_head is not written)."""
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop(TIED_KEY, None)
    return sd


def save_pretrained(model: ZayaForCausalLM, out_dir: str | Path, max_shard_bytes: int = 5 * 1024**3,
                    extra_files: dict[str, str | bytes] | None = None, dtype: torch.dtype | None = None):
    """Write `out_dir` atomically: config.json, safetensors shard(s) (+ index when sharded), extra files.

    extra_files maps a file name to its contents (e.g. tokenizer files) so the directory is swapped in whole."""
    sd = state_for_saving(model)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() and k.split(".")[-1] != "balancing_biases" else v)
              for k, v in sd.items()}
    config_dict = model.config.to_dict()
    config_dict["dtype"] = str(next(v for v in sd.values() if v.is_floating_point()).dtype).replace("torch.", "")

    def fill(tmp: Path):
        (tmp / "config.json").write_text(json.dumps(config_dict, indent=2) + "\n")
        _write_shards(sd, tmp, max_shard_bytes)
        for name, content in (extra_files or {}).items():
            mode = "wb" if isinstance(content, bytes) else "w"
            with open(tmp / name, mode) as f:
                f.write(content)

    return atomic_dir(out_dir, fill)


def _write_shards(sd: dict[str, torch.Tensor], directory: Path, max_shard_bytes: int):
    """safetensors file(s) of at most max_shard_bytes each, with an index when there are several."""
    shards, cur, cur_bytes = [], {}, 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if cur and cur_bytes + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = v
        cur_bytes += nbytes
    shards.append(cur)
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], directory / WEIGHTS, metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, directory / name, metadata=meta)
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (directory / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def weight_files(ckpt_dir: Path) -> dict[str, Path]:
    """name -> file, from the index when sharded, else from the single safetensors file."""
    if (ckpt_dir / INDEX).exists():
        index = json.loads((ckpt_dir / INDEX).read_text())
        return {k: ckpt_dir / f for k, f in index["weight_map"].items()}
    single = ckpt_dir / WEIGHTS
    if not single.exists():
        raise FileNotFoundError(f"{ckpt_dir}: neither {WEIGHTS} nor {INDEX} found")
    with safe_open(single, framework="pt") as f:
        return {k: single for k in f.keys()}


def load_state_dict(ckpt_dir: str | Path, dtype: torch.dtype | None = None, device="cpu",
                    skip: set[str] = frozenset()) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint directory but `skip` (memory-mapped reads), cast to `dtype` if given (floating
    only; balancing biases stay fp32)."""
    ckpt_dir = Path(ckpt_dir)
    by_file: dict[Path, list[str]] = {}
    for k, f in weight_files(ckpt_dir).items():
        if k not in skip:
            by_file.setdefault(f, []).append(k)
    sd = {}
    for f, keys in by_file.items():
        with safe_open(f, framework="pt", device=str(device)) as fh:
            for k in keys:
                t = fh.get_tensor(k)
                if dtype is not None and t.is_floating_point() and not k.endswith("balancing_biases"):
                    t = t.to(dtype)
                sd[k] = t
    return sd


SIZE_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
               "head_dim", "moe_intermediate_size", "num_experts", "router_hidden_size", "max_position_embeddings",
               "cca_time0", "cca_time1")


def check_config(d: dict) -> None:
    """Raise ValueError, naming the field, for a config.json value that would build a broken model: sizes that are
    not positive integers, a non-positive or non-finite rms_norm_eps, rope thetas that are not finite and positive,
    a partial rotary factor outside (0, 1], a sliding window that is not a positive integer, token ids outside
    [0, vocab_size). (Consistency between fields is `ZayaConfig.validate`'s.)"""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    for name in SIZE_FIELDS:
        v = d.get(name)
        if name in d and not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
            raise ValueError(f"config field {name} must be a positive integer, got {v!r}")
    eps = d.get("rms_norm_eps", 1e-5)
    if not (number(eps) and math.isfinite(eps) and eps > 0):
        raise ValueError(f"config field rms_norm_eps must be a finite number > 0, got {eps!r}")
    ropes = d.get("rope_parameters") or {}
    if not isinstance(ropes, dict):
        raise ValueError(f"config field rope_parameters must be an object, got {ropes!r}")
    thetas = {f"rope_parameters.{t}.rope_theta": (r or {}).get("rope_theta", 1.0) for t, r in ropes.items()}
    if "rope_theta" in d:
        thetas["rope_theta"] = d["rope_theta"]
    for name, theta in thetas.items():
        if not (number(theta) and math.isfinite(theta) and theta > 0):
            raise ValueError(f"config field {name} must be a finite number > 0, got {theta!r}")
    for t, r in ropes.items():
        f = (r or {}).get("partial_rotary_factor", 1.0)
        if not (number(f) and 0 < f <= 1):
            raise ValueError(f"config field rope_parameters.{t}.partial_rotary_factor must be in (0, 1], got {f!r}")
    window = d.get("sliding_window")
    if window is not None and not (isinstance(window, int) and not isinstance(window, bool) and window > 0):
        raise ValueError(f"config field sliding_window must be a positive integer or null, got {window!r}")
    vocab = d.get("vocab_size", ZayaConfig.vocab_size)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        ids = d.get(name)
        for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
            if not (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab):
                raise ValueError(f"config field {name} must hold token ids in [0, {vocab}), got {ids!r}")


def load_config(ckpt_dir: Path) -> ZayaConfig:
    """The checkpoint's config, checked (`check_config`, `ZayaConfig.validate`) and held against its weights: the
    layers the config counts must be the layers the weight files have (before a model of that size is built)."""
    if not (ckpt_dir / "config.json").exists():
        raise FileNotFoundError(f"{ckpt_dir}: no config.json (is this a ZAYA checkpoint directory?)")
    d = json.loads((ckpt_dir / "config.json").read_text())
    if not isinstance(d, dict):
        raise ValueError(f"{ckpt_dir}/config.json: not a JSON object")
    try:
        check_config(d)
        cfg = ZayaConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{ckpt_dir}/config.json: {e}") from None
    layers = {int(m[1]) for k in weight_files(ckpt_dir) if (m := re.match(r"model\.layers\.(\d+)\.", k))}
    if layers != set(range(cfg.num_hidden_layers)):
        raise ValueError(f"{ckpt_dir}/config.json: num_hidden_layers is {cfg.num_hidden_layers}, the weights have "
                         f"{len(layers)} layers" + ("" if not layers else f" (indices {min(layers)}..{max(layers)})"))
    return cfg


def non_finite_count(t: torch.Tensor, chunk: int = 1 << 24) -> int:
    """NaN and inf values in a tensor, counted in chunks (the temporary mask stays small)."""
    if not t.is_floating_point():
        return 0
    flat = t.reshape(-1)
    return sum(int((~torch.isfinite(flat[i:i + chunk])).sum()) for i in range(0, flat.numel(), chunk))


def refuse_non_finite(name: str, t: torch.Tensor, where) -> None:
    """Raise ValueError naming the tensor when it holds a NaN or an inf."""
    n = non_finite_count(t)
    if n:
        raise ValueError(f"{where}: weight {name} has {n} non-finite values (NaN or inf) in {t.dtype}; refusing to "
                         f"load a damaged checkpoint (check_finite=False loads it anyway)")


def load_checked_state_dict(ckpt_dir: Path, cfg: ZayaConfig, expected: dict, dtype, device,
                            skip: set[str] = frozenset(), check_finite: bool = True) -> dict[str, torch.Tensor]:
    """The one loader of a checkpoint's tensors (from_pretrained, load_weights_into, offload.load_offloaded): read
    all but `skip` with load_state_dict's dtype rules, fold a tied lm_head into the embedding, and check the result
    against `expected` (a state_dict of the target model): same keys, same shapes, and (check_finite) no NaN
    or inf, also none made by the cast to `dtype`. Removes stale save temporaries of the directory first."""
    remove_stale_temporaries(ckpt_dir)
    sd = load_state_dict(ckpt_dir, dtype=dtype, device=device, skip=skip)
    if cfg.tie_word_embeddings:
        tied = sd.pop(TIED_KEY, None)
        if tied is not None and "model.embed_tokens.weight" not in sd:
            sd["model.embed_tokens.weight"] = tied
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise KeyError(f"{ckpt_dir}: checkpoint does not match the config; "
                       f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
                       f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(expected[k].shape):
            raise ValueError(f"{ckpt_dir}: weight {k} has shape {tuple(v.shape)}, "
                             f"the config expects {tuple(expected[k].shape)}")
        if check_finite:
            refuse_non_finite(k, v, ckpt_dir)
    return sd


TOKENIZER_FILES = ["tokenizer*", "special_tokens_map.json", "chat_template.jinja"]
HUB_FILES = ["config.json", "generation_config.json", "*.safetensors", INDEX, *TOKENIZER_FILES]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def resolve_model_dir(name_or_path: str | Path, allow_patterns: list[str] = HUB_FILES) -> Path:
    """A local checkpoint directory as given; otherwise a Hugging Face Hub repo id ("Zyphra/ZAYA1-8B", or
    "owner/name@revision") whose files matching `allow_patterns` (default: config, safetensors, tokenizer)
    huggingface_hub fetches into its cache (or finds there: HF_HUB_OFFLINE=1 never touches the network; HF_TOKEN and
    HF_HUB_CACHE are honoured). Returns the local directory."""
    path = Path(name_or_path)
    if path.exists():
        return path
    repo_id, _, revision = str(name_or_path).partition("@")
    if not _REPO_ID.fullmatch(repo_id):
        raise FileNotFoundError(f"{name_or_path}: no such checkpoint directory, and not a Hub repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=allow_patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError) as e:   # a typo'd local path lands here too: say both
        raise FileNotFoundError(f"{name_or_path}: no such local directory, and the Hugging Face Hub gave: "
                                f"{type(e).__name__}: {e}") from e


def from_pretrained(ckpt_dir: str | Path, dtype: torch.dtype | None = None, device="cpu",
                    check_finite: bool = True) -> ZayaForCausalLM:
    """Load a native-layout ZAYA checkpoint (ours or transformers'), from a directory or a Hub repo id
    (`resolve_model_dir`). dtype defaults to the config's. check_finite=False loads NaN / inf weights too."""
    ckpt_dir = resolve_model_dir(ckpt_dir)
    cfg = load_config(ckpt_dir)
    dtype = dtype or cfg.torch_dtype
    with torch.device("meta"):
        model = ZayaForCausalLM(cfg)
    sd = load_checked_state_dict(ckpt_dir, cfg, model.state_dict(), dtype, device, check_finite=check_finite)
    model.load_state_dict(sd, assign=True, strict=True)
    cfg.dtype = str(dtype).replace("torch.", "")
    return model.to(device).eval()


@torch.no_grad()
def load_weights_into(model: ZayaForCausalLM, ckpt_dir: str | Path, check_finite: bool = True) -> int:
    """Copy a checkpoint's weights into an existing model in place (same config; dtype and device are the model's),
    e.g. a server picking up an RL trainer's new policy. Checks everything (non-finite values included, unless
    check_finite=False) before changing anything. Returns the number of tensors copied."""
    ckpt_dir = Path(ckpt_dir)
    cfg = load_config(ckpt_dir)
    target = model.state_dict()
    p = next(model.parameters())
    sd = load_checked_state_dict(ckpt_dir, cfg, target, p.dtype, p.device, check_finite=check_finite)
    for k, v in sd.items():
        target[k].copy_(v)
    return len(sd)


def config_changes(old: dict, new: dict, ignore=()) -> list[str]:
    """The settings that differ between a run's saved config and the one it is resumed with, as "name: old -> new"
    lines (names in `ignore` left out: those that do not change what is trained, e.g. the output directory). A
    setting only one side has counts as changed (None on the other)."""
    names = sorted((set(old) | set(new)) - set(ignore))
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in names if old.get(k) != new.get(k)]
