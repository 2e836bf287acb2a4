"""LocalBackend: our engine behind the backend interface, on a tiny checkpoint with a trained BPE tokenizer.

Run: .venv/bin/python -m pytest tests/test_local_backend.py
"""

import pytest
import torch

from openzaya.backends import LocalBackend, Request, SamplingParams
from openzaya.checkpoint import save_pretrained
from openzaya.model import ZayaForCausalLM
from openzaya.tokenizer import Tokenizer, train_bpe
from zaya_ref import tiny_config


def make_checkpoint(path):
    texts = [f"{a} plus {b} is {a + b}." for a in range(30) for b in range(30)]
    tok = train_bpe(texts, vocab_size=300)
    cfg = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    save_pretrained(ZayaForCausalLM(cfg), path)
    tok.save(path)
    return path


def test_local_backend_generates_with_usage_and_logprobs(tmp_path):
    backend = LocalBackend(make_checkpoint(tmp_path / "m"), max_slots=4, max_len=128)
    reqs = [Request(prompt="1 plus 2 is", params=SamplingParams(temperature=0, max_tokens=8)),
            Request(messages=[{"role": "user", "content": "3 plus 4?"}],
                    params=SamplingParams(temperature=1.0, max_tokens=6, n=3, seed=7))]
    out = backend.generate(reqs)
    assert [len(c) for c in out] == [1, 3]
    for comps, r in zip(out, reqs):
        for c in comps:
            assert c.prompt_tokens == len(backend.prompt_ids(r))
            assert c.completion_tokens == len(c.token_ids) == len(c.logprobs) <= r.params.max_tokens
            assert all(lp <= 0 for lp in c.logprobs)
            assert c.finish_reason in ("stop", "length")
    again = backend.generate(reqs)
    assert [c.token_ids for c in again[1]] == [c.token_ids for c in out[1]]   # seeds reproduce
    assert backend.count_tokens("1 plus 2 is 3.") == len(backend.tokenizer.encode("1 plus 2 is 3.",
                                                                                  add_special_tokens=False))


@pytest.mark.slow
def test_local_backend_compiled_decode_matches_eager(tmp_path):
    """`--compile` (solve / eval) reaches LocalBackend's engine; its greedy tokens are the eager ones."""
    from openzaya import cli

    path = make_checkpoint(tmp_path / "m")
    reqs = [Request(prompt=p, params=SamplingParams(temperature=0, max_tokens=n))
            for p, n in [("1 plus 2 is", 8), ("3 plus 4", 5), ("12 plus 13 is", 11)]]
    want = LocalBackend(path, max_slots=2, max_len=64).generate(reqs)
    a = cli.build_parser().parse_args(["solve", "q", "--model", str(path), "--max-len", "64", "--compile"])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = cli._backend(a).generate(reqs)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0        # the decode step really was compiled
    assert [c.token_ids for [c] in got] == [c.token_ids for [c] in want]
    assert all(abs(x - y) < 1e-4 for [c], [w] in zip(got, want) for x, y in zip(c.logprobs, w.logprobs))


def test_hub_repo_id_resolves_through_the_hf_cache(tmp_path, monkeypatch):
    """`--model owner/name` (not a local directory) goes through huggingface_hub's snapshot_download: here offline,
    from a Hub cache laid out as huggingface_hub writes it; a repo that is not there and a path that is neither fail
    with the name in the message."""
    import shutil
    import sys

    import huggingface_hub.constants as hub
    from fastapi.testclient import TestClient

    from openzaya.checkpoint import from_pretrained
    from openzaya.serve import load_app

    local = make_checkpoint(tmp_path / "m")
    cache, sha = tmp_path / "hub", "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(local, cache / "models--openzaya-test--tiny" / "snapshots" / sha)
    (cache / "models--openzaya-test--tiny" / "refs").mkdir()
    (cache / "models--openzaya-test--tiny" / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)

    reqs = [Request(prompt="1 plus 2 is", params=SamplingParams(temperature=0, max_tokens=8))]
    want = LocalBackend(local, max_slots=2, max_len=64).generate(reqs)
    got = LocalBackend("openzaya-test/tiny", max_slots=2, max_len=64).generate(reqs)
    assert got[0][0].token_ids == want[0][0].token_ids and got[0][0].text == want[0][0].text
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(from_pretrained(f"openzaya-test/tiny@{sha}")(ids), from_pretrained(local)(ids))
    with TestClient(load_app("openzaya-test/tiny")) as client:          # served under the repo id, as vLLM does
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["openzaya-test/tiny"]
    monkeypatch.setitem(sys.modules, "transformers", None)     # the tokenizer files are read without transformers
    assert Tokenizer.load("openzaya-test/tiny").encode("7 plus 8") == Tokenizer.load(local).encode("7 plus 8")
    with pytest.raises(FileNotFoundError, match="openzaya-test/missing.*Hugging Face Hub"):
        from_pretrained("openzaya-test/missing")
    with pytest.raises(FileNotFoundError, match="not a Hub repo id"):
        from_pretrained(str(tmp_path / "no" / "such" / "dir"))
