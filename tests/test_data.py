"""Data pipeline: chat rendering, answer-preserving trimming (exact budgets), BFD packing, packed == alone logits,
corpus determinism and held-out exclusion.  Run: .venv/bin/python -m pytest tests/test_data.py"""

import json

import pytest
import torch

from openzaya import data
from openzaya.data import (HELD_OUT_SEED_START, CorpusConfig, build_windows, chat_segments, encode_segments, flatten,
                           generate_corpus, load_corpus, pack_bfd, tokenize_sample)
from openzaya.tokenizer import train_bpe
from tests.zaya_ref import random_model, tiny_config

WORDS = "step one two three four five the answer is boxed compute sum digits reverse string letters".split()


@pytest.fixture(scope="module")
def tok():
    texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + f" {i} + {i * 3} = {i * 4}"
             for i in range(300)]
    return train_bpe(texts, vocab_size=400)


def sample(reasoning_words=40, turns=1):
    msgs = []
    for t in range(turns):
        msgs.append({"role": "user", "content": f"Question {t}: compute 12 + {t}."})
        msgs.append({"role": "assistant", "reasoning": " ".join(["step one two"] * reasoning_words),
                     "content": f"So the answer is \\boxed{{{12 + t}}}."})
    return {"messages": msgs}


def test_segments_match_chat_template(tok):
    s = sample(5)
    segs = chat_segments(s["messages"], bos=tok.bos_token, all_reasoning=False)
    ids, mask = flatten(segs, encode_segments(tok, segs))
    assert "".join(x.text for x in segs) == tok.apply_chat_template(s["messages"])
    assert ids == tok.apply_chat_template(s["messages"], tokenize=True)
    # the loss mask covers exactly the assistant part: from <think> to the final <|end|>\n
    first = mask.index(1)
    assert ids[first] == tok.token_to_id("<think>") and all(mask[first:])


def test_ap_trim_single_turn_exact_budget(tok):
    s = sample(60)
    full, _, action = tokenize_sample(tok, s)
    assert action == "kept"
    assert tokenize_sample(tok, s, budget=len(full))[2] == "kept"
    answer_ids = tok.encode("\nSo the answer is \\boxed{12}.", add_special_tokens=False)
    for budget in (len(full) - 1, len(full) - 37, 60):
        ids, mask, action = tokenize_sample(tok, s, budget=budget)
        assert action == "trimmed" and len(ids) == budget           # fits exactly, no slack wasted
        text = tok.decode(ids)
        assert text.count("<think>") == 1 and text.count("</think>") == 1
        assert text.rstrip().endswith("So the answer is \\boxed{12}.<|end|>")
        assert ids[:20] == full[:20]                                   # the start of the reasoning is kept
        i = ids.index(tok.token_to_id("</think>"))
        assert ids[i + 1:i + 1 + len(answer_ids)] == answer_ids
    # the smallest budget that still fits: empty reasoning; one less drops the sample
    segs = chat_segments(s["messages"], bos=tok.bos_token)
    enc = encode_segments(tok, segs)
    r = [k for k, x in enumerate(segs) if x.kind == "reasoning"][0]
    minimal = sum(map(len, enc)) - len(enc[r]) + len(tok.encode("\n", add_special_tokens=False))
    assert tokenize_sample(tok, s, budget=minimal)[2] == "trimmed"
    assert tokenize_sample(tok, s, budget=minimal - 1) is None


def test_ap_trim_multi_turn(tok):
    s = sample(30, turns=2)
    full = tokenize_sample(tok, s)[0]
    # step 2 suffices: only the last turn's reasoning is cut, the first turn keeps its thoughts
    ids, _, action = tokenize_sample(tok, s, budget=len(full) - 10)
    assert action == "trimmed" and len(ids) == len(full) - 10 and tok.decode(ids).count("<think>") == 2
    # step 2 is not enough (the last reasoning alone cannot absorb the cut): earlier think blocks go first
    segs = chat_segments(s["messages"], bos=tok.bos_token)
    enc = encode_segments(tok, segs)
    last_r = max(k for k, x in enumerate(segs) if x.kind == "reasoning")
    budget = len(full) - len(enc[last_r]) - 5
    ids, _, action = tokenize_sample(tok, s, budget=budget)
    text = tok.decode(ids)
    assert action == "trimmed_multiturn" and len(ids) <= budget
    assert text.count("<think>") == 1 and "\\boxed{12}" in text and "\\boxed{13}" in text
    # after dropping earlier thoughts the layout is the chat template's own (past thoughts are not context)
    no_trim = tokenize_sample(tok, s, budget=10_000)[0]
    templ = tok.apply_chat_template(s["messages"], tokenize=True)
    assert len(templ) < len(no_trim)
    ids, _, action = tokenize_sample(tok, s, budget=len(templ))
    assert action == "trimmed_multiturn" and ids == templ
    # answers alone do not fit: dropped
    assert tokenize_sample(tok, s, budget=20) is None


def test_plain_truncation_loses_the_answer(tok):
    s = sample(60)
    full = tokenize_sample(tok, s)[0]
    ids, _, action = tokenize_sample(tok, s, budget=len(full) // 2, trim="truncate")
    assert action == "truncated" and ids == full[: len(full) // 2] and "boxed" not in tok.decode(ids)


def test_pack_bfd():
    lengths = [7, 5, 4, 3, 3, 2, 1, 1]
    bins = pack_bfd(lengths, 10)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 10 for b in bins)
    assert len(bins) == 3                       # 26 tokens in 10-token bins: optimal
    # best fit: 7 -> bin0 (3 left), 5 -> bin1 (5 left), 4 -> bin1 (1 left), 3 -> bin0 (0 left), 3 -> bin2 ...
    assert bins[0] == [0, 3] and bins[1] == [1, 2, 6]
    with pytest.raises(ValueError, match="trim before packing"):
        pack_bfd([11], 10)


def test_packed_logits_equal_documents_alone():
    torch.set_num_threads(1)
    cfg = tiny_config(layer_types=["hybrid", "hybrid", "hybrid"], sliding_window=None, cca_time0=3, cca_time1=2)
    model = random_model(cfg)
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (n,), generator=g) for n in (9, 5, 1, 7)]
    ids = torch.cat(docs)[None]
    seg = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    with torch.no_grad():
        packed = model(ids, segment_ids_BT=seg)[0]
        wrong = model(ids)[0]
        start = 0
        for d in docs:
            alone = model(d[None])[0]
            torch.testing.assert_close(packed[start:start + len(d)], alone, atol=2e-5, rtol=1e-4)
            start += len(d)
        # without segment ids the later documents see the earlier ones (the test is not vacuous)
        assert (wrong[9:14] - packed[9:14]).abs().max() > 1e-3
        # a sliding-window model too, and a batch of two windows
        cfg2 = tiny_config()
        m2 = random_model(cfg2, seed=1)
        both = m2(torch.stack([ids[0], ids[0].flip(0)]), segment_ids_BT=torch.stack([seg[0], seg[0].flip(0)]))
        torch.testing.assert_close(both[0, :9], m2(docs[0][None])[0], atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(both[1, -9:], m2(docs[0].flip(0)[None])[0], atol=2e-5, rtol=1e-4)
    # gradients too (the convolution takes back cross-document taps after the fact: its backward must as well)
    model.balance_enabled = False
    model(ids, segment_ids_BT=seg)[0].pow(2).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    for d in docs:
        model(d[None])[0].pow(2).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(packed_grads) == {n for n, _ in model.named_parameters()}   # every parameter, both ways
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[n], p.grad, atol=1e-4, rtol=1e-4, msg=n)


def test_build_windows_labels():
    docs = [([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1]), ([6, 7, 8, 9], [1, 1, 1, 1])]
    ids, seg, labels = build_windows(docs, seq_len=5, pad_id=0)
    for w in range(ids.shape[0]):
        for t in range(5):
            if labels[w, t] != -100:   # a target is the next token of the same document, never across
                assert seg[w, t] == seg[w, t + 1] >= 0 and labels[w, t] == ids[w, t + 1]
    assert int((labels != -100).sum()) == 2 + 1 + 3    # masked prompt token 1 is never a target


def test_corpus_deterministic_and_held_out(tmp_path):
    cfg = CorpusConfig(envs=["long_addition", "reverse_string"], difficulties=[0, 1], samples_per_env_level=30,
                       seed=3, shard_size=50, workers=2)
    m1 = generate_corpus(cfg, tmp_path / "a", progress=False)
    m2 = generate_corpus(CorpusConfig(**{**cfg.__dict__, "workers": 1}), tmp_path / "b", progress=False)
    assert m1["sha256"] == m2["sha256"] and m1["samples"] == m2["samples"] > 50 and len(m1["shards"]) >= 2
    samples = load_corpus(tmp_path / "a")
    assert all(s["seed"] < HELD_OUT_SEED_START for s in samples)
    assert len({data.sample_key(s) for s in samples}) == len(samples)              # deduplicated
    assert {s["env"] for s in samples} == {"long_addition", "reverse_string"}
    s = samples[0]["messages"]
    assert s[0]["role"] == "user" and "\\boxed{" in s[1]["content"] and s[1]["reasoning"]
    # corrupt / missing shards fail loudly
    shard = tmp_path / "a" / m1["shards"][0]["file"]
    shard.write_text(shard.read_text().replace("a", "b", 1))
    with pytest.raises(data.DataError, match="sha256"):
        load_corpus(tmp_path / "a")
    shard.unlink()
    with pytest.raises(data.DataError, match="missing"):
        load_corpus(tmp_path / "a")
    with pytest.raises(data.DataError, match="manifest"):
        load_corpus(tmp_path / "nowhere")
    # held-out seeds smuggled into a corpus are refused
    bad = [dict(samples[0], seed=HELD_OUT_SEED_START + 1)]
    data.write_shards(bad, tmp_path / "c", 10)
    with pytest.raises(data.DataError, match="held-out"):
        load_corpus(tmp_path / "c")


def test_aggregation_sft_samples_with_tokenizer(tok):
    from openzaya.envs.registry import get_env
    from openzaya.ttc import AGGREGATION_TEMPLATE_V1
    probs = [get_env("long_addition").generate(0, s) for s in range(3)]
    ex = data.aggregation_sft_samples(probs, tok, C=3, tau=16, template=AGGREGATION_TEMPLATE_V1, seed=0)
    assert len(ex) == 3 and ex[0]["kind"] == "aggregation"
    assert probs[0].prompt.split("\n")[0] in ex[0]["messages"][0]["content"]
    assert "\\boxed{" + probs[0].answer + "}" in ex[0]["messages"][1]["content"]
    json.dumps(ex)
