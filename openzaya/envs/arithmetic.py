"""Arithmetic and algebra environments: multi-step arithmetic, long addition and multiplication, division,
linear equations, 2x2 systems, quadratics with integer roots, polynomial evaluation, fractions, percentages,
powers, means and sequences.

Difficulty 0..9 grows the number of digits, operands or steps. Answers are integers, reduced fractions or short
comma-separated lists. Simplified: no decimals beyond exact percentages, no symbolic answers.
"""

from __future__ import annotations

from fractions import Fraction

from openzaya.envs.own import compact_score, fraction_score, fraction_str, make_env

TAGS = ("arithmetic",)
ALG = ("algebra",)


def _digits(rng, n: int) -> int:
    """A random n-digit positive integer."""
    return rng.randint(10 ** (n - 1), 10 ** n - 1)


def multi_step(rng, d):
    n_ops = 2 + d                       # 2..11 operations
    hi = 10 + 10 * d
    value = rng.randint(1, hi)
    expr, steps = str(value), []
    for _ in range(n_ops):
        op = rng.choice("+-*")
        b = rng.randint(2, 9 if op == "*" else hi)
        new = value + b if op == "+" else value - b if op == "-" else value * b
        steps.append(f"{value} {op} {b} = {new}.")
        expr, value = f"({expr} {op} {b})", new
    return f"Compute {expr[1:-1]}.", value, steps, {"n_ops": n_ops}


def long_addition(rng, d):
    k, nd = 2 + d // 3, 2 + d
    nums = [_digits(rng, nd) for _ in range(k)]
    steps, total = [], 0
    for x in nums:
        steps.append(f"{total} + {x} = {total + x}.")
        total += x
    return f"Compute {' + '.join(map(str, nums))}.", total, steps[1:] or steps


def multiplication(rng, d):
    a, b = _digits(rng, 1 + (d + 1) // 2), _digits(rng, 1 + d // 2)
    steps, total = [], 0
    for i, ch in enumerate(reversed(str(b))):
        part = a * int(ch) * 10 ** i
        total += part
        steps.append(f"{a} x {ch} x {10 ** i} = {part}; running total {total}.")
    return f"Compute {a} x {b}.", a * b, steps, {"digits": len(str(a)) + len(str(b))}


def division_remainder(rng, d):
    b = _digits(rng, 1 + d // 3)
    q = _digits(rng, 1 + (d + 1) // 2)
    r = rng.randint(0, b - 1)
    a = q * b + r
    steps = [f"{b} x {q} = {q * b}.", f"{a} - {q * b} = {r}, and 0 <= {r} < {b}."]
    return (f"Divide {a} by {b}. Give the quotient and the remainder.", f"{q},{r}", steps)


def linear_equation(rng, d):
    hi = 3 + 4 * d
    x = rng.randint(-hi, hi)
    a = rng.choice([i for i in range(-hi, hi + 1) if i != 0])
    c = rng.choice([i for i in range(-hi, hi + 1) if i not in (0, a)]) if d >= 3 else 0
    b = rng.randint(-hi * 3, hi * 3)
    rhs_const = a * x + b - c * x
    lhs = f"{a}x + {b}".replace("+ -", "- ")
    rhs = (f"{c}x + {rhs_const}".replace("+ -", "- ")) if c else str(rhs_const)
    steps = [f"Move the x terms to the left: ({a} - {c})x = {rhs_const} - {b}." if c
             else f"Subtract {b} from both sides: {a}x = {rhs_const} - {b}.",
             f"So {a - c}x = {rhs_const - b}.",
             f"Divide by {a - c}: x = {x}."]
    return f"Solve for x: {lhs} = {rhs}.", x, steps


def linear_system(rng, d):
    hi = 2 + 3 * d
    while True:
        x, y = rng.randint(-hi, hi), rng.randint(-hi, hi)
        a, b, c, e = (rng.choice([i for i in range(-hi, hi + 1) if i]) for _ in range(4))
        det = a * e - b * c
        if det != 0:
            break
    p, q = a * x + b * y, c * x + e * y
    fmt = lambda u, v, w: f"{u}x + {v}y = {w}".replace("+ -", "- ")
    par = lambda v: f"({v})" if v < 0 else str(v)
    steps = [f"Multiply the first equation by {par(e)} and the second by {par(b)}: {fmt(a * e, b * e, p * e)} and "
             f"{fmt(b * c, b * e, q * b)}.",
             f"Subtract: ({a * e} - {par(b * c)})x = {p * e} - {par(q * b)}, so {det}x = {p * e - q * b} and x = {x}.",
             f"Substitute into the first equation: {b}y = {p} - {par(a)} * {par(x)} = {p - a * x}, so y = {y}."]
    return (f"Solve the system:\n{fmt(a, b, p)}\n{fmt(c, e, q)}", f"{x},{y}", steps)


def quadratic_roots(rng, d):
    hi = 3 + 3 * d
    r1, r2 = sorted((rng.randint(-hi, hi), rng.randint(-hi, hi)))
    b, c = -(r1 + r2), r1 * r2
    eq = f"x^2 + {b}x + {c} = 0".replace("+ -", "- ")
    steps = [f"We need two numbers with sum {-b} and product {c}: they are {r1} and {r2}.",
             f"So x^2 + {b}x + {c} = (x - {r1})(x - {r2})".replace("+ -", "- ").replace("- -", "+ ") + ".",
             f"The roots in increasing order are {r1} and {r2}."]
    return f"Find the roots of {eq}.", f"{r1},{r2}", steps


def polynomial_eval(rng, d):
    deg = 1 + d // 2
    coeffs = [rng.randint(-5 - d, 5 + d) for _ in range(deg + 1)]
    coeffs[0] = coeffs[0] or 1
    x = rng.randint(-2 - d // 3, 2 + d // 3)
    terms = [f"{c}x^{deg - i}" if deg - i > 1 else f"{c}x" if deg - i == 1 else f"{c}"
             for i, c in enumerate(coeffs)]
    poly = " + ".join(terms).replace("+ -", "- ")
    steps, acc = [f"Use Horner's rule with x = {x}, starting from the leading coefficient {coeffs[0]}."], coeffs[0]
    for c in coeffs[1:]:
        steps.append(f"{acc} * {x} + {c} = {acc * x + c}.")
        acc = acc * x + c
    return f"Evaluate p(x) = {poly} at x = {x}.", acc, steps, {"degree": deg}


def fraction_arith(rng, d):
    hi = 4 + 3 * d
    n_terms = 2 + d // 4
    pairs = [(rng.randint(1, hi), rng.randint(2, hi)) for _ in range(n_terms)]   # shown unreduced, as drawn
    ops = [rng.choice("+-*" if d < 5 else "+-*/") for _ in range(n_terms - 1)]
    val, steps = Fraction(*pairs[0]), []
    expr = f"{pairs[0][0]}/{pairs[0][1]}"
    for op, (num, den) in zip(ops, pairs[1:]):
        f = Fraction(num, den)
        new = {"+": val + f, "-": val - f, "*": val * f, "/": val / f}[op]
        steps.append(f"{fraction_str(val)} {op} {num}/{den} = {fraction_str(new)} (in lowest terms).")
        val = new
        expr = f"({expr}) {op} ({num}/{den})" if op in "*/" else f"{expr} {op} {num}/{den}"
    return (f"Compute {expr}.", fraction_str(val), steps)


def percentage(rng, d):
    n_changes = 1 + d // 3
    value = start = Fraction(100 * rng.randint(1, 5 + 20 * d))
    steps, parts = [], []
    for _ in range(n_changes):
        p = rng.choice([5, 10, 20, 25, 50] if d < 4 else list(range(1, 60)))
        up = rng.random() < 0.5
        new = value * (100 + p if up else 100 - p) / 100
        parts.append(f"{'increased' if up else 'decreased'} by {p}%")
        steps.append(f"{fraction_str(value)} {'+' if up else '-'} {p}% of it = {fraction_str(value)} x "
                     f"{100 + p if up else 100 - p}/100 = {fraction_str(new)}.")
        value = new
    return (f"Start with {start}. It is {', then '.join(parts)}. What is the final value?",
            fraction_str(value), steps)


def power(rng, d):
    base = rng.randint(2, 3 + d)
    exp = rng.randint(2, 3 + d)
    steps, acc = [], base
    for k in range(2, exp + 1):
        steps.append(f"{base}^{k} = {acc} x {base} = {acc * base}.")
        acc *= base
    return f"Compute {base}^{exp}.", acc, steps


def mean_of_list(rng, d):
    n = 3 + d
    nums = [rng.randint(1, 10 + 20 * d) for _ in range(n - 1)]
    need = (-sum(nums)) % n
    nums.append(rng.choice([x for x in range(1, 10 + 20 * d + n) if x % n == need]))
    rng.shuffle(nums)
    s = sum(nums)
    steps = [f"The sum is {' + '.join(map(str, nums))} = {s}.", f"There are {n} numbers, so the mean is {s}/{n} = {s // n}."]
    return f"What is the mean of these numbers: {', '.join(map(str, nums))}?", s // n, steps


def sequence_next(rng, d):
    kind = rng.choice(["arith", "geom", "second"] if d >= 4 else ["arith", "geom"])
    a = rng.randint(-10 - 5 * d, 10 + 5 * d)
    shown = 4 + d // 3
    if kind == "arith":
        step = rng.choice([i for i in range(-5 - 3 * d, 6 + 3 * d) if i])
        seq = [a + i * step for i in range(shown + 1)]
        steps = [f"Consecutive differences are all {step}: it is arithmetic.", f"{seq[-2]} + {step} = {seq[-1]}."]
    elif kind == "geom":
        a = a or 1
        r = rng.choice([2, 3, -2] + ([4, 5, -3] if d > 3 else []))
        seq = [a * r ** i for i in range(shown + 1)]
        steps = [f"Each term is {r} times the previous one: it is geometric.", f"{seq[-2]} x {r} = {seq[-1]}."]
    else:
        d1, d2 = rng.randint(-5, 5), rng.choice([i for i in range(-4, 5) if i])
        seq = [a]
        for i in range(shown):
            seq.append(seq[-1] + d1 + i * d2)
        diffs = [seq[i + 1] - seq[i] for i in range(shown - 1)]
        steps = [f"The differences are {', '.join(map(str, diffs))}; they change by {d2} each time.",
                 f"The next difference is {diffs[-1] + d2}, so the next term is {seq[-2]} + {diffs[-1] + d2} = {seq[-1]}."]
    return (f"What is the next term of the sequence {', '.join(map(str, seq[:-1]))}, ...?", seq[-1], steps)


def envs():
    pair = "two integers separated by a comma"
    return [
        make_env("multi_step_arithmetic", TAGS, multi_step),
        make_env("long_addition", TAGS, long_addition),
        make_env("long_multiplication", TAGS, multiplication),
        make_env("division_with_remainder", TAGS, division_remainder, fmt="quotient,remainder (two integers "
                 "separated by a comma)", score_fn=compact_score),
        make_env("linear_equation", ALG, linear_equation, fmt="an integer"),
        make_env("linear_system_2x2", ALG, linear_system, fmt=f"x,y ({pair})", score_fn=compact_score),
        make_env("quadratic_integer_roots", ALG, quadratic_roots,
                 fmt=f"the two roots in increasing order, {pair} (repeat a double root)", score_fn=compact_score),
        make_env("polynomial_evaluation", ALG, polynomial_eval),
        make_env("fraction_arithmetic", TAGS, fraction_arith, fmt="a fraction p/q in lowest terms or an integer",
                 score_fn=fraction_score),
        make_env("percentage_change", TAGS, percentage, fmt="an exact number (integer or fraction p/q)",
                 score_fn=fraction_score),
        make_env("integer_power", TAGS, power),
        make_env("mean_of_list", TAGS, mean_of_list),
        make_env("sequence_next_term", ALG, sequence_next),
    ]
