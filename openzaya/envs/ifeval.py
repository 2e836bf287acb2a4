"""Instruction-following environments with verifiable constraints (IFEval-style; our own checkers and prompts).

A problem is a simple writing task plus 1..k constraints (word/sentence/paragraph counts, bullet lists, a title in
<<>>, JSON output, sections, keywords to include/exclude, keyword and letter frequencies, all lowercase/uppercase,
an end phrase, quotation wrapping, no commas, a postscript, placeholders, highlights, a first word, ...). Each
constraint is a checker `check(text, params) -> bool`; families that cannot hold together (JSON and bullets,
lowercase and capital words, quotes and an end phrase) are never combined.

Score: the text is the extracted answer (last \\boxed{} or <answer>...</answer>, so the prompt asks for the
response inside <answer> tags); reward = fraction of constraints satisfied, accuracy = all satisfied, format_ok =
an answer was extracted. Problem.answer is a reference text built to satisfy every constraint (the composer below,
checked at generation), so `\\boxed{answer}` scores 1. Reference texts contain no braces, so boxing is safe.

Environments: `ifeval/<family>` always include that family plus k - 1 others (k = 1 + difficulty // 2), and
`ifeval/mixed` has k = 1 + difficulty constraints; difficulty also raises the numeric thresholds (strictness).
"""

from __future__ import annotations

import json
import random
import re

from openzaya.envs.base import Env, Problem, Score, extract_answer

MAX_LEVEL = 5
TOPICS = ["a rainy morning", "learning to cook", "a city park", "an old library", "the first day at a new job",
          "a bicycle trip", "a quiet lake", "a small bakery", "a winter market", "a garden in spring",
          "a train journey", "a science fair", "a lost umbrella", "a mountain village", "a night sky"]
FILLER = ("the morning light fell softly over quiet streets while people walked slowly toward their day and "
          "small moments of kindness made the place feel warm and calm for everyone who stopped to look around "
          "there was time to notice colors sounds and simple stories that usually pass unseen").split()
KEYWORDS = ["river", "window", "lantern", "harvest", "journey", "silver", "meadow", "compass", "thunder", "garden"]
FORBIDDEN = ["very", "really", "good", "nice", "thing", "stuff", "great", "bad"]
END_PHRASES = ["Is there anything else I can help with?", "That is all for today.", "Thank you for reading."]
START_WORDS = ["Today", "Imagine", "Sometimes", "Honestly", "Yesterday"]


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9']+", text)


def _sentences(text: str) -> int:
    return len([s for s in re.split(r"[.!?]+(?:\s|$)", text) if _words(s)])


# ---------------------------------------------------------------------------------------------------------------
# checkers: family -> (instruction(params), check(text, params))

CHECKERS = {
    "min_words": (lambda p: f"Use at least {p['n']} words.", lambda t, p: len(_words(t)) >= p["n"]),
    "max_words": (lambda p: f"Use at most {p['n']} words.", lambda t, p: len(_words(t)) <= p["n"]),
    "min_sentences": (lambda p: f"Write at least {p['n']} sentences.", lambda t, p: _sentences(t) >= p["n"]),
    "paragraphs": (lambda p: f"Write exactly {p['n']} paragraphs, separated by the markdown divider ***.",
                   lambda t, p: len([x for x in re.split(r"\n\s*\*\*\*\s*\n", t.strip()) if x.strip()]) == p["n"]
                   and t.count("***") == p["n"] - 1),
    "bullets": (lambda p: f"Answer with exactly {p['n']} bullet points, each line starting with '* '.",
                lambda t, p: len(re.findall(r"^\* \S", t, flags=re.MULTILINE)) == p["n"]),
    "title": (lambda p: "Include a title wrapped in double angular brackets, like <<my title>>.",
              lambda t, p: re.search(r"<<[^<>\n]+>>", t) is not None),
    "json": (lambda p: "Your entire output must be valid JSON (you may use a ```json fence).",
             lambda t, p: _is_json(t)),
    "sections": (lambda p: f"Divide the response into {p['n']} sections, each starting with 'SECTION X' "
                           f"(X = 1, 2, ...).",
                 lambda t, p: re.findall(r"^SECTION (\d+)", t, flags=re.MULTILINE) ==
                 [str(i + 1) for i in range(p["n"])]),
    "include_keywords": (lambda p: f"Include the keywords {', '.join(repr(k) for k in p['words'])}.",
                         lambda t, p: all(re.search(rf"\b{k}\b", t, flags=re.IGNORECASE) for k in p["words"])),
    "exclude_keywords": (lambda p: f"Do not use the words {', '.join(repr(k) for k in p['words'])}.",
                         lambda t, p: not any(re.search(rf"\b{k}\b", t, flags=re.IGNORECASE) for k in p["words"])),
    "keyword_frequency": (lambda p: f"Use the word '{p['word']}' at least {p['n']} times.",
                          lambda t, p: len(re.findall(rf"\b{p['word']}\b", t, flags=re.IGNORECASE)) >= p["n"]),
    "letter_frequency": (lambda p: f"The letter '{p['letter']}' must appear at least {p['n']} times.",
                         lambda t, p: t.lower().count(p["letter"]) >= p["n"]),
    "lowercase": (lambda p: "Your entire response must be in lowercase letters; no capital letters.",
                  lambda t, p: t == t.lower() and any(c.isalpha() for c in t)),
    "uppercase": (lambda p: "Your entire response must be in English capital letters only.",
                  lambda t, p: t == t.upper() and any(c.isalpha() for c in t)),
    "end_phrase": (lambda p: f"Finish your response with this exact phrase: {p['phrase']} No other words should "
                             f"follow it.",
                   lambda t, p: t.strip().endswith(p["phrase"])),
    "quotation": (lambda p: "Wrap your entire response in double quotation marks.",
                  lambda t, p: len(t.strip()) > 1 and t.strip()[0] == '"' and t.strip()[-1] == '"'),
    "no_commas": (lambda p: "Do not use any commas.", lambda t, p: "," not in t),
    "postscript": (lambda p: "At the end, add a postscript starting with P.S.",
                   lambda t, p: re.search(r"^\s*P\.S\.", t, flags=re.MULTILINE) is not None),
    "placeholders": (lambda p: f"Include at least {p['n']} placeholders in square brackets, like [address].",
                     lambda t, p: len(re.findall(r"\[[^\[\]\n]+\]", t)) >= p["n"]),
    "highlights": (lambda p: f"Highlight at least {p['n']} parts with markdown, like *highlighted part*.",
                   lambda t, p: len(re.findall(r"(?<!\*)\*[^\n\*]+\*(?!\*)", t)) >= p["n"]),
    "capital_words": (lambda p: f"Use at least {p['n']} words written entirely in capital letters.",
                      lambda t, p: len([w for w in _words(t) if len(w) > 1 and w.isupper()]) >= p["n"]),
    "first_word": (lambda p: f"The first word of your response must be '{p['word']}'.",
                   lambda t, p: (_words(t) or [""])[0] == p["word"]),
}
FAMILIES = sorted(CHECKERS)

# pairs that are never combined
_CONFLICTS = [
    ("json", "*"), ("lowercase", "uppercase"), ("lowercase", "capital_words"), ("lowercase", "title"),
    ("lowercase", "first_word"), ("lowercase", "end_phrase"), ("lowercase", "postscript"), ("lowercase", "sections"),
    ("uppercase", "first_word"), ("uppercase", "end_phrase"), ("uppercase", "exclude_keywords"),
    ("min_words", "max_words"), ("bullets", "paragraphs"), ("bullets", "sections"), ("paragraphs", "sections"),
    ("quotation", "end_phrase"), ("quotation", "first_word"), ("quotation", "postscript"),
    ("max_words", "min_sentences"), ("max_words", "keyword_frequency"), ("max_words", "letter_frequency"),
    ("max_words", "sections"), ("max_words", "paragraphs"), ("max_words", "bullets"), ("max_words", "postscript"),
    ("max_words", "placeholders"), ("max_words", "highlights"), ("max_words", "capital_words"),
    ("max_words", "include_keywords"), ("max_words", "title"), ("no_commas", "include_keywords"),
    ("end_phrase", "postscript"),
]


def _conflict(a: str, b: str) -> bool:
    return any({a, b} == {x, y} or (x == "json" and "json" in (a, b) and a != b) for x, y in _CONFLICTS)


def _is_json(t: str) -> bool:
    t = re.sub(r"^```(?:json)?\s*|\s*```$", "", t.strip())
    try:
        json.loads(t)
        return True
    except ValueError:
        return False


def _params(family: str, rng: random.Random, level: int) -> dict:
    n = {"min_words": 30 + 30 * level, "max_words": 80 - 5 * level, "min_sentences": 3 + level,
         "paragraphs": 2 + level // 2, "bullets": 2 + level // 2, "sections": 2 + level // 2,
         "keyword_frequency": 2 + level // 2, "letter_frequency": 5 + 3 * level, "placeholders": 1 + level // 2,
         "highlights": 1 + level // 2, "capital_words": 2 + level // 2}.get(family, 0)
    p: dict = {"n": n}
    if family == "include_keywords":
        p["words"] = rng.sample(KEYWORDS, 1 + level // 2)
    elif family == "exclude_keywords":
        p["words"] = rng.sample(FORBIDDEN, 2 + level // 2)
    elif family == "keyword_frequency":
        p["word"] = rng.choice(KEYWORDS)
    elif family == "letter_frequency":
        p["letter"] = rng.choice("bcdfgkmpvwy")
    elif family == "end_phrase":
        p["phrase"] = rng.choice(END_PHRASES)
    elif family == "first_word":
        p["word"] = rng.choice(START_WORDS)
    return p


# ---------------------------------------------------------------------------------------------------------------
# the reference composer: a text that satisfies the chosen constraints


def compose(topic: str, cons: dict[str, dict], rng: random.Random) -> str:
    if "json" in cons:
        return json.dumps({"topic": topic, "text": f"A short note about {topic}."})
    budget = cons["max_words"]["n"] - 12 if "max_words" in cons else None
    words_needed = cons.get("min_words", {}).get("n", 20)
    extra: list[str] = []
    if "include_keywords" in cons:
        extra += cons["include_keywords"]["words"]
    if "keyword_frequency" in cons:
        extra += [cons["keyword_frequency"]["word"]] * cons["keyword_frequency"]["n"]
    if "letter_frequency" in cons:
        ch = cons["letter_frequency"]["letter"]
        extra += [ch * 3] * (cons["letter_frequency"]["n"] // 3 + 1)
    if "capital_words" in cons:
        extra += ["NOTE"] * cons["capital_words"]["n"]
    if "placeholders" in cons:
        extra += [f"[place{i}]" for i in range(cons["placeholders"]["n"])]
    if "highlights" in cons:
        extra += [f"*mark{i}*" for i in range(cons["highlights"]["n"])]
    n_sent = max(cons.get("min_sentences", {}).get("n", 2), 2)
    pool = [w for w in FILLER if w not in cons.get("exclude_keywords", {}).get("words", [])]
    total = words_needed if budget is None else min(words_needed, budget)
    body_words = [rng.choice(pool) for _ in range(max(total, 4 * n_sent))] if budget is None else \
        [rng.choice(pool) for _ in range(max(4, min(budget, 20)))]
    for i, w in enumerate(extra):
        body_words.insert((i * 7) % (len(body_words) + 1), w)
    per = max(1, len(body_words) // n_sent)
    sentences = [" ".join(body_words[i:i + per]) for i in range(0, len(body_words), per)]
    sentences = [s[0].upper() + s[1:] + "." if s[0].isalpha() else s + "." for s in sentences]
    parts = 1
    for fam in ("paragraphs", "bullets", "sections"):
        if fam in cons:
            parts = cons[fam]["n"]
    while len(sentences) < parts:
        sentences.append("More to say.")
    chunks = [" ".join(sentences[i::parts]) for i in range(parts)]
    if "bullets" in cons:
        text = "\n".join("* " + c for c in chunks)
    elif "paragraphs" in cons:
        text = "\n\n***\n\n".join(chunks)
    elif "sections" in cons:
        text = "\n".join(f"SECTION {i + 1}\n{c}" for i, c in enumerate(chunks))
    else:
        text = chunks[0]
    if "first_word" in cons:
        text = cons["first_word"]["word"] + " " + text
    if "title" in cons:
        text = f"<<{topic.title()}>>\n" + text
    if "postscript" in cons:
        text += "\n\nP.S. See you soon."
    if "end_phrase" in cons:
        text += " " + cons["end_phrase"]["phrase"]
    if "no_commas" in cons:
        text = text.replace(",", "")
    if "lowercase" in cons:
        text = text.lower()
    if "uppercase" in cons:
        text = text.upper()
    if "quotation" in cons:
        text = f'"{text}"'
    return text


def check_all(text: str, cons: dict[str, dict]) -> dict[str, bool]:
    return {fam: bool(CHECKERS[fam][1](text, p)) for fam, p in cons.items()}


# ---------------------------------------------------------------------------------------------------------------
# environments


def _choose(rng: random.Random, primary: str | None, k: int) -> list[str]:
    chosen = [primary] if primary else []
    for fam in rng.sample(FAMILIES, len(FAMILIES)):
        if len(chosen) >= k:
            break
        if fam not in chosen and not any(_conflict(fam, c) for c in chosen):
            chosen.append(fam)
    return chosen


def score_ifeval(problem: Problem, response: str) -> Score:
    text = extract_answer(response)
    if text is None or not text.strip():
        return Score(0.0, 0.0, False, "no answer found")
    results = check_all(text, problem.metadata["constraints"])
    frac = sum(results.values()) / len(results)
    failed = [f for f, ok in results.items() if not ok]
    return Score(frac, float(not failed), True, "failed: " + ", ".join(failed) if failed else "")


def _make_env(primary: str | None) -> Env:
    env_name = f"ifeval/{primary or 'mixed'}"

    def generate(difficulty: int, seed: int) -> Problem:
        rng = random.Random(f"{env_name}:{difficulty}:{seed}")
        k = 1 + difficulty if primary is None else 1 + difficulty // 2
        for _ in range(20):
            fams = _choose(rng, primary, k)
            cons = {f: _params(f, rng, difficulty) for f in fams}
            topic = rng.choice(TOPICS)
            ref = compose(topic, cons, rng)
            if all(check_all(ref, cons).values()):
                break
        else:
            raise RuntimeError(f"{env_name}: could not compose a reference for {sorted(cons)}")
        lines = "\n".join(f"- {CHECKERS[f][0](p)}" for f, p in cons.items())
        prompt = (f"Write a short piece about {topic}. Follow every instruction:\n{lines}\n\n"
                  "Put your whole response between <answer> and </answer>.")
        return Problem(env=env_name, prompt=prompt, answer=ref, difficulty=difficulty, seed=seed,
                       metadata={"constraints": cons, "topic": topic})

    return Env(name=env_name, tags=("ifeval",), min_difficulty=0, max_difficulty=MAX_LEVEL, generate_fn=generate,
               score_fn=score_ifeval, source="ifeval")


def load_ifeval() -> dict[str, Env]:
    envs = [_make_env(None)] + [_make_env(f) for f in FAMILIES]
    return {e.name: e for e in envs}
