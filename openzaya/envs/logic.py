"""Logic-puzzle environments: knights and knaves, small zebra grids, small 3-SAT (certificate-checked), 4x4
sudoku completion, boolean expression evaluation, truth-table counting, height ordering and Horn-clause forward
chaining.

Difficulty 0..9 grows the number of people, houses, variables, blanks or rules. Puzzles with a single answer are
generated with a brute-force uniqueness check; SAT accepts any satisfying assignment (a certificate check, as in
RLVE-Gym's SAT). Simplified: traces are systematic (case enumeration, candidate filtering, backtracking search
with unit propagation), not the clever human deductions.
"""

from __future__ import annotations

import itertools

from openzaya.envs.base import Problem, Score, extract_answer
from openzaya.envs.own import compact_score, make_env

TAGS = ("logic",)
NAMES = ["Alice", "Bob", "Carol", "Dave", "Eve", "Frank", "Grace", "Heidi", "Ivan", "Judy", "Mallory", "Oscar"]


# -----------------------------------------------------------------------------
# knights and knaves


def _kk_truth(st, world) -> bool:
    kind = st[0]
    if kind == "is":
        return world[st[1]] == st[2]
    if kind == "same":
        return world[st[1]] == world[st[2]]
    if kind == "diff":
        return world[st[1]] != world[st[2]]
    if kind == "one_knave":
        return not (world[st[1]] and world[st[2]])
    return sum(world) == st[1]          # "count"


def _kk_text(st, people) -> str:
    kind = st[0]
    if kind == "is":
        return f"{people[st[1]]} is a {'knight' if st[2] else 'knave'}"
    if kind == "same":
        return f"{people[st[1]]} and {people[st[2]]} are the same kind"
    if kind == "diff":
        return f"{people[st[1]]} and {people[st[2]]} are different kinds"
    if kind == "one_knave":
        return f"at least one of {people[st[1]]} and {people[st[2]]} is a knave"
    return f"exactly {st[1]} of us are knights"


def knights_knaves(rng, d):
    n = 2 + d // 2
    people = NAMES[:n]
    worlds = list(itertools.product([True, False], repeat=n))
    while True:
        stmts = []
        for i in range(n):
            kind = rng.choice(["is", "same", "diff", "one_knave", "count"])
            a, b = rng.sample(range(n), 2)
            stmts.append({"is": ("is", a, rng.random() < 0.5), "same": ("same", a, b), "diff": ("diff", a, b),
                          "one_knave": ("one_knave", a, b), "count": ("count", rng.randint(0, n))}[kind])
        ok = [w for w in worlds if all(w[i] == _kk_truth(stmts[i], w) for i in range(n))]
        if len(ok) == 1:
            break
    sol = ok[0]
    q = "\n".join(f"{people[i]} says: \"{_kk_text(stmts[i], people)}.\"" for i in range(n))
    steps = ["A knight's statement must be true and a knave's false. Check every assignment."]
    for w in worlds:
        label = ", ".join(f"{p}={'knight' if k else 'knave'}" for p, k in zip(people, w))
        bad = next((i for i in range(n) if w[i] != _kk_truth(stmts[i], w)), None)
        if bad is None:
            steps.append(f"{label}: every statement is consistent.")
        else:
            steps.append(f"{label}: {people[bad]} would be a {'knight' if w[bad] else 'knave'} but the statement is "
                         f"{'true' if _kk_truth(stmts[bad], w) else 'false'}, contradiction.")
    ans = ",".join("knight" if k else "knave" for k in sol)
    return (f"On an island, knights always tell the truth and knaves always lie.\n{q}\n"
            f"Who is a knight and who is a knave?", ans, steps, {"n_people": n})


# -----------------------------------------------------------------------------
# zebra-style grid


ATTRS = {"pet": ["cat", "dog", "fish", "bird", "horse"], "color": ["red", "green", "blue", "yellow", "white"],
         "drink": ["tea", "coffee", "milk", "juice", "water"]}


def _zebra_clue(rng, sol, names, n):
    """A random true clue about solution `sol` (list of per-attribute tuples: house -> value)."""
    def rand_item():
        a = rng.randrange(len(sol))
        h = rng.randrange(n)
        return (a, sol[a][h]), h
    (x, hx), (y, hy) = rand_item(), rand_item()
    kind = rng.choice(["at", "not_at", "same", "left_of", "next_to"])
    if kind == "at":
        return ("at", x, hx)
    if kind == "not_at":
        return ("not_at", x, rng.choice([h for h in range(n) if h != hx]))
    if kind == "same" and x[0] != y[0] and hx == hy:
        return ("same", x, y)
    if kind == "left_of" and hx + 1 == hy:
        return ("left_of", x, y)
    if kind == "next_to" and abs(hx - hy) == 1:
        return ("next_to", x, y)
    return ("at", x, hx) if rng.random() < 0.3 else ("not_at", x, rng.choice([h for h in range(n) if h != hx]))


def _zebra_holds(clue, world) -> bool:
    """`world` is a tuple of per-attribute dicts value -> house index."""
    pos = lambda item: world[item[0]][item[1]]
    kind = clue[0]
    if kind == "at":
        return pos(clue[1]) == clue[2]
    if kind == "not_at":
        return pos(clue[1]) != clue[2]
    if kind == "same":
        return pos(clue[1]) == pos(clue[2])
    if kind == "left_of":
        return pos(clue[1]) + 1 == pos(clue[2])
    return abs(pos(clue[1]) - pos(clue[2])) == 1


def zebra(rng, d):
    n = 2 + d // 3
    n_attr = 2 if (d % 3 == 0 or n == 5) else 3
    keys = ["person"] + rng.sample(sorted(ATTRS), n_attr - 1)
    values = [NAMES[:n]] + [ATTRS[k][:n] for k in keys[1:]]
    sol = [tuple(rng.sample(v, n)) for v in values]
    arrangements = list(itertools.product(*[list(itertools.permutations(v)) for v in values]))
    position = {p: {v: h for h, v in enumerate(p)} for v in values for p in itertools.permutations(v)}
    worlds = [tuple(position[p] for p in w) for w in arrangements]
    clues, masks, live = [], [], worlds
    while len(live) > 1:
        c = _zebra_clue(rng, sol, values[0], n)
        kept = [w for w in live if _zebra_holds(c, w)]
        if len(kept) < len(live):
            clues.append(c)
            masks.append(int("".join("1" if _zebra_holds(c, w) else "0" for w in worlds), 2))   # bitset of worlds
            live = kept
    # drop redundant clues, last first: a clue is redundant when the others already leave one world
    full = (1 << len(worlds)) - 1
    for i in reversed(range(len(clues))):
        rest = full
        for j, m in enumerate(masks):
            if j != i and m is not None:
                rest &= m
        if rest.bit_count() == 1:
            masks[i] = None
    clues = [c for c, m in zip(clues, masks) if m is not None]

    def name(item):
        k, v = keys[item[0]], item[1]
        return {"person": v, "pet": f"the {v} owner", "drink": f"the {v} drinker",
                "color": f"the resident of the {v} house"}[k]

    def text(c):
        if c[0] == "at":
            return f"{name(c[1])} is in house {c[2] + 1}"
        if c[0] == "not_at":
            return f"{name(c[1])} is not in house {c[2] + 1}"
        if c[0] == "same":
            return f"{name(c[1])} and {name(c[2])} are in the same house"
        if c[0] == "left_of":
            return f"{name(c[1])} is directly left of {name(c[2])}"
        return f"{name(c[1])} and {name(c[2])} are in neighbouring houses"

    # ask about an item that no clue places directly
    placed = {c[1] for c in clues if c[0] == "at"}
    items = [(a, v) for a in range(1, n_attr) for v in sol[a]]
    target_attr, target = rng.choice([x for x in items if x not in placed] or items)
    house = sol[target_attr].index(target) + 1
    cats = "; ".join(f"{k}s: {', '.join(v)}" if k != "person" else f"people: {', '.join(v)}"
                     for k, v in zip(keys, values))
    q = (f"{n} houses stand in a row, numbered 1 to {n} from left to right. Each house has exactly one of each of "
         f"these ({cats}).\nClues:\n" + "\n".join(f"{i + 1}. {text(c)[0].upper() + text(c)[1:]}." for i, c in enumerate(clues))
         + f"\nIn which house is {name((target_attr, target))}?")
    steps, live = [f"Start from all {len(worlds)} possible arrangements."], worlds
    for i, c in enumerate(clues):
        live = [w for w in live if _zebra_holds(c, w)]
        steps.append(f"Clue {i + 1} leaves {len(live)} arrangement{'s' if len(live) != 1 else ''}.")
    steps.append("The only arrangement: " + "; ".join(
        f"house {h + 1}: " + ", ".join(sol[a][h] for a in range(n_attr)) for h in range(n)) + ".")
    return q, house, steps, {"n_houses": n, "n_attr": n_attr}


# -----------------------------------------------------------------------------
# small SAT with a certificate check


def _parse_bits(text: str, n: int) -> list[int] | None:
    bits = [c for c in text if c in "01"]
    return [int(c) for c in bits] if len(bits) == n and all(c in "01 ,;" for c in text.strip()) else None


def sat_score(problem: Problem, response: str) -> Score:
    pred = extract_answer(response)
    if pred is None:
        return Score(0.0, 0.0, False, "no answer found")
    clauses, n = problem.metadata["clauses"], problem.metadata["n_vars"]
    bits = _parse_bits(pred, n)
    ok = bits is not None and all(any((bits[abs(l) - 1] == 1) == (l > 0) for l in cl) for cl in clauses)
    return Score(float(ok), float(ok), True, "" if ok else f"not a satisfying assignment: {pred!r}")


def _lit(l: int) -> str:
    return f"x{abs(l)}" if l > 0 else f"not x{abs(l)}"


def sat(rng, d):
    n = 3 + d
    m = int(3.5 * n)
    planted = [rng.random() < 0.5 for _ in range(n)]
    clauses = []
    while len(clauses) < m:
        vs = rng.sample(range(1, n + 1), 3)
        cl = [v if rng.random() < 0.5 else -v for v in vs]
        if any(planted[abs(l) - 1] == (l > 0) for l in cl):
            clauses.append(cl)
    steps: list[str] = []

    def propagate(assign):
        while True:
            unit = None
            for cl in clauses:
                if any(abs(l) in assign and assign[abs(l)] == (l > 0) for l in cl):
                    continue
                free = [l for l in cl if abs(l) not in assign]
                if not free:
                    return cl
                if len(free) == 1:
                    unit = free[0]
                    break
            if unit is None:
                return None
            assign[abs(unit)] = unit > 0
            steps.append(f"Unit clause forces x{abs(unit)}={int(unit > 0)}.")

    def search(assign):
        bad = propagate(assign)
        if bad is not None:
            steps.append(f"Clause ({' or '.join(map(_lit, bad))}) is false: backtrack.")
            return None
        free = [v for v in range(1, n + 1) if v not in assign]
        if not free:
            return assign
        v = free[0]
        for val in (True, False):
            steps.append(f"Try x{v}={int(val)}.")
            res = search({**assign, v: val})
            if res is not None:
                return res
        return None

    result = search({})
    bits = "".join(str(int(result[v])) for v in range(1, n + 1))
    steps.append(f"All clauses are satisfied by x1..x{n} = {bits}.")
    q = (f"Find an assignment of the boolean variables x1..x{n} that makes every clause true:\n"
         + "\n".join(f"({' or '.join(map(_lit, cl))})" for cl in clauses))
    return q, bits, steps, {"clauses": clauses, "n_vars": n}


# -----------------------------------------------------------------------------
# 4x4 sudoku


def _candidates(g, r, c):
    used = set(g[r]) | {g[i][c] for i in range(4)}
    br, bc = 2 * (r // 2), 2 * (c // 2)
    used |= {g[i][j] for i in range(br, br + 2) for j in range(bc, bc + 2)}
    return [v for v in range(1, 5) if v not in used]


def _singles(g, log=None) -> bool:
    """Fill the grid with naked singles only; True when it is completed."""
    g = [row[:] for row in g]
    while True:
        blanks = [(r, c) for r in range(4) for c in range(4) if g[r][c] == 0]
        if not blanks:
            return True
        for r, c in blanks:
            cand = _candidates(g, r, c)
            if len(cand) == 1:
                g[r][c] = cand[0]
                if log is not None:
                    log.append(f"Row {r + 1}, column {c + 1}: the row, column and box leave only {cand[0]}.")
                break
        else:
            return False


def sudoku4(rng, d):
    base = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
    perm = rng.sample(range(1, 5), 4)
    g = [[perm[v - 1] for v in row] for row in base]
    if rng.random() < 0.5:
        g = [list(r) for r in zip(*g)]
    bands = rng.sample([0, 1], 2)
    rows = [2 * b + i for b in bands for i in rng.sample([0, 1], 2)]
    g = [g[r] for r in rows]
    solution = [row[:] for row in g]
    target = min(4 + d, 12)
    cells = [(r, c) for r in range(4) for c in range(4)]
    rng.shuffle(cells)
    puzzle, blanks = [row[:] for row in g], 0
    for r, c in cells:
        if blanks == target:
            break
        old, puzzle[r][c] = puzzle[r][c], 0
        if _singles(puzzle):
            blanks += 1
        else:
            puzzle[r][c] = old
    steps: list[str] = []
    _singles(puzzle, steps)
    shown = "\n".join(" ".join(str(v) if v else "." for v in row) for row in puzzle)
    ans = ",".join("".join(map(str, row)) for row in solution)
    q = (f"Complete this 4x4 sudoku (each row, column and 2x2 box holds 1-4; '.' is empty):\n{shown}")
    return q, ans, steps, {"blanks": blanks}


# -----------------------------------------------------------------------------
# boolean formulas


def _formula(rng, depth, leaves):
    if depth == 0 or rng.random() < 0.2:
        return rng.choice(leaves)
    op = rng.choice(["and", "or", "not"])
    if op == "not":
        return ("not", _formula(rng, depth - 1, leaves))
    return (op, _formula(rng, depth - 1, leaves), _formula(rng, depth - 1, leaves))


def _ftext(f) -> str:
    if isinstance(f, str):
        return f
    if f[0] == "not":
        return f"not {_ftext(f[1])}"
    return f"({_ftext(f[1])} {f[0]} {_ftext(f[2])})"


def _feval(f, env, log=None) -> bool:
    if isinstance(f, str):
        return env[f]
    if f[0] == "not":
        a = _feval(f[1], env, log)
        v = not a
        if log is not None:
            log.append(f"not {a} = {v}.")
        return v
    a, b = _feval(f[1], env, log), _feval(f[2], env, log)
    v = (a and b) if f[0] == "and" else (a or b)
    if log is not None:
        log.append(f"{a} {f[0]} {b} = {v}.")
    return v


def bool_eval(rng, d):
    f = _formula(rng, 2 + d // 2, ["True", "False"])
    while isinstance(f, str):
        f = _formula(rng, 2 + d // 2, ["True", "False"])
    steps: list[str] = []
    v = _feval(f, {"True": True, "False": False}, steps)
    return f"Evaluate the boolean expression: {_ftext(f)}", str(v), steps


def truth_count(rng, d):
    n = 2 + d // 2
    names = [f"p{i + 1}" for i in range(n)]
    f = _formula(rng, 2 + d // 3, names)
    while isinstance(f, str):
        f = _formula(rng, 2 + d // 3, names)
    steps, count = [], 0
    for vals in itertools.product([False, True], repeat=n):
        v = _feval(f, dict(zip(names, vals)))
        count += v
        steps.append(f"{', '.join(f'{a}={int(b)}' for a, b in zip(names, vals))}: {v}; count so far {count}.")
    return (f"For how many of the {2 ** n} assignments to {', '.join(names)} is the formula {_ftext(f)} true?",
            count, steps)


# -----------------------------------------------------------------------------
# ordering and forward chaining


def height_order(rng, d):
    n = 3 + d
    order = rng.sample(NAMES[:n], n)           # tallest first
    facts = [(order[i], order[i + 1]) for i in range(n - 1)]
    facts += [(order[i], order[j]) for i, j in (sorted(rng.sample(range(n), 2)) for _ in range(d // 2))]
    rng.shuffle(facts)
    steps = [f"{order[0]} is never said to be shorter than anyone, so {order[0]} is the tallest."]
    for i in range(1, n):
        steps.append(f"Among the people left, {order[i]} is the only one not said to be shorter than another "
                     f"person left, so {order[i]} comes next.")
    q = ("Heights are all different. " + " ".join(f"{a} is taller than {b}." for a, b in facts)
         + " List everyone from tallest to shortest.")
    return q, ",".join(order), steps, {"n_people": n}


def horn_chaining(rng, d):
    n_atoms = 5 + d
    atoms = [chr(ord("A") + i) for i in range(n_atoms)]
    facts = sorted(rng.sample(atoms, 1 + d // 4))
    rules = []
    for _ in range(3 + d):
        head = rng.choice(atoms)
        body = rng.sample([a for a in atoms if a != head], rng.randint(1, 2 + d // 5))
        rules.append((sorted(body), head))
    known, steps, changed = set(facts), [f"Known facts: {', '.join(facts)}."], True
    while changed:
        changed = False
        for body, head in rules:
            if head not in known and all(b in known for b in body):
                known.add(head)
                changed = True
                steps.append(f"{' and '.join(body)} are true, so {head} is true.")
    steps.append("No rule adds anything new.")
    q = (f"Facts: {', '.join(facts)} are true. Rules:\n"
         + "\n".join(f"If {' and '.join(b)} then {h}." for b, h in rules)
         + "\nWhich atoms are true? (Only atoms that follow from the facts and rules are true.)")
    return q, ",".join(sorted(known)), steps


def envs():
    return [
        make_env("knights_and_knaves", TAGS, knights_knaves, fmt="knight or knave for each person in the order "
                 "they speak, comma-separated, e.g. knight,knave,knight", score_fn=compact_score),
        make_env("zebra_puzzle", TAGS, zebra, fmt="a house number"),
        make_env("sat_3cnf", TAGS, sat, fmt="the values of x1, x2, ... in order as a string of 0s and 1s, e.g. 0110",
                 score_fn=sat_score),
        make_env("sudoku_4x4", TAGS, sudoku4, fmt="the four completed rows as digit strings separated by commas, e.g. "
                 "1234,3412,2143,4321", score_fn=compact_score),
        make_env("boolean_expression", TAGS, bool_eval, fmt="True or False"),
        make_env("truth_table_count", TAGS, truth_count),
        make_env("height_ordering", TAGS, height_order, fmt="names from tallest to shortest, comma-separated",
                 score_fn=compact_score),
        make_env("horn_forward_chaining", TAGS, horn_chaining, fmt="the true atoms in alphabetical order, "
                 "comma-separated, e.g. A,C,D", score_fn=compact_score),
    ]
