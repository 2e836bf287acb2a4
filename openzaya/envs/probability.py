"""Probability environments with exact fractional answers: dice sums, binomial coin flips, drawing without
replacement (hypergeometric), "at least one", expected values, Bayes with two urns, dice duels and independent
events.

Difficulty 0..9 grows the number of dice, flips, draws or events. Answers are fractions p/q in lowest terms and
are scored by exact numeric equality, so '2/4', '0.5' and '\\frac{1}{2}' all count for '1/2'.
"""

from __future__ import annotations

from fractions import Fraction
from math import comb

from openzaya.envs.own import fraction_score, fraction_str, make_env

TAGS = ("probability",)
FMT = "an integer or a fraction p/q in lowest terms"


def dice_sum(rng, d):
    n, faces = 1 + (d + 2) // 3, 6 if d < 6 else rng.choice([6, 8])
    counts = {0: 1}
    steps = []
    for i in range(n):
        new = {}
        for s, c in counts.items():
            for f in range(1, faces + 1):
                new[s + f] = new.get(s + f, 0) + c
        counts = new
        if i:
            steps.append(f"Ways to make each sum with {i + 1} dice (sums {min(counts)}..{max(counts)}): "
                         f"{', '.join(str(counts[k]) for k in sorted(counts))}.")
    target = rng.choice(sorted(counts))
    total = faces ** n
    steps.append(f"There are {faces}^{n} = {total} equally likely outcomes.")
    steps.append(f"The number of outcomes with sum {target} is {counts[target]}.")
    p = Fraction(counts[target], total)
    steps.append(f"P = {counts[target]}/{total} = {fraction_str(p)}.")
    return (f"{n} fair {faces}-sided dice (faces 1..{faces}) are rolled. What is the probability that the sum is "
            f"{target}?", fraction_str(p), steps, {"n_dice": n})


def coin_flips(rng, d):
    n = 3 + 2 * d
    k = rng.randint(0, n)
    p = Fraction(comb(n, k), 2 ** n)
    steps = [f"Each sequence of {n} flips has probability 1/2^{n} = 1/{2 ** n}.",
             f"Sequences with exactly {k} heads: C({n}, {k}) = {comb(n, k)}.",
             f"P = {comb(n, k)}/{2 ** n} = {fraction_str(p)}."]
    return f"A fair coin is flipped {n} times. What is the probability of exactly {k} heads?", fraction_str(p), steps


def hypergeometric(rng, d):
    red, blue = rng.randint(2, 4 + 2 * d), rng.randint(2, 4 + 2 * d)
    m = rng.randint(2, min(red + blue, 2 + d // 2))
    k = rng.randint(max(0, m - blue), min(m, red))
    num = comb(red, k) * comb(blue, m - k)
    p = Fraction(num, comb(red + blue, m))
    steps = [f"Total ways to draw {m} of {red + blue} balls: C({red + blue}, {m}) = {comb(red + blue, m)}.",
             f"Ways with {k} red and {m - k} blue: C({red}, {k}) x C({blue}, {m - k}) = {num}.",
             f"P = {num}/{comb(red + blue, m)} = {fraction_str(p)}."]
    return (f"An urn holds {red} red and {blue} blue balls. {m} balls are drawn without replacement. What is the "
            f"probability that exactly {k} of them are red?", fraction_str(p), steps)


def at_least_one(rng, d):
    n, faces = 2 + d, rng.choice([4, 6, 8, 10])
    miss = Fraction(faces - 1, faces) ** n
    p = 1 - miss
    steps = [f"P(no {faces} in one roll) = {faces - 1}/{faces}.",
             f"P(no {faces} in {n} rolls) = ({faces - 1}/{faces})^{n} = {fraction_str(miss)}.",
             f"P(at least one) = 1 - {fraction_str(miss)} = {fraction_str(p)}."]
    return (f"A fair {faces}-sided die is rolled {n} times. What is the probability of rolling at least one {faces}?",
            fraction_str(p), steps)


def expected_value(rng, d):
    k = 2 + d // 2
    weights = [rng.randint(1, 3 + d) for _ in range(k)]
    total = sum(weights)
    values = rng.sample(range(-5 - 5 * d, 10 + 10 * d), k)
    ev = sum(Fraction(w, total) * v for w, v in zip(weights, values))
    table = ", ".join(f"{v} with probability {fraction_str(Fraction(w, total))}" for v, w in zip(values, weights))
    steps = [f"E = sum of value x probability = ({' + '.join(f'{v} x {w}' for v, w in zip(values, weights))}) / {total}.",
             f"= {sum(v * w for v, w in zip(values, weights))}/{total} = {fraction_str(ev)}."]
    return f"A random variable takes the value {table}. What is its expected value?", fraction_str(ev), steps


def bayes_urns(rng, d):
    hi = 3 + 2 * d
    ra, ba, rb, bb = (rng.randint(1, hi) for _ in range(4))
    pa = Fraction(rng.randint(1, 3 + d), 4 + d)
    pr_a, pr_b = Fraction(ra, ra + ba), Fraction(rb, rb + bb)
    joint_a, joint_b = pa * pr_a, (1 - pa) * pr_b
    post = joint_a / (joint_a + joint_b)
    steps = [f"P(A and red) = {fraction_str(pa)} x {ra}/{ra + ba} = {fraction_str(joint_a)}.",
             f"P(B and red) = {fraction_str(1 - pa)} x {rb}/{rb + bb} = {fraction_str(joint_b)}.",
             f"P(A | red) = {fraction_str(joint_a)} / ({fraction_str(joint_a)} + {fraction_str(joint_b)}) = "
             f"{fraction_str(post)}."]
    return (f"Urn A has {ra} red and {ba} blue balls; urn B has {rb} red and {bb} blue balls. Urn A is chosen with "
            f"probability {fraction_str(pa)}, otherwise urn B, and one ball is drawn. It is red. What is the "
            "probability that it came from urn A?", fraction_str(post), steps)


def dice_duel(rng, d):
    fa, fb = rng.randint(4, 6 + 2 * d), rng.randint(4, 6 + 2 * d)
    wins = sum(1 for a in range(1, fa + 1) for b in range(1, fb + 1) if a > b)
    p = Fraction(wins, fa * fb)
    steps = [f"There are {fa} x {fb} = {fa * fb} equally likely pairs.",
             f"For each value a of the first die, the number of b < a is min(a - 1, {fb}); summing gives {wins}.",
             f"P = {wins}/{fa * fb} = {fraction_str(p)}."]
    return (f"Alice rolls a fair {fa}-sided die and Bob a fair {fb}-sided die (faces start at 1). What is the "
            "probability that Alice's number is strictly greater?", fraction_str(p), steps)


def independent_events(rng, d):
    k = 2 + d // 2
    probs = [Fraction(rng.randint(1, 5 + d), 6 + d) for _ in range(k)]
    want = [rng.random() < 0.5 for _ in range(k)]
    p, steps = Fraction(1), []
    for i, (q, w) in enumerate(zip(probs, want)):
        f = q if w else 1 - q
        steps.append(f"Event {i + 1} {'happens' if w else 'does not happen'}: {fraction_str(f)}; "
                     f"running product {fraction_str(p * f)}.")
        p *= f
    desc = "; ".join(f"event {i + 1} has probability {fraction_str(q)}" for i, q in enumerate(probs))
    which = ", ".join(f"event {i + 1} {'happens' if w else 'does not'}" for i, w in enumerate(want))
    return (f"Independent events: {desc}. What is the probability that {which}?", fraction_str(p), steps)


def envs():
    return [make_env(name, TAGS, fn, fmt=FMT, score_fn=fraction_score) for name, fn in [
        ("dice_sum_probability", dice_sum),
        ("coin_flip_probability", coin_flips),
        ("urn_hypergeometric", hypergeometric),
        ("at_least_one_probability", at_least_one),
        ("expected_value", expected_value),
        ("bayes_two_urns", bayes_urns),
        ("dice_duel_probability", dice_duel),
        ("independent_events", independent_events),
    ]]
