"""lm-evaluation-harness against `openzaya serve`, offline: tasks defined in local YAML files over local JSONL files,
run through lm-eval's `local-completions` (a log-likelihood multiple-choice task and a generation task) and
`local-chat-completions` (a generation task), with lm-eval's remote tokenizer (the server's /tokenizer_info and
/tokenize; no tokenizer download).

The answers are built from the served model itself, computed independently of the server: the multiple-choice gold
is the choice a plain forward pass of the model scores highest (never the first choice), the generation targets are
the engine's own greedy texts. So the expected accuracy is 1.0, against 0.0 for "always the first choice", which is
what lm-eval reported when the server ignored `echo` (every choice scored alike); and every per-choice
log-likelihood lm-eval logs equals the plain forward pass's.

Run: .venv/bin/python -m pytest tests/test_lm_eval.py
"""

import json

import pytest
import torch

from openzaya.checkpoint import save_pretrained
from openzaya.engine import GenParams
from openzaya.model import ZayaForCausalLM
from openzaya.serve import ServeConfig, load_app
from openzaya.tokenizer import split_reasoning, train_bpe
from server_thread import ServerThread
from zaya_ref import tiny_config

KEY = "sk-lm-eval"
QUESTIONS = [f"{a} plus {b} is" for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (2, 9),
                                                (6, 6), (8, 3), (4, 12), (10, 1)]]
CHOICES = ["3", "7", "11", "15", "19", "23"]


def _checkpoint(path):
    """A tiny model with a wide init (its choices score apart) and a BPE tokenizer over the arithmetic texts."""
    tok = train_bpe([f"{a} plus {b} is {a + b}." for a in range(30) for b in range(30)], vocab_size=300)
    cfg = tiny_config(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                      pad_token_id=tok.pad_id, initializer_range=0.3)
    torch.manual_seed(0)
    save_pretrained(ZayaForCausalLM(cfg), path)
    tok.save(path)
    return path


@torch.no_grad()
def _loglikelihood(model, tok, context, continuation):
    """lm-eval's split of (context, continuation) into tokens (no BOS), scored by a plain forward pass."""
    whole = tok.encode(context + continuation, add_special_tokens=False)
    ctx = tok.encode(context, add_special_tokens=False)
    logp = torch.log_softmax(model(torch.tensor([whole]))[0].float(), -1)
    return sum(logp[t - 1, whole[t]].item() for t in range(len(ctx), len(whole)))


def _write_tasks(root, model, tok, greedy, chat_greedy):
    """The three tasks: YAML + JSONL each; returns the MC items' expected per-choice log-likelihoods."""
    mc, gen, chat, expected = [], [], [], []
    for q in QUESTIONS:
        lls = [_loglikelihood(model, tok, q, " " + c) for c in CHOICES]
        best = max(range(len(CHOICES)), key=lambda i: lls[i])
        margin = lls[best] - max(v for i, v in enumerate(lls) if i != best)
        if margin > 1e-2:   # rounding cannot flip the winner
            order = [best] + [i for i in range(len(CHOICES)) if i != best]
            k = 1 + len(mc) % (len(CHOICES) - 1)            # the gold goes anywhere but first
            order = order[1:k + 1] + [order[0]] + order[k + 1:]
            mc.append({"question": q, "choices": [CHOICES[i] for i in order], "gold": k})
            expected.append([lls[i] for i in order])
        if greedy[q].strip():
            gen.append({"question": q, "answer": greedy[q]})
        if chat_greedy[q].strip():
            chat.append({"question": q, "answer": chat_greedy[q]})
    common = "test_split: test\nnum_fewshot: 0\ndataset_path: json\n"
    gen_kwargs = "  until: [\"\\n\"]\n  max_gen_toks: 8\n  do_sample: false\n  temperature: 0\n"
    specs = {
        "oz_mc": (mc, "output_type: multiple_choice\ndoc_to_text: \"{{question}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                      "doc_to_target: \"{{gold}}\"\nmetric_list:\n  - metric: acc\n"),
        "oz_gen": (gen, "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
                        f"generation_kwargs:\n{gen_kwargs}metric_list:\n  - metric: exact_match\n"),
        "oz_chat": (chat, "output_type: generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"{{answer}}\"\n"
                          f"generation_kwargs:\n{gen_kwargs}  chat_template_kwargs:\n    enable_thinking: false\n"
                          "metric_list:\n  - metric: exact_match\n"),
    }
    for name, (rows, body) in specs.items():
        data = root / f"{name}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{name}.yaml").write_text(f"task: {name}\n{common}dataset_kwargs:\n  data_files:\n"
                                           f"    test: {data}\n  cache_dir: {root / 'hf-cache'}\n{body}")
    return mc, gen, chat, expected


def test_lm_eval_local_completions_and_chat_against_the_server(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    app = load_app(_checkpoint(tmp_path / "m"), ServeConfig(max_slots=8, max_len=256, api_key=KEY))
    srv = app.state.srv
    model, tok = srv.engine.model, srv.tokenizer
    stops = ["\n", tok.eos_token]                              # lm-eval adds the tokenizer's eos text to `until`
    prompts = [tok.encode(q, add_special_tokens=False) for q in QUESTIONS]
    chat_prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            enable_thinking=False, tokenize=True) for q in QUESTIONS]
    gp = GenParams(temperature=0, max_new_tokens=8, stop=stops, eos_ids=srv.eos_ids)
    out = srv.engine.generate(prompts + chat_prompts, gp)      # before the server starts: the engine is ours
    greedy = {q: r.text for q, r in zip(QUESTIONS, out)}
    chat_greedy = {q: split_reasoning(r.text, thinking=False)[1] for q, r in zip(QUESTIONS, out[len(QUESTIONS):])}
    mc, gen, chat, expected = _write_tasks(tmp_path, model, tok, greedy, chat_greedy)
    assert len(mc) >= 6 and len(gen) >= 4 and len(chat) >= 4, (len(mc), len(gen), len(chat))
    assert all(item["gold"] != 0 for item in mc)                 # "always the first choice" scores 0

    tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
    with ServerThread(app) as s:
        name = srv.model_name
        common = f"model={name},max_length=256,max_retries=1,tokenizer_backend=remote"
        comp = lm_eval.simple_evaluate(model="local-completions", tasks=["oz_mc", "oz_gen"], task_manager=tasks,
                                       model_args=f"{common},base_url={s.url}/v1/completions,batch_size=4",
                                       log_samples=True)
        chat_res = lm_eval.simple_evaluate(model="local-chat-completions", tasks=["oz_chat"], task_manager=tasks,
                                           model_args=f"model={name},base_url={s.url}/v1/chat/completions",
                                           apply_chat_template=True, log_samples=True)
        metrics = srv.metrics.render(srv.sched)
    res = {**comp["results"], **chat_res["results"]}
    print({k: {m: v for m, v in r.items() if m.endswith(",none")} for k, r in res.items()})
    assert res["oz_mc"]["acc,none"] == 1.0
    assert res["oz_gen"]["exact_match,none"] == 1.0 and res["oz_chat"]["exact_match,none"] == 1.0
    got = {s["doc"]["question"]: [r[0] for r in s["filtered_resps"]] for s in comp["samples"]["oz_mc"]}
    for item, want in zip(mc, expected):
        lls = [x if isinstance(x, float) else x[0] for x in got[item["question"]]]
        assert lls == pytest.approx(want, abs=1e-3)                # the server's echo logprobs, choice by choice
        assert len(set(round(v, 4) for v in lls)) == len(lls)      # no two choices scored alike
    assert 'openzaya_requests_total{code="200",endpoint="/v1/completions"}' in metrics
    assert 'openzaya_requests_total{code="200",endpoint="/v1/chat/completions"}' in metrics
    assert '/tokenize"' in metrics
