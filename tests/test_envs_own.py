"""Our own procedural environments, the registry and the `openzaya envs` CLI.

Run: .venv/bin/python -m pytest tests/test_envs_own.py
"""

import random
import re

from openzaya.cli import main
from openzaya.envs import registry
from openzaya.envs.base import extract_answer
from openzaya.envs.own import fraction_score, parse_number
from openzaya.envs.registry import own_envs
from openzaya.envs.registry import check_difficulties, check_env, get_env

OWN = {e.name: e for e in own_envs()}


def _mean(env, d, fn, seeds=range(6)):
    return sum(fn(env.generate(d, s)) for s in seeds) / len(seeds)


def test_at_least_60_own_envs_with_unique_snake_case_names():
    envs = own_envs()
    assert len(envs) >= 60
    assert len({e.name for e in envs}) == len(envs)
    for e in envs:
        assert re.fullmatch(r"[a-z][a-z0-9_]*", e.name), e.name
        assert e.source == "openzaya" and e.tags and e.min_difficulty < e.max_difficulty
    families = {e.tags[0] for e in envs}
    assert {"arithmetic", "number_theory", "combinatorics", "probability", "logic", "algorithms", "strings"} <= \
        families | {"algebra"}


def test_every_own_env_passes_check_at_min_mid_max():
    failures = [f for e in OWN.values() for f in check_env(e, check_difficulties(e), seeds=(0, 1))]
    assert not failures, "\n".join(failures[:20])


def test_generation_is_deterministic_and_seeds_differ():
    varied = 0
    for e in OWN.values():
        a, b = e.generate(5, 7), e.generate(5, 7)
        assert (a.prompt, a.answer, a.solution) == (b.prompt, b.answer, b.solution), e.name
        varied += len({e.generate(5, s).prompt for s in range(4)}) > 1
    assert varied == len(OWN)


def test_global_random_state_untouched():
    random.seed(1234)
    state = random.getstate()
    for e in OWN.values():
        e.generate(e.max_difficulty, 3)
    assert random.getstate() == state


def test_difficulty_makes_problems_bigger_everywhere():
    # a generic proxy: prompt + solution + answer length grows from min to max level, for every environment
    size = lambda p: len(p.prompt) + len(p.solution) + len(p.answer)
    for e in OWN.values():
        assert _mean(e, e.max_difficulty, size) > _mean(e, e.min_difficulty, size), e.name


def test_difficulty_concrete_proxies_are_monotone():
    proxies = {
        "long_multiplication": lambda p: p.metadata["digits"],
        "sort_numbers": lambda p: p.metadata["n"],
        "knights_and_knaves": lambda p: p.metadata["n_people"],
        "polynomial_evaluation": lambda p: p.metadata["degree"],
        "multi_step_arithmetic": lambda p: p.metadata["n_ops"],
        "sudoku_4x4": lambda p: p.metadata["blanks"],
        "sat_3cnf": lambda p: p.metadata["n_vars"],
        "shortest_path": lambda p: p.metadata["n_vertices"],
        "factorial": lambda p: len(p.answer),
        "prime_factorization": lambda p: p.metadata["n"].bit_length(),
    }
    for name, fn in proxies.items():
        vals = [_mean(OWN[name], d, fn) for d in (0, 3, 6, 9)]
        assert all(a <= b for a, b in zip(vals, vals[1:])) and vals[-1] > vals[0], (name, vals)
    zebra = [_mean(OWN["zebra_puzzle"], d, lambda p: p.metadata["n_houses"], seeds=range(2)) for d in (0, 4, 9)]
    assert zebra[0] < zebra[1] < zebra[2]


def test_solutions_are_step_traces_ending_with_the_answer():
    for e in OWN.values():
        for d in (e.min_difficulty, e.max_difficulty):
            p = e.generate(d, 11)
            assert p.solution.startswith("Step 1:"), e.name
            assert p.solution.rstrip().endswith(f"\\boxed{{{p.answer}}}."), e.name
            assert "\\boxed{}" in p.prompt


def test_extract_answer_edge_cases():
    assert extract_answer("so \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"                  # nested braces
    assert extract_answer("\\boxed{1} then \\boxed{ 2 }") == "2"                          # last box wins
    assert extract_answer("<answer>7</answer> or <answer> 8 </answer>") == "8"            # answer tags
    assert extract_answer("<think>\\boxed{3}</think> final: \\boxed{4}") == "4"           # after </think>
    assert extract_answer("<think>\\boxed{3}</think> I give up") is None                  # only inside thinking
    assert extract_answer("\\boxed{5} <answer>6</answer>") == "5"                         # boxed beats tags
    assert extract_answer("no answer here") is None
    assert extract_answer("\\boxed{unclosed") is None


def test_fraction_and_certificate_scoring():
    p = OWN["fraction_arithmetic"].generate(3, 0)
    p.answer = "1/2"
    for reply in ["\\boxed{1/2}", "\\boxed{2/4}", "\\boxed{0.5}", "\\boxed{\\frac{1}{2}}", "\\boxed{\\dfrac{3}{6}}"]:
        assert fraction_score(p, reply).accuracy == 1.0, reply
    for reply in ["\\boxed{1/3}", "\\boxed{abc}", "\\boxed{1/0}"]:
        assert fraction_score(p, reply).accuracy == 0.0, reply
    assert parse_number("-\\frac{3}{4}") == parse_number("-3/4")
    # SAT takes any satisfying assignment, not only the reference one
    sat = OWN["sat_3cnf"]
    p = sat.generate(2, 0)
    n, clauses = p.metadata["n_vars"], p.metadata["clauses"]
    others = [f"{i:0{n}b}" for i in range(2 ** n)]
    good = [b for b in others if all(any((b[abs(l) - 1] == "1") == (l > 0) for l in c) for c in clauses)]
    bad = [b for b in others if b not in good]
    assert all(sat.score(p, f"\\boxed{{{b}}}").accuracy == 1.0 for b in good)
    assert bad and sat.score(p, f"\\boxed{{{bad[0]}}}").accuracy == 0.0
    assert OWN["sort_numbers"].score(OWN["sort_numbers"].generate(0, 0), "\\boxed{1, 2}").format_ok


def test_registry_reports_failing_loader_and_get_env(monkeypatch, capsys):
    def broken():
        raise ImportError("No module named 'not_installed_pkg'")
    monkeypatch.setattr(registry, "_LOADERS", registry._LOADERS + [("broken", broken)])
    envs = registry.all_envs(refresh=True)
    assert len(envs) >= 60 and "broken" in registry.load_errors()
    assert "loader 'broken' failed" in capsys.readouterr().err
    monkeypatch.undo()
    registry.all_envs(refresh=True)
    assert get_env("gcd").name == "gcd" and not registry.load_errors()


def test_cli_envs_list_sample_check(capsys):
    assert main(["envs", "list", "--source", "openzaya"]) == 0
    out = capsys.readouterr().out
    assert "knights_and_knaves" in out and re.search(r"total \d+: openzaya \d+", out)
    assert main(["envs", "sample", "gcd", "--difficulty", "3", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "-- prompt" in out and "-- answer" in out and "Step 1:" in out
    assert registry.run_check("openzaya") == 0
    assert "0 failed" in capsys.readouterr().out
