"""String-manipulation environments: reversal, character and substring counts, vowels, palindromes, Caesar
cipher both ways, letter sorting, run-length encoding, duplicate removal, rotation, most frequent word and anagram
checks.

Difficulty 0..9 grows the string length (and the shift or alphabet size). Strings are lowercase letters without
spaces so answers compare exactly; yes/no answers are 'yes' or 'no'.
"""

from __future__ import annotations

from collections import Counter

from openzaya.envs.own import make_env

TAGS = ("strings",)
ALPHA = "abcdefghijklmnopqrstuvwxyz"
WORDS = ["apple", "river", "stone", "cloud", "tiger", "maple", "ocean", "lemon", "piano", "robot", "candle", "forest"]


def _word(rng, n, alphabet=ALPHA):
    return "".join(rng.choice(alphabet) for _ in range(n))


def reverse(rng, d):
    s = _word(rng, 4 + 3 * d)
    steps = [f"Read the letters from last to first: {' '.join(reversed(s))}."]
    return f"Reverse the string '{s}'.", s[::-1], steps


def count_char(rng, d):
    alpha = ALPHA[: 3 + d]
    s = _word(rng, 8 + 4 * d, alpha)
    ch = rng.choice(s)
    pos = [str(i + 1) for i, c in enumerate(s) if c == ch]
    steps = [f"'{ch}' appears at positions {', '.join(pos)}.", f"That is {len(pos)} times."]
    return f"How many times does the letter '{ch}' appear in '{s}'?", len(pos), steps


def count_vowels(rng, d):
    s = _word(rng, 6 + 4 * d)
    vs = [c for c in s if c in "aeiou"]
    steps = [f"The vowels are: {' '.join(vs) if vs else 'none'}.", f"That is {len(vs)} vowels."]
    return f"How many vowels (a, e, i, o, u) are in '{s}'?", len(vs), steps


def count_substring(rng, d):
    alpha = ALPHA[: 2 + d // 3]
    s = _word(rng, 10 + 4 * d, alpha)
    sub = _word(rng, 2 + d // 4, alpha)
    hits = [i for i in range(len(s) - len(sub) + 1) if s[i:i + len(sub)] == sub]
    steps = [f"Check every start position: '{sub}' starts at positions "
             f"{', '.join(str(i + 1) for i in hits) if hits else 'none'}.", f"That is {len(hits)} occurrences."]
    return (f"How many times does '{sub}' occur in '{s}' (overlapping occurrences count)?", len(hits), steps)


def palindrome_check(rng, d):
    n = 3 + 2 * d
    half = _word(rng, n // 2, ALPHA[: 3 + d])
    s = half + (rng.choice(ALPHA) if n % 2 else "") + half[::-1]
    if rng.random() < 0.5:                       # break it at one position
        i = rng.randrange(n // 2) if n // 2 else 0
        s = s[:i] + ("z" if s[i] != "z" else "y") + s[i + 1:]
    ok = s == s[::-1]
    steps = [f"Compare letter i with letter {len(s)} - i + 1 from the outside in."]
    for i in range(len(s) // 2):
        steps.append(f"'{s[i]}' vs '{s[-1 - i]}': {'equal' if s[i] == s[-1 - i] else 'different'}.")
        if s[i] != s[-1 - i]:
            break
    return f"Is '{s}' a palindrome?", "yes" if ok else "no", steps


def longest_palindrome(rng, d):
    s = _word(rng, 6 + 3 * d, ALPHA[: 2 + d // 3])
    best = (1, 0)
    steps = []
    for c in range(len(s)):
        for lo, hi in ((c, c), (c, c + 1)):
            while lo >= 0 and hi < len(s) and s[lo] == s[hi]:
                lo, hi = lo - 1, hi + 1
            length = hi - lo - 1
            if length > best[0]:
                best = (length, lo + 1)
                steps.append(f"Expanding around position {c + 1} finds '{s[lo + 1:hi]}' of length {length}.")
    steps.append(f"No centre gives anything longer than {best[0]}.")
    return f"What is the length of the longest palindromic substring of '{s}'?", best[0], steps


def _shift(s, k):
    return "".join(ALPHA[(ALPHA.index(c) + k) % 26] for c in s)


def caesar_encrypt(rng, d):
    s, k = _word(rng, 4 + 2 * d), rng.randint(1, 3 + 2 * d)
    steps = [f"Shift each letter {k} forward: " + ", ".join(f"{c}->{_shift(c, k)}" for c in s) + "."]
    return f"Encrypt '{s}' with a Caesar cipher shifting each letter {k} places forward (z wraps to a).", \
        _shift(s, k), steps


def caesar_decrypt(rng, d):
    s, k = _word(rng, 4 + 2 * d), rng.randint(1, 3 + 2 * d)
    enc = _shift(s, k)
    steps = [f"Shift each letter {k} back: " + ", ".join(f"{c}->{_shift(c, -k)}" for c in enc) + "."]
    return f"'{enc}' was encrypted with a Caesar cipher that shifts letters {k} places forward. Decrypt it.", s, steps


def sort_letters(rng, d):
    s = _word(rng, 5 + 3 * d)
    cnt = sorted(Counter(s).items())
    steps = ["Letter counts in alphabetical order: " + ", ".join(f"{c}x{k}" for c, k in cnt) + "."]
    return f"Sort the letters of '{s}' alphabetically.", "".join(sorted(s)), steps


def run_length(rng, d):
    alpha = ALPHA[: 2 + d // 3]
    s = "".join(rng.choice(alpha) * rng.randint(1, 2 + d // 2) for _ in range(3 + d))
    runs, i = [], 0
    while i < len(s):
        j = i
        while j < len(s) and s[j] == s[i]:
            j += 1
        runs.append((j - i, s[i]))
        i = j
    steps = ["Runs: " + ", ".join(f"{n} x '{c}'" for n, c in runs) + "."]
    return (f"Run-length encode '{s}': write each maximal run as its length followed by its letter (e.g. 'aaab' -> "
            f"'3a1b').", "".join(f"{n}{c}" for n, c in runs), steps)


def dedupe(rng, d):
    s = _word(rng, 6 + 3 * d, ALPHA[: 4 + d])
    seen, out, steps = set(), [], []
    for c in s:
        if c in seen:
            steps.append(f"'{c}' seen before: drop.")
        else:
            seen.add(c)
            out.append(c)
            steps.append(f"'{c}' is new: keep -> {''.join(out)}.")
    return f"Remove repeated letters from '{s}', keeping only the first occurrence of each.", "".join(out), steps


def rotate(rng, d):
    s = _word(rng, 5 + 2 * d)
    k = rng.randint(1, len(s) + 3 * d)
    r = k % len(s)
    steps = [f"Rotating by {k} equals rotating by {k} mod {len(s)} = {r}.",
             f"Move the first {r} letters '{s[:r]}' to the end: {s[r:] + s[:r]}."]
    return f"Rotate '{s}' left by {k} positions (the first letter moves to the end each time).", s[r:] + s[:r], steps


def most_frequent_word(rng, d):
    vocab = rng.sample(WORDS, 3 + d // 2)
    while True:
        text = [rng.choice(vocab) for _ in range(6 + 3 * d)]
        counts = Counter(text).most_common()
        if len(counts) == 1 or counts[0][1] > counts[1][1]:
            break
    steps = ["Counts: " + ", ".join(f"{w}={c}" for w, c in sorted(counts)) + ".",
             f"The largest count is {counts[0][1]}, for '{counts[0][0]}'."]
    return f"Which word occurs most often in: {' '.join(text)}?", counts[0][0], steps


def anagram_check(rng, d):
    a = _word(rng, 4 + 2 * d, ALPHA[: 4 + d])
    b = list(a)
    rng.shuffle(b)
    if rng.random() < 0.5:
        i = rng.randrange(len(b))
        b[i] = "z" if b[i] != "z" else "y"
    b = "".join(b)
    ok = sorted(a) == sorted(b)
    steps = [f"Sorted letters of '{a}': {''.join(sorted(a))}.", f"Sorted letters of '{b}': {''.join(sorted(b))}.",
             "They are equal." if ok else "They differ."]
    return f"Are '{a}' and '{b}' anagrams of each other?", "yes" if ok else "no", steps


def envs():
    yes_no = "yes or no"
    return [
        make_env("reverse_string", TAGS, reverse, fmt="the string"),
        make_env("count_character", TAGS, count_char),
        make_env("count_vowels", TAGS, count_vowels),
        make_env("count_substring", TAGS, count_substring),
        make_env("palindrome_check", TAGS, palindrome_check, fmt=yes_no),
        make_env("longest_palindromic_substring", TAGS, longest_palindrome),
        make_env("caesar_encrypt", TAGS, caesar_encrypt, fmt="the string"),
        make_env("caesar_decrypt", TAGS, caesar_decrypt, fmt="the string"),
        make_env("sort_letters", TAGS, sort_letters, fmt="the string"),
        make_env("run_length_encoding", TAGS, run_length, fmt="the encoded string"),
        make_env("remove_duplicate_letters", TAGS, dedupe, fmt="the string"),
        make_env("rotate_string", TAGS, rotate, fmt="the string"),
        make_env("most_frequent_word", TAGS, most_frequent_word, fmt="the word"),
        make_env("anagram_check", TAGS, anagram_check, fmt=yes_no),
    ]
