"""One registry for every environment family: our own procedural environments plus adapters to external ones.

`_LOADERS` is an explicit list of (source, loader) pairs; each loader returns a list of `Env`. To add a family,
append one pair. Loaders import their optional packages inside the function, so a missing package (say
reasoning-gym) is recorded in `load_errors()` and printed to stderr, and the other families still load.

`check_env` is the self-test every environment must pass (spec environments.md §8.3, "test each env's reference
answer scores 1"): the boxed reference scores 1, an empty reply scores 0 with format_ok False, the solution trace
scores 1, and generation is deterministic for a seed.
"""

from __future__ import annotations

import sys
from typing import Callable

from openzaya.envs import algorithms, arithmetic, combinatorics, logic, number_theory, probability, strings
from openzaya.envs.base import Env


def own_envs() -> list[Env]:
    """All our own environments, family by family (each family module's `envs()`)."""
    families = [arithmetic, number_theory, combinatorics, probability, logic, algorithms, strings]
    return [env for fam in families for env in fam.envs()]


def _external(module: str, loader: str) -> Callable[[], list[Env]]:
    """A loader for an adapter module (imported lazily: optional packages, worker pools)."""
    def load() -> list[Env]:
        import importlib
        return list(getattr(importlib.import_module(module), loader)().values())
    return load


# (source, loader) pairs; a loader returns list[Env] and may raise ImportError when its optional package is missing
_LOADERS: list[tuple[str, Callable[[], list[Env]]]] = [
    ("openzaya", own_envs),
    ("reasoning_gym", _external("openzaya.envs.rgym", "load_rgym")),
    ("rlve", _external("openzaya.envs.rlve", "load_rlve")),
    ("code", _external("openzaya.envs.code", "load_code")),
    ("ifeval", _external("openzaya.envs.ifeval", "load_ifeval")),
]

_CACHE: dict[str, Env] | None = None
_ERRORS: dict[str, str] = {}


def all_envs(refresh: bool = False) -> dict[str, Env]:
    """name -> Env over all loaders (cached). A failing loader is reported, not raised; duplicate names are too."""
    global _CACHE
    if _CACHE is not None and not refresh:
        return _CACHE
    envs: dict[str, Env] = {}
    _ERRORS.clear()
    for source, loader in _LOADERS:
        try:
            loaded = loader()
        except Exception as e:   # optional packages may be missing or broken: report and continue
            _ERRORS[source] = f"{type(e).__name__}: {e}"
            print(f"openzaya.envs: loader {source!r} failed: {_ERRORS[source]}", file=sys.stderr)
            continue
        for env in loaded:
            if env.name in envs:
                _ERRORS[f"{source}:{env.name}"] = f"duplicate environment name (already from {envs[env.name].source})"
                print(f"openzaya.envs: skipping duplicate environment {env.name!r} from {source!r}", file=sys.stderr)
                continue
            envs[env.name] = env
    _CACHE = envs
    return envs


def load_errors() -> dict[str, str]:
    """Loader failures from the last `all_envs()` call: source (or source:name) -> message."""
    return dict(_ERRORS)


def get_env(name: str) -> Env:
    envs = all_envs()
    if name not in envs:
        raise KeyError(f"unknown environment {name!r} ({len(envs)} known; `openzaya envs list` shows them)")
    return envs[name]


def check_difficulties(env: Env) -> list[int]:
    """The levels `check` covers: min, mid, max (deduplicated)."""
    lo, hi = env.min_difficulty, env.max_difficulty
    return sorted({lo, (lo + hi) // 2, hi})


def check_env(env: Env, difficulties: list[int] | None = None, seeds: tuple[int, ...] = (0, 1)) -> list[str]:
    """Self-test an environment; returns human-readable failures (empty when it passes)."""
    failures = []
    for d in difficulties if difficulties is not None else check_difficulties(env):
        for seed in seeds:
            where = f"{env.name} d={d} seed={seed}"
            try:
                p = env.generate(d, seed)
                again = env.generate(d, seed)
                if (p.prompt, p.answer) != (again.prompt, again.answer):
                    failures.append(f"{where}: generation is not deterministic")
                if not p.answer.strip():
                    failures.append(f"{where}: empty reference answer")
                s = env.score(p, f"\\boxed{{{p.answer}}}")
                if s.accuracy != 1.0:
                    failures.append(f"{where}: boxed reference scored {s.accuracy} ({s.reason})")
                s = env.score(p, "")
                if s.accuracy != 0.0 or s.format_ok:
                    failures.append(f"{where}: empty response scored {s.accuracy}, format_ok={s.format_ok}")
                if p.solution is not None:
                    s = env.score(p, p.solution)
                    if s.accuracy != 1.0:
                        failures.append(f"{where}: solution trace scored {s.accuracy} ({s.reason})")
            except Exception as e:
                failures.append(f"{where}: raised {type(e).__name__}: {e}")
    return failures


def check_all(envs: dict[str, Env], seeds: tuple[int, ...] = (0, 1), progress: bool = True) -> dict[str, list[str]]:
    """check_env over many environments (min/mid/max levels), with a tqdm bar on stderr; name -> failures."""
    from tqdm import tqdm
    out = {}
    for name, env in tqdm(sorted(envs.items()), desc="envs check", file=sys.stderr, disable=not progress):
        out[name] = check_env(env, seeds=seeds)
    return out


# -----------------------------------------------------------------------------
# what the `openzaya envs` subcommands print (the CLI handlers only call these)


def describe_envs(source: str | None = None) -> str:
    """One line per environment (name, source, difficulty range, tags), then a count per source."""
    envs = [e for e in all_envs().values() if source is None or e.source == source]
    lines = [f"{e.name:40s} {e.source:14s} d={e.min_difficulty}..{e.max_difficulty}  {','.join(e.tags)}"
             for e in sorted(envs, key=lambda e: (e.source, e.name))]
    counts: dict[str, int] = {}
    for e in envs:
        counts[e.source] = counts.get(e.source, 0) + 1
    lines.append("total " + str(len(envs)) + ": " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    lines += [f"loader failed: {k}: {v}" for k, v in load_errors().items()]
    return "\n".join(lines)


def describe_sample(name: str, difficulty: int, seed: int) -> str:
    p = get_env(name).generate(difficulty, seed)
    return (f"== {p.env} (difficulty {p.difficulty}, seed {p.seed})\n-- prompt\n{p.prompt}\n-- answer\n{p.answer}\n"
            f"-- solution\n{p.solution if p.solution is not None else '(none)'}")


def run_check(source: str | None = None, seeds: tuple[int, ...] = (0, 1)) -> int:
    """Check every environment (of one source) at min/mid/max difficulty; print failures and a summary; exit code."""
    envs = {n: e for n, e in all_envs().items() if source is None or e.source == source}
    results = check_all(envs, seeds=seeds)
    bad = {n: f for n, f in results.items() if f}
    for name, fails in bad.items():
        for f in fails:
            print(f"FAIL {f}")
    errors = load_errors()
    for k, v in errors.items():
        print(f"loader failed: {k}: {v}")
    print(f"checked {len(results)} environments x {len(seeds)} seeds at min/mid/max difficulty: "
          f"{len(results) - len(bad)} passed, {len(bad)} failed")
    return 1 if bad or not results else 0
