"""Number-theory environments: gcd (Euclid), lcm, modular arithmetic, modular exponentiation, modular inverse,
Chinese remainder theorem, prime counting, prime factorisation, divisor counts and sums, digit sums, base
conversion both ways.

Difficulty 0..9 grows the size of the numbers (and the number of congruences for CRT). Answers are integers
except factorisations ('2^3*3*5') and base-b digit strings. Simplified: moduli stay small enough that the traces
remain readable (square-and-multiply and extended Euclid are written out).
"""

from __future__ import annotations

from math import gcd, prod

from openzaya.envs.own import compact_score, make_env

TAGS = ("number_theory",)
DIGITS = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _euclid_steps(a: int, b: int) -> list[str]:
    steps = []
    while b:
        steps.append(f"{a} = {a // b} x {b} + {a % b}.")
        a, b = b, a % b
    steps.append(f"The last nonzero remainder is {a}.")
    return steps


def _factorize(n: int) -> list[tuple[int, int]]:
    out, p = [], 2
    while p * p <= n:
        e = 0
        while n % p == 0:
            n //= p
            e += 1
        if e:
            out.append((p, e))
        p += 1
    if n > 1:
        out.append((n, 1))
    return out


def _fact_str(fs) -> str:
    return "*".join(f"{p}^{e}" if e > 1 else str(p) for p, e in fs)


def gcd_env(rng, d):
    g = rng.randint(1, 5 + 10 * d)
    hi = 10 ** (1 + d // 2)
    a, b = g * rng.randint(2, hi), g * rng.randint(2, hi)
    a, b = max(a, b), min(a, b)
    return f"What is gcd({a}, {b})?", gcd(a, b), _euclid_steps(a, b)


def lcm_env(rng, d):
    hi = 6 + 12 * d
    a, b = rng.randint(2, hi), rng.randint(2, hi)
    g = gcd(a, b)
    steps = _euclid_steps(max(a, b), min(a, b)) + [f"lcm = {a} x {b} / {g} = {a * b // g}."]
    return f"What is lcm({a}, {b})?", a * b // g, steps


def modular_arith(rng, d):
    m = rng.randint(3, 10 + 15 * d)
    a, b, c = (rng.randint(10, 10 ** (2 + d // 3)) for _ in range(3))
    steps = [f"{a} mod {m} = {a % m} and {b} mod {m} = {b % m}.",
             f"{a % m} x {b % m} = {(a % m) * (b % m)}, which is {(a * b) % m} mod {m}.",
             f"{(a * b) % m} + {c} = {(a * b) % m + c}, which is {(a * b + c) % m} mod {m}."]
    return f"Compute ({a} x {b} + {c}) mod {m}.", (a * b + c) % m, steps


def mod_pow(rng, d):
    m = rng.randint(5, 20 + 40 * d)
    base, e = rng.randint(2, m - 1), rng.randint(5, 10 * 2 ** d)
    steps = [f"Write {e} in binary: {bin(e)[2:]}."]
    result, sq, k = 1, base % m, e
    while k:
        if k & 1:
            steps.append(f"Bit set: result = {result} x {sq} mod {m} = {result * sq % m}.")
            result = result * sq % m
        k >>= 1
        if k:
            steps.append(f"Square: {sq}^2 mod {m} = {sq * sq % m}.")
            sq = sq * sq % m
    return f"Compute {base}^{e} mod {m}.", result, steps, {"exponent": e}


def mod_inverse(rng, d):
    m = rng.randint(5, 15 + 40 * d)
    a = rng.choice([x for x in range(2, m) if gcd(x, m) == 1] or [1])
    # extended Euclid, logged
    steps, (r0, r1), (s0, s1) = [], (m, a), (0, 1)
    while r1:
        q = r0 // r1
        steps.append(f"{r0} = {q} x {r1} + {r0 - q * r1}; coefficient of {a}: {s0} - {q} x {s1} = {s0 - q * s1}.")
        r0, r1, s0, s1 = r1, r0 - q * r1, s1, s0 - q * s1
    inv = s0 % m
    steps.append(f"So {a} x {s0} = 1 mod {m}, and {s0} mod {m} = {inv}. Check: {a} x {inv} = {a * inv} = 1 mod {m}.")
    return f"Find the inverse of {a} modulo {m}, as an integer in [0, {m - 1}].", inv, steps


def crt(rng, d):
    k = 2 + d // 4
    primes = [p for p in range(2, 60) if all(p % q for q in range(2, p))]
    mods = sorted(rng.sample(primes[: 5 + 2 * d], k))
    rems = [rng.randint(0, m - 1) for m in mods]
    M = prod(mods)
    x, step_m, steps = rems[0], mods[0], [f"Start with x = {rems[0]} (mod {mods[0]})."]
    for m, r in zip(mods[1:], rems[1:]):
        t = 0
        while (x + t * step_m) % m != r:
            t += 1
        steps.append(f"Try x = {x} + t x {step_m}: t = {t} gives {x + t * step_m} = {r} (mod {m}).")
        x, step_m = x + t * step_m, step_m * m
    cond = ", ".join(f"x = {r} (mod {m})" for m, r in zip(mods, rems))
    return f"Find the smallest nonnegative x with {cond}.", x, steps + [f"x is unique modulo {M}."]


def prime_count(rng, d):
    n = rng.randint(10 + 20 * d, 30 + 40 * d)
    primes = [p for p in range(2, n + 1) if all(p % q for q in range(2, int(p ** 0.5) + 1))]
    steps = [f"Sieve out multiples of each prime up to sqrt({n}).",
             f"The primes up to {n} are {', '.join(map(str, primes))}.", f"Counting them gives {len(primes)}."]
    return f"How many primes are less than or equal to {n}?", len(primes), steps


def factorization(rng, d):
    small = [2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37][: 4 + d]
    n = 1
    for _ in range(2 + d // 2):
        n *= rng.choice(small)
    steps, rest = [], n
    for p, e in _factorize(n):
        for _ in range(e):
            steps.append(f"{rest} / {p} = {rest // p}.")
            rest //= p
    return f"Give the prime factorisation of {n}.", _fact_str(_factorize(n)), steps, {"n": n}


def divisor_count(rng, d):
    n = rng.randint(12, 50 + 150 * d)
    fs = _factorize(n)
    steps = [f"{n} = {_fact_str(fs)}.",
             "The number of divisors is the product of (exponent + 1): "
             + " x ".join(f"({e} + 1)" for _, e in fs) + f" = {prod(e + 1 for _, e in fs)}."]
    return f"How many positive divisors does {n} have?", prod(e + 1 for _, e in fs), steps


def divisor_sum(rng, d):
    n = rng.randint(6, 30 + 60 * d)
    divs = [k for k in range(1, n + 1) if n % k == 0]
    steps = [f"The divisors of {n} are {', '.join(map(str, divs))}.", f"Their sum is {sum(divs)}."]
    return f"What is the sum of all positive divisors of {n}?", sum(divs), steps


def digit_sum(rng, d):
    n = rng.randint(10 ** (1 + d), 10 ** (2 + d) - 1)
    ds = list(map(int, str(n)))
    return (f"What is the sum of the digits of {n}?", sum(ds), [f"{' + '.join(map(str, ds))} = {sum(ds)}."])


def to_base(rng, d):
    b = rng.choice([2, 3, 5, 7, 8] if d < 5 else [3, 6, 7, 9, 11, 12, 16])
    n = rng.randint(b, 20 * 4 ** d)
    steps, k, digits = [], n, []
    while k:
        steps.append(f"{k} = {k // b} x {b} + {k % b} (digit {DIGITS[k % b]}).")
        digits.append(DIGITS[k % b])
        k //= b
    ans = "".join(reversed(digits))
    steps.append(f"Reading the digits from last to first gives {ans}.")
    return f"Write the decimal number {n} in base {b} (digits above 9 are A, B, C, ...).", ans, steps


def from_base(rng, d):
    b = rng.choice([2, 3, 5, 8] if d < 5 else [3, 6, 7, 9, 12, 16])
    n = rng.randint(b, 20 * 4 ** d)
    s, k = "", n
    while k:
        s, k = DIGITS[k % b] + s, k // b
    steps, acc = [], 0
    for ch in s:
        steps.append(f"{acc} x {b} + {DIGITS.index(ch)} = {acc * b + DIGITS.index(ch)}.")
        acc = acc * b + DIGITS.index(ch)
    return f"Convert the base-{b} number {s} to decimal.", n, steps


def envs():
    return [
        make_env("gcd", TAGS, gcd_env),
        make_env("lcm", TAGS, lcm_env),
        make_env("modular_arithmetic", TAGS, modular_arith),
        make_env("modular_exponentiation", TAGS, mod_pow),
        make_env("modular_inverse", TAGS, mod_inverse),
        make_env("chinese_remainder", TAGS, crt),
        make_env("prime_count", TAGS, prime_count),
        make_env("prime_factorization", TAGS, factorization,
                 fmt="primes in increasing order joined by *, with ^ for powers, e.g. 2^3*3*5", score_fn=compact_score),
        make_env("divisor_count", TAGS, divisor_count),
        make_env("divisor_sum", TAGS, divisor_sum),
        make_env("digit_sum", TAGS, digit_sum),
        make_env("decimal_to_base", TAGS, to_base, fmt="the digit string without prefix or subscript",
                 score_fn=compact_score),
        make_env("base_to_decimal", TAGS, from_base),
    ]
