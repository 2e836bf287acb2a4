"""Training data: reasoning corpora from our environments' solvers, answer-preserving trimming, BFD packing.

Follows the ZAYA1-8B technical report (arXiv 2605.05365) §III-A and §VI-B:
- **Corpus** (`generate_corpus`): every own environment (source "openzaya") has a step-by-step solver trace ending in
  `\\boxed{answer}`. A sample is one chat: user = the problem prompt; assistant = `<think>` the trace's steps
  `</think>` the final line with the boxed answer. Environments, difficulties and seeds are mixed, exact duplicates
  (same rendered chat) removed, seeds >= HELD_OUT_SEED_START never used (they are the evaluation problems). Shards are
  JSONL with a manifest (counts per env/difficulty, seeds, sha256 per shard and of the whole corpus). Generation runs
  in a process pool and depends only on the seed (the work is split into fixed chunks, so the pool size does not
  change the output).
- **Answer-preserving (AP) trimming** (`trim_answer_preserving`), the report's four steps, on token ids with the budget
  checked exactly: (1) keep a sample that fits; (2) otherwise cut the tail of the last assistant turn's reasoning just
  before `</think>` (the think block is re-closed, the full answer kept); (3) multi-turn: if that is not enough, drop
  the think blocks of earlier assistant turns and retry (2); (4) drop the sample if its answers alone do not fit.
  `trim_truncate` is the plain-truncation ablation (cut the sequence at the budget, answer lost).
- **Packing** (`pack_bfd`): best-fit-decreasing into fixed windows; each window carries segment ids so the model keeps
  documents apart in attention, RoPE, the CCA convolution and the delayed value (`ZayaForCausalLM(segment_ids_BT=)`).
- **Aggregation SFT** (`aggregation_sft_samples`, `aggregation_chat`, §VI-B): C tau-token tails put into the
  test-time-compute aggregation prompt (`openzaya.ttc.build_aggregation_prompt`), target = a correct solver trace.
  At nano scale the tails are cut from solver reasonings (the problem's own or another's of the same cell); the
  speedrun's aggregation-SFT phase builds the same chats from a model's own rollouts.

Simplified: no web/code mix, no per-context-stage re-trimming schedule (the trainer trims once at its sequence length).

Rendering: `chat_segments` reproduces the nano chat template (openzaya/tokenizer.py) piece by piece, split at added
tokens, so encoding the pieces one by one gives exactly the ids of encoding the rendered text (tested), and we know
which ids are assistant output (loss mask) and which are reasoning (trimmable).
"""

from __future__ import annotations

import hashlib
import json
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

HELD_OUT_SEED_START = 10_000     # seeds >= this are evaluation problems: never in a training corpus
MANIFEST = "manifest.json"


# -----------------------------------------------------------------------------
# Samples from solver traces


def split_trace(solution: str) -> tuple[str, str]:
    """(reasoning, answer) of a solver trace: the answer is the last line holding `\\boxed{`, the rest reasons."""
    lines = solution.strip().split("\n")
    idx = max((i for i, line in enumerate(lines) if "\\boxed{" in line), default=len(lines) - 1)
    reasoning = "\n".join(lines[:idx] + lines[idx + 1:]).strip()
    return reasoning, lines[idx].strip()


def chat_sample(problem) -> dict:
    """One single-turn chat sample (JSON-able) from a Problem with a solution trace."""
    reasoning, answer = split_trace(problem.solution)
    return {"messages": [{"role": "user", "content": problem.prompt},
                         {"role": "assistant", "reasoning": reasoning, "content": answer}],
            "env": problem.env, "difficulty": problem.difficulty, "seed": problem.seed}


def plain_text(sample: dict) -> str:
    """Pretraining text of a chat sample: the problem, then its worked solution (no chat tags)."""
    parts = []
    for m in sample["messages"]:
        parts += [m.get("reasoning") or "", m["content"]] if m["role"] == "assistant" else [m["content"]]
    return "\n".join(p for p in parts if p)


@dataclass
class CorpusConfig:
    envs: list[str] | None = None          # None = every environment of `source`
    source: str = "openzaya"
    difficulties: list[int] = field(default_factory=lambda: [0, 1, 2])
    samples_per_env_level: int = 200       # attempted samples per (env, difficulty); duplicates are removed
    seed: int = 0
    shard_size: int = 5000                 # samples per JSONL shard
    workers: int = 2


def _env_names(cfg: CorpusConfig) -> list[str]:
    from .envs.registry import all_envs
    envs = all_envs()
    if cfg.envs is not None:
        unknown = [n for n in cfg.envs if n not in envs]
        if unknown:
            raise KeyError(f"unknown environments {unknown}")
        return list(cfg.envs)
    return sorted(n for n, e in envs.items() if e.source == cfg.source and e.min_difficulty <= 0 <= e.max_difficulty)


def training_seeds(corpus_seed: int, env: str, difficulty: int, n: int) -> list[int]:
    """n problem seeds below HELD_OUT_SEED_START, a pure function of (corpus seed, env, difficulty)."""
    h = int(hashlib.sha256(f"{corpus_seed}:{env}:{difficulty}".encode()).hexdigest()[:16], 16)
    rng = random.Random(h)
    return rng.sample(range(HELD_OUT_SEED_START), min(n, HELD_OUT_SEED_START))


def _generate_chunk(job: tuple[str, int, list[int]]) -> list[dict]:
    from .envs.registry import get_env
    name, difficulty, seeds = job
    env = get_env(name)
    d = min(max(difficulty, env.min_difficulty), env.max_difficulty)
    out = []
    for s in seeds:
        assert s < HELD_OUT_SEED_START, f"seed {s} is held out"
        p = env.generate(d, s)
        if p.solution:
            out.append(chat_sample(p))
    return out


def sample_key(sample: dict) -> str:
    return hashlib.sha256(json.dumps(sample["messages"], sort_keys=True).encode()).hexdigest()


def generate_corpus(cfg: CorpusConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Generate, deduplicate, shuffle (by cfg.seed) and write shards + manifest. Returns the manifest."""
    from tqdm import tqdm
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(n, d, training_seeds(cfg.seed, n, d, cfg.samples_per_env_level))
            for n in _env_names(cfg) for d in cfg.difficulties]
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            chunks = list(tqdm(pool.map(_generate_chunk, jobs), total=len(jobs), desc="corpus", disable=not progress))
    else:
        chunks = [_generate_chunk(j) for j in tqdm(jobs, desc="corpus", disable=not progress)]
    seen, samples = set(), []
    for chunk in chunks:   # jobs are in a fixed order, so dedup keeps the same sample whatever the pool did
        for s in chunk:
            k = sample_key(s)
            if k not in seen:
                seen.add(k)
                samples.append(s)
    random.Random(cfg.seed).shuffle(samples)
    return write_shards(samples, out_dir, cfg.shard_size, extra={"config": asdict(cfg)})


def write_shards(samples: list[dict], out_dir: str | Path, shard_size: int, extra: dict | None = None) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards, whole = [], hashlib.sha256()
    for i in range(0, max(len(samples), 1), shard_size):
        name = f"shard-{i // shard_size:05d}.jsonl"
        text = "".join(json.dumps(s, ensure_ascii=False) + "\n" for s in samples[i:i + shard_size])
        (out_dir / name).write_text(text)
        digest = hashlib.sha256(text.encode()).hexdigest()
        whole.update(digest.encode())
        shards.append({"file": name, "samples": len(samples[i:i + shard_size]), "sha256": digest})
    counts: dict[str, int] = {}
    for s in samples:
        key = f"{s.get('env', '?')}/d{s.get('difficulty', '?')}"
        counts[key] = counts.get(key, 0) + 1
    seeds = [s["seed"] for s in samples if "seed" in s]
    manifest = {"samples": len(samples), "shards": shards, "sha256": whole.hexdigest(), "counts": counts,
                "seed_range": [min(seeds), max(seeds)] if seeds else None,
                "held_out_seed_start": HELD_OUT_SEED_START, **(extra or {})}
    from .checkpoint import atomic_file
    atomic_file(out_dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
    return manifest


class DataError(ValueError):
    """A missing, corrupt or inconsistent corpus."""


def load_corpus(data_dir: str | Path) -> list[dict]:
    """All samples of a corpus directory, checking the manifest, every shard's sha256 and the held-out rule."""
    data_dir = Path(data_dir)
    mpath = data_dir / MANIFEST
    if not mpath.exists():
        raise DataError(f"{data_dir}: no {MANIFEST} (generate a corpus with `openzaya speedrun` or data.generate_corpus)")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath}: corrupt manifest ({e})") from None
    samples = []
    for sh in manifest["shards"]:
        path = data_dir / sh["file"]
        if not path.exists():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        text = path.read_text()
        if hashlib.sha256(text.encode()).hexdigest() != sh["sha256"]:
            raise DataError(f"{path}: sha256 mismatch with the manifest (corrupt or edited shard)")
        for i, line in enumerate(text.splitlines()):
            try:
                samples.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i + 1}: not JSON ({e})") from None
    bad = [s["seed"] for s in samples if s.get("seed", 0) >= HELD_OUT_SEED_START]
    if bad:
        raise DataError(f"{data_dir}: {len(bad)} samples use held-out seeds (>= {HELD_OUT_SEED_START})")
    return samples


# -----------------------------------------------------------------------------
# Rendering to token ids (nano chat format) with loss masks


@dataclass
class Segment:
    text: str
    kind: str            # "prompt" | "think" (tags) | "reasoning" | "answer"
    turn: int = -1       # assistant turn index (-1 for prompt segments)


def chat_segments(messages: list[dict], bos: str = "<|bos|>", all_reasoning: bool = True) -> list[Segment]:
    """The nano chat template as segments split at added tokens. With all_reasoning=False, only assistant turns after
    the last user turn show their reasoning (exactly the template); True keeps every turn's think block (training
    data whose earlier thoughts are trimmed away only when needed, step 3)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    segs = [Segment(bos, "prompt")]
    turn = 0
    for i, m in enumerate(messages):
        role = m["role"]
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"unknown role {role!r}")
        segs.append(Segment(f"<|{role}|>", "prompt"))
        if role != "assistant":
            segs += [Segment(m["content"], "prompt"), Segment("<|end|>", "prompt"), Segment("\n", "prompt")]
            continue
        reasoning = m.get("reasoning_content") or m.get("reasoning")
        if reasoning and (all_reasoning or i > last_user):
            segs += [Segment("<think>", "think", turn), Segment("\n" + reasoning.strip() + "\n", "reasoning", turn),
                     Segment("</think>", "think", turn)]
            segs.append(Segment("\n" + m["content"], "answer", turn))
        else:
            segs.append(Segment(m["content"], "answer", turn))
        segs += [Segment("<|end|>", "answer", turn), Segment("\n", "answer", turn)]
        turn += 1
    return [s for s in segs if s.text]


def encode_segments(tokenizer, segs: list[Segment]) -> list[list[int]]:
    return tokenizer.encode_batch([s.text for s in segs], add_special_tokens=False)


def flatten(segs: list[Segment], ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """(token ids, loss mask): assistant think tags, reasoning and answers are trained on; prompts are not."""
    out, mask = [], []
    for s, i in zip(segs, ids):
        out += i
        mask += [0 if s.kind == "prompt" else 1] * len(i)
    return out, mask


def trim_answer_preserving(segs: list[Segment], ids: list[list[int]], budget: int, encode):
    """The report's four AP-trimming steps on encoded segments. Returns (segs, ids, action) with action in
    "kept" | "trimmed" | "trimmed_multiturn" | None (dropped: the answers alone exceed the budget).
    `encode(text) -> ids` (no special tokens) encodes the pieces trimming re-renders.
    The returned total length is <= budget, counted exactly on the ids the model will see."""
    total = sum(map(len, ids))
    if total <= budget:                                                          # step 1
        return segs, ids, "kept"
    nl = None
    for action in ("trimmed", "trimmed_multiturn"):
        if action == "trimmed_multiturn":                                        # step 3: drop earlier think blocks
            reasoning_turns = sorted({s.turn for s in segs if s.kind == "reasoning"})
            if len(reasoning_turns) < 2:
                break
            last = reasoning_turns[-1]
            keep = [k for k, s in enumerate(segs) if not (s.kind in ("think", "reasoning") and s.turn != last)]
            # an earlier answer rendered after a think block starts with "\n": the template without reasoning has none
            segs = [segs[k] for k in keep]
            ids = [ids[k] for k in keep]
            for k, s in enumerate(segs):
                if s.kind == "answer" and s.turn != last and s.text.startswith("\n") and s.text != "\n":
                    segs[k] = Segment(s.text[1:], s.kind, s.turn)
                    ids[k] = None
            if any(i is None for i in ids):
                ids = [i if i is not None else encode(segs[k].text) for k, i in enumerate(ids)]
            total = sum(map(len, ids))
            if total <= budget:
                return segs, ids, action
        r = max((k for k, s in enumerate(segs) if s.kind == "reasoning"), default=None)
        if r is None:
            break
        if nl is None:
            nl = encode("\n")
        fixed = total - len(ids[r]) + len(nl)                                    # everything but the kept reasoning
        room = budget - fixed
        if room >= 0:                                                            # step 2: cut the reasoning's tail
            ids = list(ids)
            ids[r] = ids[r][:room] + nl
            segs = list(segs)
            segs[r] = Segment(segs[r].text, "reasoning", segs[r].turn)  # text kept for reference; ids are the truth
            return segs, ids, action
    return segs, ids, None                                                       # step 4: drop


def tokenize_sample(tokenizer, sample: dict, budget: int | None = None, trim: str = "ap"):
    """(ids, loss_mask, action) of a chat sample fitted to `budget` tokens; None when the sample is dropped.
    trim: "ap" = answer-preserving (the report), "truncate" = plain truncation (the ablation)."""
    segs = chat_segments(sample["messages"], bos=tokenizer.bos_token or "")
    ids = encode_segments(tokenizer, segs)
    if budget is None:
        return (*flatten(segs, ids), "kept")
    if trim == "truncate":
        flat, mask = flatten(segs, ids)
        return flat[:budget], mask[:budget], ("kept" if len(flat) <= budget else "truncated")
    if trim != "ap":
        raise ValueError(f"trim must be 'ap' or 'truncate', got {trim!r}")
    segs, ids, action = trim_answer_preserving(segs, ids, budget,
                                               lambda t: tokenizer.encode(t, add_special_tokens=False))
    if action is None:
        return None
    return (*flatten(segs, ids), action)


def tokenize_plain(tokenizer, text: str, budget: int) -> tuple[list[int], list[int]]:
    """Pretraining document: BOS text EOS, loss on everything, cut at the budget."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    if tokenizer.eos_id is not None:
        ids = ids + [tokenizer.eos_id]
    ids = ids[:budget]
    return ids, [1] * len(ids)


# -----------------------------------------------------------------------------
# Best-fit-decreasing packing


def pack_bfd(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of documents per bin: sort by length descending, put each into the open bin with the least remaining
    space that still fits it, open a new bin otherwise (O(n log n) with a sorted list of remaining spaces)."""
    import bisect
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []                       # sorted (remaining space, bin index)
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"document {i} has {n} tokens > window {capacity}: trim before packing")
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            space, b = free.pop(k)
            bins[b].append(i)
            bisect.insort(free, (space - n, b))
        else:
            bins.append([i])
            bisect.insort(free, (capacity - n, len(bins) - 1))
    return bins


def build_windows(docs: list[tuple[list[int], list[int]]], seq_len: int, pad_id: int):
    """Pack (ids, loss_mask) documents into windows of seq_len + 1 tokens (inputs + one shifted target).

    Returns tensors ids [W, seq_len+1], segment ids [W, seq_len+1] (padding = -1) and labels [W, seq_len] with -100
    where there is no target: prompt tokens, padding, and the first token of the next document (never predicted
    across a boundary)."""
    import torch
    bins = pack_bfd([len(d[0]) for d in docs], seq_len + 1)
    W = len(bins)
    ids = torch.full((W, seq_len + 1), pad_id, dtype=torch.long)
    seg = torch.full((W, seq_len + 1), -1, dtype=torch.long)
    lmask = torch.zeros((W, seq_len + 1), dtype=torch.bool)
    for w, b in enumerate(bins):
        pos = 0
        for j, d in enumerate(b):
            t, m = docs[d]
            ids[w, pos:pos + len(t)] = torch.tensor(t)
            seg[w, pos:pos + len(t)] = j
            lmask[w, pos:pos + len(t)] = torch.tensor(m, dtype=torch.bool)
            pos += len(t)
    same = seg[:, 1:] == seg[:, :-1]
    labels = torch.where(same & lmask[:, 1:] & (seg[:, 1:] >= 0), ids[:, 1:], -100)
    return ids, seg, labels


# -----------------------------------------------------------------------------
# Aggregation SFT examples (TR §VI-B)


def aggregation_chat(problem, tails: list[str], template: str, kind: str) -> dict:
    """One aggregation SFT chat: the test-time-compute aggregation prompt over `tails` (ttc.build_aggregation_prompt
    with `template`), target = the problem's solver trace."""
    from .ttc import build_aggregation_prompt
    reasoning, answer = split_trace(problem.solution)
    return {"messages": [{"role": "user", "content": build_aggregation_prompt(problem.prompt, tails, template)},
                         {"role": "assistant", "reasoning": reasoning, "content": answer}],
            "env": problem.env, "difficulty": problem.difficulty, "seed": problem.seed, "kind": kind}


def aggregation_sft_samples(problems, tokenizer, C: int, tau: int, template: str, seed: int = 0) -> list[dict]:
    """Aggregation chats for the SFT mix (TR §VI-B, nano version): for each problem, C candidate tails (the last tau
    tokens of a solver reasoning, `tokenizer.tail_text`: its own with probability 1/2, else that of another problem
    of the same env and difficulty), the aggregation prompt with `template`, target = the problem's solver trace.
    tokenizer None cuts tails of CHARS_PER_TOKEN * tau characters (the speedrun's chats for training the BPE)."""
    from .tokenizer import tail_text
    rng = random.Random(seed)
    by_cell: dict[tuple, list] = {}
    for p in problems:
        by_cell.setdefault((p.env, p.difficulty), []).append(p)
    out = []
    for p in problems:
        others = [q for q in by_cell[(p.env, p.difficulty)] if q.answer != p.answer] or [p]
        tails = []
        for _ in range(C):
            src = p if rng.random() < 0.5 else rng.choice(others)
            tails.append(tail_text(tokenizer, split_trace(src.solution)[0], tau))
        out.append(aggregation_chat(p, tails, template, "aggregation"))
    return out
