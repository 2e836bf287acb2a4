"""Combinatorics and counting environments: binomials, permutations, factorials, Catalan numbers, Stirling
numbers of the second kind, derangements, lattice paths with blocked cells, integer partitions, stars and bars,
word rearrangements and staircase climbing.

Difficulty 0..9 grows n (and grid size / number of allowed step sizes). All answers are exact integers; traces
use the recurrences (Pascal, Stirling, partition DP) rather than closed forms where that is more instructive.
"""

from __future__ import annotations

from collections import Counter
from math import comb, factorial, perm

from openzaya.envs.own import make_env

TAGS = ("combinatorics",)


def binomial(rng, d):
    n = rng.randint(4 + 2 * d, 6 + 3 * d)
    k = rng.randint(1, n // 2)
    num = " x ".join(str(n - i) for i in range(k))
    steps = [f"C({n}, {k}) = ({num}) / {k}!.", f"The numerator is {perm(n, k)} and {k}! = {factorial(k)}.",
             f"{perm(n, k)} / {factorial(k)} = {comb(n, k)}."]
    return f"In how many ways can you choose {k} items from {n} distinct items?", comb(n, k), steps


def permutations(rng, d):
    n = rng.randint(4 + d, 6 + 2 * d)
    k = rng.randint(2, min(n, 2 + d // 2))
    steps, acc = [], 1
    for i in range(k):
        steps.append(f"Position {i + 1}: {n - i} choices; running product {acc * (n - i)}.")
        acc *= n - i
    return (f"In how many ways can {k} distinct prizes be given to {k} different people chosen from {n} "
            "people (each person gets at most one prize)?", acc, steps)


def factorial_env(rng, d):
    n = rng.randint(3 + d, 5 + 2 * d)
    steps, acc = [], 1
    for i in range(2, n + 1):
        steps.append(f"{acc} x {i} = {acc * i}.")
        acc *= i
    return f"Compute {n}!.", acc, steps


def catalan(rng, d):
    n = rng.randint(2 + d, 3 + 2 * d)
    c = [1]
    steps = ["C_0 = 1, and C_{m+1} = sum over i of C_i x C_{m-i}."]
    for m in range(n):
        c.append(sum(c[i] * c[m - i] for i in range(m + 1)))
        steps.append(f"C_{m + 1} = {c[-1]}.")
    return (f"How many balanced strings of {n} pairs of parentheses are there?", c[n], steps)


def stirling2(rng, d):
    n = rng.randint(3 + d // 2, 4 + d)
    k = rng.randint(2, n - 1)
    S = [[0] * (k + 1) for _ in range(n + 1)]
    S[0][0] = 1
    steps = ["Use S(m, j) = j x S(m-1, j) + S(m-1, j-1) with S(0, 0) = 1."]
    for m in range(1, n + 1):
        for j in range(1, k + 1):
            S[m][j] = j * S[m - 1][j] + S[m - 1][j - 1]
        steps.append(f"Row m = {m}: S(m, 1..{k}) = {', '.join(map(str, S[m][1:]))}.")
    return (f"In how many ways can {n} distinct objects be split into exactly {k} nonempty unlabeled groups?",
            S[n][k], steps)


def derangements(rng, d):
    n = rng.randint(3 + d // 2, 4 + d)
    D = [1, 0]
    steps = ["D(0) = 1, D(1) = 0, and D(m) = (m - 1) x (D(m-1) + D(m-2))."]
    for m in range(2, n + 1):
        D.append((m - 1) * (D[-1] + D[-2]))
        steps.append(f"D({m}) = {m - 1} x ({D[-2]} + {D[-3]}) = {D[-1]}.")
    return (f"{n} people each put their hat in a pile and then each takes one hat back. In how many ways can this "
            "happen so that nobody gets their own hat?", D[n], steps)


def lattice_paths(rng, d):
    rows, cols = 2 + d // 2, 3 + (d + 1) // 2
    n_block = d // 2 + (1 if d else 0)
    while True:
        cells = [(r, c) for r in range(rows) for c in range(cols) if (r, c) not in ((0, 0), (rows - 1, cols - 1))]
        blocked = set(rng.sample(cells, min(n_block, len(cells))))
        ways = [[0] * cols for _ in range(rows)]
        for r in range(rows):
            for c in range(cols):
                if (r, c) in blocked:
                    continue
                ways[r][c] = 1 if (r, c) == (0, 0) else (ways[r - 1][c] if r else 0) + (ways[r][c - 1] if c else 0)
        if ways[-1][-1]:
            break
    grid = "\n".join("".join("#" if (r, c) in blocked else "." for c in range(cols)) for r in range(rows))
    steps = ["Count paths into each cell: ways = ways from above + ways from the left, 0 on '#'."]
    steps += [f"Row {r + 1}: {' '.join(map(str, ways[r]))}." for r in range(rows)]
    return (f"In this grid ('#' is blocked), count the paths from the top-left cell to the bottom-right cell that "
            f"only move right or down:\n{grid}", ways[-1][-1], steps)


def partitions(rng, d):
    n = rng.randint(4 + 2 * d, 6 + 3 * d)
    p = [1] + [0] * n
    steps = ["Add allowed part sizes one at a time: ways[s] += ways[s - part]."]
    for part in range(1, n + 1):
        for s in range(part, n + 1):
            p[s] += p[s - part]
        if part <= 4 or part == n:
            steps.append(f"With parts up to {part}: ways[{n}] = {p[n]}.")
    return (f"In how many ways can {n} be written as a sum of positive integers, ignoring order?", p[n], steps)


def stars_and_bars(rng, d):
    k = rng.randint(2, 3 + d // 2)
    lo = rng.randint(0, d // 3)
    n = rng.randint(k * lo + 2, k * lo + 5 + 3 * d)
    m = n - k * lo
    steps = ([f"Substitute y_i = x_i - {lo} >= 0: the y_i sum to {n} - {k} x {lo} = {m}."] if lo else []) + \
        [f"Stars and bars: C({m} + {k} - 1, {k} - 1) = C({m + k - 1}, {k - 1}) = {comb(m + k - 1, k - 1)}."]
    return (f"How many integer solutions does x_1 + ... + x_{k} = {n} have with every x_i >= {lo}?",
            comb(m + k - 1, k - 1), steps)


def word_arrangements(rng, d):
    n = 4 + d
    letters = "ABCDEFG"[: 2 + d // 3]
    word = "".join(rng.choice(letters) for _ in range(n))
    cnt = sorted(Counter(word).items())
    den = 1
    for _, c in cnt:
        den *= factorial(c)
    ans = factorial(n) // den
    steps = [f"Letter counts: {', '.join(f'{ch}={c}' for ch, c in cnt)}.",
             f"{n}! / ({' x '.join(f'{c}!' for _, c in cnt)}) = {factorial(n)} / {den} = {ans}."]
    return f"How many distinct strings can be formed by rearranging all letters of {word}?", ans, steps


def staircase(rng, d):
    n = rng.randint(4 + 2 * d, 6 + 3 * d)
    sizes = sorted(rng.sample(range(1, 4 + d // 3), 2 + d // 4))
    ways = [1] + [0] * n
    for s in range(1, n + 1):
        ways[s] = sum(ways[s - k] for k in sizes if k <= s)
    steps = [f"ways[s] = sum of ways[s - k] for k in {sizes}, with ways[0] = 1.",
             f"ways[0..{n}] = {', '.join(map(str, ways))}."]
    return (f"A staircase has {n} steps. Each move climbs {', '.join(map(str, sizes[:-1]))} or {sizes[-1]} steps. "
            "In how many ordered ways can you reach the top exactly?", ways[n], steps)


def envs():
    return [
        make_env("binomial_coefficient", TAGS, binomial),
        make_env("permutations_count", TAGS, permutations),
        make_env("factorial", TAGS, factorial_env),
        make_env("catalan_number", TAGS, catalan),
        make_env("stirling_second_kind", TAGS, stirling2),
        make_env("derangements", TAGS, derangements),
        make_env("lattice_paths_blocked", TAGS, lattice_paths),
        make_env("integer_partitions", TAGS, partitions),
        make_env("stars_and_bars", TAGS, stars_and_bars),
        make_env("word_arrangements", TAGS, word_arrangements),
        make_env("staircase_climbing", TAGS, staircase),
    ]
