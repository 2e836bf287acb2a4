"""Algorithm and data-structure environments: sorting, shortest paths (Dijkstra), grid mazes (BFS), minimum
spanning trees (Kruskal), connected components (union-find), topological order, LIS, LCS, edit distance,
0/1 knapsack, coin change, maximum subarray, inversion counting and the Josephus problem.

Difficulty 0..9 grows the input size (list length, vertices, string length, items). Each trace follows the
textbook algorithm. Answers are integers or comma-separated lists; the topological order asked for is the
lexicographically smallest, so it is unique.
"""

from __future__ import annotations

import heapq
from collections import deque

from openzaya.envs.own import compact_score, make_env

TAGS = ("algorithms",)
GRAPH = ("algorithms", "graphs")
DP = ("algorithms", "dynamic_programming")


def _ints(rng, n, lo, hi):
    return [rng.randint(lo, hi) for _ in range(n)]


def sort_list(rng, d):
    n = 4 + 2 * d
    xs = _ints(rng, n, -10 - 10 * d, 10 + 10 * d)
    rest, out, steps = xs[:], [], []
    while rest:
        m = min(rest)
        rest.remove(m)
        out.append(m)
        steps.append(f"The smallest remaining number is {m}.")
    return f"Sort these numbers in increasing order: {', '.join(map(str, xs))}.", ",".join(map(str, out)), steps, \
        {"n": n}


def _random_graph(rng, n, extra, wmax):
    """A connected undirected weighted graph: a random spanning tree plus `extra` edges (no duplicates)."""
    order = rng.sample(range(n), n)
    edges = {}
    for i in range(1, n):
        a, b = order[i], order[rng.randrange(i)]
        edges[tuple(sorted((a, b)))] = rng.randint(1, wmax)
    tries = 0
    while len(edges) < n - 1 + extra and tries < 10 * n * n:
        a, b = rng.sample(range(n), 2)
        edges.setdefault(tuple(sorted((a, b))), rng.randint(1, wmax))
        tries += 1
    return sorted((a, b, w) for (a, b), w in edges.items())


def _vname(i: int) -> str:
    return chr(ord("A") + i)


def shortest_path(rng, d):
    n = 4 + d
    edges = _random_graph(rng, n, 1 + d, 5 + 2 * d)
    adj = {i: [] for i in range(n)}
    for a, b, w in edges:
        adj[a].append((b, w))
        adj[b].append((a, w))
    src, dst = rng.sample(range(n), 2)
    dist, heap, done, steps = {src: 0}, [(0, src)], set(), []
    while heap:
        du, u = heapq.heappop(heap)
        if u in done:
            continue
        done.add(u)
        steps.append(f"Settle {_vname(u)} at distance {du}.")
        if u == dst:
            break
        for v, w in sorted(adj[u]):
            if v not in done and du + w < dist.get(v, 10 ** 9):
                dist[v] = du + w
                heapq.heappush(heap, (du + w, v))
                steps.append(f"  Update {_vname(v)} to {du + w} via {_vname(u)}.")
    es = ", ".join(f"{_vname(a)}-{_vname(b)} ({w})" for a, b, w in edges)
    return (f"An undirected graph has edges with weights: {es}. What is the length of the shortest path from "
            f"{_vname(src)} to {_vname(dst)}?", dist[dst], steps, {"n_vertices": n})


def mst_weight(rng, d):
    n = 4 + d
    edges = _random_graph(rng, n, 2 + d, 5 + 3 * d)
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    total, steps = 0, ["Kruskal: take edges in increasing weight, skipping those that close a cycle."]
    for a, b, w in sorted(edges, key=lambda e: (e[2], e[0], e[1])):
        ra, rb = find(a), find(b)
        if ra == rb:
            steps.append(f"Skip {_vname(a)}-{_vname(b)} ({w}): cycle.")
        else:
            parent[ra] = rb
            total += w
            steps.append(f"Take {_vname(a)}-{_vname(b)} ({w}); total {total}.")
    es = ", ".join(f"{_vname(a)}-{_vname(b)} ({w})" for a, b, w in edges)
    return f"What is the total weight of a minimum spanning tree of the graph with edges {es}?", total, steps


def components(rng, d):
    n = 5 + 2 * d
    m = rng.randint(n // 3, n - 1)
    edges = sorted({tuple(sorted(rng.sample(range(n), 2))) for _ in range(m)})
    parent = list(range(n))

    def find(x):
        while parent[x] != x:
            x = parent[x]
        return x
    count, steps = n, [f"Start with {n} singleton components."]
    for a, b in edges:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[ra] = rb
            count -= 1
            steps.append(f"Edge {a}-{b} joins two components: {count} left.")
        else:
            steps.append(f"Edge {a}-{b} is inside one component.")
    return (f"A graph has vertices 0..{n - 1} and edges {', '.join(f'{a}-{b}' for a, b in edges)}. How many "
            "connected components does it have?", count, steps)


def topo_sort(rng, d):
    n = 4 + d
    order = rng.sample(range(n), n)
    pairs = {(order[i], order[j]) for i, j in (sorted(rng.sample(range(n), 2)) for _ in range(n + d))}
    edges = sorted(pairs)
    indeg = {v: 0 for v in range(n)}
    for _, b in edges:
        indeg[b] += 1
    ready = [v for v in range(n) if indeg[v] == 0]
    heapq.heapify(ready)
    out, steps = [], []
    while ready:
        v = heapq.heappop(ready)
        out.append(v)
        freed = []
        for a, b in edges:
            if a == v:
                indeg[b] -= 1
                if indeg[b] == 0:
                    heapq.heappush(ready, b)
                    freed.append(b)
        steps.append(f"Take {v} (smallest available)" + (f"; now available: {', '.join(map(str, freed))}." if freed
                                                         else "."))
    return (f"Tasks 0..{n - 1} have dependencies (a -> b means a must come before b): "
            f"{', '.join(f'{a} -> {b}' for a, b in edges)}. Give the lexicographically smallest valid order.",
            ",".join(map(str, out)), steps)


def lis(rng, d):
    n = 5 + 2 * d
    xs = _ints(rng, n, 1, 10 + 10 * d)
    best = []
    for i, x in enumerate(xs):
        best.append(1 + max([best[j] for j in range(i) if xs[j] < x], default=0))
    steps = ["L[i] = 1 + max L[j] over j < i with a[j] < a[i].", f"L = {', '.join(map(str, best))}.",
             f"The maximum is {max(best)}."]
    return (f"What is the length of the longest strictly increasing subsequence of {', '.join(map(str, xs))}?",
            max(best), steps)


def _rand_word(rng, n, alphabet):
    return "".join(rng.choice(alphabet) for _ in range(n))


def edit_distance(rng, d):
    alpha = "abcd"[: 2 + d // 4]
    a, b = _rand_word(rng, 3 + d, alpha + "e"), _rand_word(rng, 3 + d + rng.randint(-1, 2), alpha + "e")
    D = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    steps = [f"Row 0: {' '.join(map(str, D[0]))}."]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            D[i][j] = min(D[i - 1][j] + 1, D[i][j - 1] + 1, D[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
        steps.append(f"Row {i} ({a[i - 1]}): {' '.join(map(str, D[i]))}.")
    return (f"What is the edit distance (insertions, deletions, substitutions) between '{a}' and '{b}'?",
            D[-1][-1], steps)


def lcs(rng, d):
    alpha = "abc"[: 2 + (d > 3)] + "d" * (d > 6)
    a, b = _rand_word(rng, 4 + d, alpha), _rand_word(rng, 4 + d, alpha)
    L = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    steps = []
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            L[i][j] = L[i - 1][j - 1] + 1 if a[i - 1] == b[j - 1] else max(L[i - 1][j], L[i][j - 1])
        steps.append(f"Row {i} ({a[i - 1]}): {' '.join(map(str, L[i]))}.")
    return f"What is the length of the longest common subsequence of '{a}' and '{b}'?", L[-1][-1], steps


def knapsack(rng, d):
    n = 3 + d // 2 + d // 4
    weights, values = _ints(rng, n, 1, 4 + d), _ints(rng, n, 1, 10 + 5 * d)
    cap = max(weights) + rng.randint(sum(weights) // 4, sum(weights) // 2)
    best = [0] * (cap + 1)
    steps = [f"best[c] = best value with capacity c; process items one by one, c from {cap} down to the weight."]
    for i, (w, v) in enumerate(zip(weights, values)):
        for c in range(cap, w - 1, -1):
            best[c] = max(best[c], best[c - w] + v)
        steps.append(f"After item {i + 1} (w={w}, v={v}): best = {' '.join(map(str, best))}.")
    items = "; ".join(f"item {i + 1}: weight {w}, value {v}" for i, (w, v) in enumerate(zip(weights, values)))
    return (f"Knapsack capacity {cap}. Items ({items}). Each item can be taken at most once. What is the maximum "
            "total value?", best[cap], steps)


def coin_change(rng, d):
    coins = sorted(rng.sample(range(2, 6 + 2 * d), 2 + d // 3)) + [1]
    coins = sorted(set(coins))
    amount = rng.randint(10 + 5 * d, 20 + 12 * d)
    best = [0] + [10 ** 9] * amount
    for s in range(1, amount + 1):
        best[s] = 1 + min(best[s - c] for c in coins if c <= s)
    steps = ["best[s] = 1 + min best[s - c] over coins c <= s, best[0] = 0.",
             f"best[0..{amount}] = {', '.join(map(str, best))}."]
    return (f"With unlimited coins of values {', '.join(map(str, coins))}, what is the minimum number of coins that "
            f"sum to exactly {amount}?", best[amount], steps)


def max_subarray(rng, d):
    n = 5 + 2 * d
    xs = _ints(rng, n, -10 - 5 * d, 10 + 5 * d)
    cur = best = xs[0]
    steps = [f"Start: current = best = {xs[0]}."]
    for x in xs[1:]:
        cur = max(x, cur + x)
        best = max(best, cur)
        steps.append(f"x = {x}: current = {cur}, best = {best}.")
    return (f"What is the largest sum of a nonempty contiguous subarray of {', '.join(map(str, xs))}?", best, steps)


def inversions(rng, d):
    n = 4 + 2 * d
    xs = rng.sample(range(1, 3 * n), n)
    steps, total = [], 0
    for i, x in enumerate(xs):
        k = sum(1 for y in xs[i + 1:] if y < x)
        total += k
        steps.append(f"{x} is larger than {k} later element{'s' if k != 1 else ''}; total {total}.")
    return (f"How many pairs (i < j) with a[i] > a[j] are there in {', '.join(map(str, xs))}?", total, steps)


def josephus(rng, d):
    n, k = rng.randint(5 + 2 * d, 7 + 3 * d), rng.randint(2, 3 + d // 2)
    people, idx, steps = list(range(1, n + 1)), 0, []
    while len(people) > 1:
        idx = (idx + k - 1) % len(people)
        steps.append(f"Remove {people.pop(idx)}.")
    return (f"{n} people stand in a circle, numbered 1 to {n}. Counting starts at person 1; every {k}-th person is "
            f"removed and counting continues with the next person. Who is the last one left?", people[0], steps)


def maze(rng, d):
    rows, cols = 4 + d // 2, 5 + d // 2
    while True:
        walls = {(r, c) for r in range(rows) for c in range(cols) if rng.random() < 0.3}
        walls -= {(0, 0), (rows - 1, cols - 1)}
        dist, q = {(0, 0): 0}, deque([(0, 0)])
        while q:
            r, c = q.popleft()
            for nr, nc in ((r + 1, c), (r - 1, c), (r, c + 1), (r, c - 1)):
                if 0 <= nr < rows and 0 <= nc < cols and (nr, nc) not in walls and (nr, nc) not in dist:
                    dist[(nr, nc)] = dist[(r, c)] + 1
                    q.append((nr, nc))
        if (rows - 1, cols - 1) in dist:
            break
    grid = "\n".join("".join("#" if (r, c) in walls else "." for c in range(cols)) for r in range(rows))
    steps = ["Breadth-first search from the top-left cell; layer k holds the cells k moves away."]
    layers = {}
    for cell, k in dist.items():
        layers.setdefault(k, []).append(cell)
    goal = dist[(rows - 1, cols - 1)]
    for k in range(1, goal + 1):
        steps.append(f"Layer {k}: {' '.join(f'({r + 1},{c + 1})' for r, c in sorted(layers[k]))}.")
    return (f"In this maze ('#' is a wall), what is the minimum number of moves (up, down, left, right) from the "
            f"top-left cell to the bottom-right cell?\n{grid}", goal, steps)


def envs():
    return [
        make_env("sort_numbers", TAGS, sort_list, fmt="comma-separated integers, e.g. -3,1,4", score_fn=compact_score),
        make_env("shortest_path", GRAPH, shortest_path),
        make_env("minimum_spanning_tree", GRAPH, mst_weight),
        make_env("connected_components", GRAPH, components),
        make_env("topological_sort", GRAPH, topo_sort, fmt="comma-separated task numbers, e.g. 0,2,1",
                 score_fn=compact_score),
        make_env("longest_increasing_subsequence", DP, lis),
        make_env("edit_distance", DP, edit_distance),
        make_env("longest_common_subsequence", DP, lcs),
        make_env("knapsack_01", DP, knapsack),
        make_env("coin_change_min", DP, coin_change),
        make_env("max_subarray_sum", DP, max_subarray),
        make_env("count_inversions", TAGS, inversions),
        make_env("josephus", TAGS, josephus),
        make_env("grid_maze_bfs", GRAPH, maze),
    ]
