"""`openzaya train-tiny`: train a tiny ZAYA model on a built-in synthetic corpus and print samples.

The smallest end-to-end check of the model: a byte-level vocabulary, a synthetic corpus of additions of two
numbers below 20 ("17+5=22"), AdamW, the router's bias balancing on, one dense log line per step, greedy samples decoded with the
model's own cache at the end, and the checkpoint saved in the Hugging Face layout under runs/.
Simplified on purpose: no tokenizer training, no packing, no schedule beyond a linear warmup.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import save_pretrained
from .model import ZayaCache, ZayaConfig, ZayaForCausalLM

BOS, EOS = 256, 257   # byte-level vocabulary: 256 bytes + 2 specials


def synthetic_corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"{a}+{b}={a + b}" for a, b in ((rng.randint(0, 19), rng.randint(0, 19)) for _ in range(n))]


def encode(text: str) -> list[int]:
    return [BOS] + list(text.encode()) + [EOS]


def decode(ids: list[int]) -> str:
    return bytes(i for i in ids if i < 256).decode(errors="replace")


@torch.no_grad()
def greedy(model: ZayaForCausalLM, prompt: str, max_new_tokens: int = 8) -> str:
    ids = torch.tensor([encode(prompt)[:-1]])
    cache = ZayaCache(model.config, 1, ids.shape[1] + max_new_tokens)
    logits = model(ids, cache=cache)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(logits[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
        logits = model(torch.tensor([[nxt]]), cache=cache)
    return decode(out)


def main(args):
    torch.manual_seed(args.seed)
    cfg = ZayaConfig(vocab_size=258, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, moe_intermediate_size=64, num_experts=4,
                     router_hidden_size=16, bos_token_id=BOS, eos_token_id=EOS, pad_token_id=EOS)
    model = ZayaForCausalLM(cfg).train()
    model.balance_lr = 1e-2
    corpus = synthetic_corpus(20_000, args.seed)
    held_out = synthetic_corpus(20, args.seed + 1)
    seqs = [encode(s) for s in corpus]
    width = max(map(len, seqs))
    data = torch.full((len(seqs), width), EOS)
    for i, s in enumerate(seqs):
        data[i, :len(s)] = torch.tensor(s)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"tiny ZAYA: {n_params / 1e6:.2f}M parameters, {cfg.num_experts} experts, {len(corpus)} sequences")

    # ----- training loop: one dense line per step
    t0 = time.time()
    for step in range(args.steps):
        lr = 3e-3 * min(1.0, (step + 1) / 30)
        for g in opt.param_groups:
            g["lr"] = lr
        batch = data[torch.randint(0, len(seqs), (64,))]
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        stats = model.expert_load_stats()
        model.update_balancing_biases()
        if step % 25 == 0 or step == args.steps - 1:
            load = max(s["max_mean"] for s in stats)
            skip = sum(s["skip"] for s in stats) / len(stats)
            tok_s = (step + 1) * batch.numel() / (time.time() - t0)
            print(f"step {step:05d}/{args.steps:05d} | loss {loss.item():.4f} | lr {lr:.2e} | gnorm {gnorm:.2f} "
                  f"| load max/mean {load:.2f} | skip {skip:.2f} | tok/s {tok_s:.0f}")

    # ----- greedy samples (a fresh draw of the same 400 possible sums)
    model.eval()
    correct = 0
    for s in held_out[:10]:
        prompt = s.split("=")[0] + "="
        got = greedy(model, prompt)
        ok = got == s.split("=")[1]
        correct += ok
        print(f"  {prompt}{got:<6s} {'ok' if ok else 'expected ' + s.split('=')[1]}")
    print(f"sample exact match: {correct}/10")
    out = save_pretrained(model, Path(args.out) / "model")
    print(f"saved {out}")
