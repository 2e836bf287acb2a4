"""Rollout pools for `openzaya rl`: where the G samples of a job come from, and how the policy reaches them.

Every pool has the same four methods: `submit(job)` queues one job (a prompt's ids, G, sampling params, seed),
`results()` blocks until at least one job is done and returns every finished one, `publish(plain, version)` makes
the policy version `version` the one new jobs run on (`plain`: the whole policy as a one-process CPU model,
`dcp.gathered_model`), and `close()`. A result is {"job_id", "version" (the policy version that generated it),
"gen_s", "samples": [{"tokens", "logprobs" (the sampler's raw logprobs), "finish_reason", "routes"}]}; `finish`, a
callable the pool applies to each result as it arrives (the reward scorer), may start work on it at once.
- `InlinePool`: the trainer's own model through one `Engine` (synchronous, staleness 0; tests, debugging, and the
  speedrun on a GPU).
- `WorkerPool`: worker processes (torch.multiprocessing spawn), each with its own CPU engine; a publish sends the
  state_dict (shared memory), swapped in between engine calls.
- `ServerPool`: K OpenAI-compatible servers (openzaya serve, vLLM). Jobs go to the healthy, admitted server with the
  fewest requests in flight, as one /v1/completions request (prompt token ids, n = G, logprobs, token ids, routed
  experts when the server returns them). A server that fails (connection refused, timeout, 5xx) is marked down and
  the job is retried on another; it is re-admitted at the next publish if /health answers again, with the current
  weights (weight_sync.py pushes and verifies every version on every admitted server). A result's version is the
  version its server was verified at when the request was sent (sequences in flight during a push finish on the new
  weights, tagged old, as in PipelineRL).
"""

from __future__ import annotations

import asyncio
import queue as queue_mod
import threading
import time

import httpx
import torch

from . import rl
from .weight_sync import Server, ServerDown, describe, verify


def generate_jobs(engine, jobs: list[dict], version: int, return_routes: bool) -> list[dict]:
    """Run jobs (prompt ids, G, sampling params) through one continuous-batching engine call."""
    from .engine import GenParams

    prompts, params = [], []
    for j in jobs:
        for s in rl.group_sample_seeds(j["seed"], j["G"]):
            prompts.append(j["prompt_ids"])
            params.append(GenParams(temperature=j["temperature"], max_new_tokens=j["max_new_tokens"],
                                    eos_ids=j["eos_ids"], seed=s))
    t0 = time.perf_counter()
    res = engine.generate(prompts, params, return_routes=return_routes)
    dt = time.perf_counter() - t0
    out = []
    for j, group in zip(jobs, rl.split_groups(res, jobs[0]["G"]) if jobs else []):
        out.append({"job_id": j["job_id"], "version": version, "gen_s": dt, "samples": [
            {"tokens": list(r.tokens), "logprobs": list(r.logprobs), "finish_reason": r.finish_reason,
             "routes": r.routes} for r in group]})
    return out


class InlinePool:
    """The trainer's model in one Engine: `results()` generates every queued job at the trainer's current version
    (`version()`; the engine runs the trainer's weights themselves, so a publish has nothing to send)."""
    synchronous, needs_weights = True, False

    def __init__(self, model, engine_slots: int, max_len: int, router_replay: bool, finish, version):
        from .engine import Engine
        self.engine = Engine(model, max_slots=engine_slots, max_len=max_len)
        self.router_replay, self.finish, self.version = router_replay, finish, version
        self.jobs = []

    def submit(self, job: dict):
        self.jobs.append(job)

    def results(self) -> list:
        jobs, self.jobs = self.jobs, []
        return [self.finish(r) for r in generate_jobs(self.engine, jobs, self.version(), self.router_replay)]

    def publish(self, plain, version: int):
        pass

    def close(self):
        pass


def rollout_worker(worker_id: int, init: dict, job_q, result_q, weights_q):
    """Worker process: build the engine, then loop: newest weights -> take jobs -> generate."""
    torch.set_num_threads(1)
    from .engine import Engine
    from .model import ZayaConfig, ZayaForCausalLM

    version = init["version"]
    model = ZayaForCausalLM(ZayaConfig.from_dict(init["config"])).eval()
    model.load_state_dict(init["state_dict"])
    engine = Engine(model.relayout_experts_for_decode(), max_slots=init["engine_slots"], max_len=init["max_len"])
    while True:
        try:                                   # swap in the newest weights pushed so far
            while True:
                version, sd = weights_q.get_nowait()
                engine.model.load_state_dict(sd)
                del sd
        except queue_mod.Empty:
            pass
        job = job_q.get()
        if job is None:
            return
        jobs = [job]
        while len(jobs) < init["jobs_per_call"]:
            try:
                nxt = job_q.get_nowait()
            except queue_mod.Empty:
                break
            if nxt is None:
                job_q.put(None)
                break
            jobs.append(nxt)
        for r in generate_jobs(engine, jobs, version, init["router_replay"]):
            r["worker"] = worker_id
            result_q.put(r)


class WorkerPool:
    """`n` worker processes sharing one job queue; each publish puts the state_dict on every worker's queue."""

    def __init__(self, n: int, model, engine_slots: int, max_len: int, router_replay: bool, G: int,
                 result_timeout_s: float, finish, version: int = 0):
        import torch.multiprocessing as mp
        ctx = mp.get_context("spawn")
        self.job_q, self.result_q, self.finish, self.timeout_s = ctx.Queue(), ctx.Queue(), finish, result_timeout_s
        init = {"version": version, "config": model.config.to_dict(), "engine_slots": engine_slots, "max_len": max_len,
                "router_replay": router_replay, "jobs_per_call": max(1, engine_slots // G),
                "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}}
        self.weight_qs, self.procs = [], []
        for w in range(n):
            self.weight_qs.append(ctx.Queue())
            p = ctx.Process(target=rollout_worker, args=(w, init, self.job_q, self.result_q, self.weight_qs[-1]),
                            daemon=True)
            p.start()
            self.procs.append(p)

    def submit(self, job: dict):
        self.job_q.put(job)

    def results(self) -> list:
        waited = 0.0
        while True:                    # poll, so that a dead worker is an error, not a hang
            try:
                got = [self.result_q.get(timeout=1.0)]
                break
            except queue_mod.Empty:
                waited += 1.0
            dead = [(w, p.exitcode) for w, p in enumerate(self.procs) if not p.is_alive()]
            if dead:
                raise RuntimeError(f"rollout worker(s) exited: {', '.join(f'{w} (exit code {c})' for w, c in dead)}; "
                                   f"their traceback is printed above. A script that runs rl_loop with "
                                   f"rollout_workers > 0 needs an `if __name__ == '__main__':` guard (spawn).")
            if waited >= self.timeout_s:
                raise RuntimeError(f"no rollout result in {self.timeout_s:.0f} s from {len(self.procs)} live "
                                   f"worker(s)")
        while True:
            try:
                got.append(self.result_q.get_nowait())
            except queue_mod.Empty:
                return [self.finish(r) for r in got]

    def publish(self, plain, version: int):
        for wq in self.weight_qs:
            wq.put((version, {k: v.detach().clone() for k, v in plain.state_dict().items()}))

    def close(self):
        for _ in self.procs:
            self.job_q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()


# -----------------------------------------------------------------------------
# A pool of inference servers


class ServerPool:
    """K servers (module docstring). `sync`: weight_sync.DiskSync or BroadcastSync (None: the servers are reloaded by
    someone else, and every version is assumed served at once: unverified). `probe_ids`: the prompt of the probe
    that verifies each push; `tolerance`: the probe's mean |logprob difference| allowed."""

    def __init__(self, urls: list[str], sync, finish, probe_ids: list[int], tolerance: float, result_timeout_s: float,
                 request_timeout_s: float = 600.0, model_name: str | None = None):
        self.client = httpx.Client(timeout=60)
        self.servers = [describe(u, self.client) for u in urls]
        for s in self.servers:
            s.model = model_name or s.model
        self.sync, self.finish, self.probe_ids, self.tolerance = sync, finish, probe_ids, tolerance
        self.result_timeout_s, self.request_timeout_s = result_timeout_s, request_timeout_s
        self.done: queue_mod.Queue = queue_mod.Queue()
        self.log: list[dict] = []               # one row per push: server, version, seconds, probe difference
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="openzaya-rollouts", daemon=True)
        self.thread.start()
        self.aclient = asyncio.run_coroutine_threadsafe(self._client(), self.loop).result()

    async def _client(self):
        return httpx.AsyncClient(timeout=self.request_timeout_s, limits=httpx.Limits(max_connections=256))

    # ---- rollouts (the loop thread)
    def submit(self, job: dict):
        asyncio.run_coroutine_threadsafe(self._run(job), self.loop)

    def _pick(self) -> Server | None:
        live = [s for s in self.servers if s.healthy and s.version is not None]
        return min(live, key=lambda s: s.inflight) if live else None

    async def _run(self, job: dict):
        t_end = time.monotonic() + self.result_timeout_s
        try:
            while True:
                s = self._pick()
                if s is None:
                    if time.monotonic() > t_end:
                        raise RuntimeError(f"no live rollout server for {self.result_timeout_s:.0f} s: "
                                           + ", ".join(f"{x.url} (down)" for x in self.servers))
                    await asyncio.sleep(0.1)
                    continue
                res = await self._request(s, job)
                if res is not None:
                    self.done.put(self.finish(res))
                    return
        except Exception as e:               # surfaces in results(), on the trainer's thread
            self.done.put(e)

    async def _request(self, s: Server, job: dict) -> dict | None:
        """One attempt on `s`: the result, or None when `s` failed (it is marked down; the job goes elsewhere)."""
        body = {"model": s.model, "prompt": job["prompt_ids"], "n": job["G"], "temperature": job["temperature"],
                "max_tokens": job["max_new_tokens"], "seed": job["seed"], "logprobs": 1, "return_token_ids": True}
        if s.routes and s.kind == "openzaya":
            body["return_routed_experts"] = True
        version, t0 = s.version, time.perf_counter()
        s.inflight += 1
        try:
            r = await self.aclient.post(s.url + "/v1/completions", json=body)
        except httpx.TransportError as e:
            print(f"rollouts: {s.url} failed ({type(e).__name__}); marked down, job {job['job_id']} retried elsewhere",
                  flush=True)
            s.healthy = False
            return None
        finally:
            s.inflight -= 1
        if r.status_code == 400 and "return_routed_experts" in r.text:
            s.routes = False                 # a server without --enable-return-routed-experts: the trainer routes
            return None
        if r.status_code == 429:             # busy: try again in a moment
            await asyncio.sleep(0.5)
            return None
        if r.status_code == 408 or r.status_code >= 500:
            s.healthy = False
            return None
        if r.status_code != 200:
            raise RuntimeError(f"{s.url}: rollout request failed (HTTP {r.status_code}): {r.text[:500]}")
        return {"job_id": job["job_id"], "version": version, "gen_s": time.perf_counter() - t0, "server": s.url,
                "samples": [self._sample(s, job, c) for c in sorted(r.json()["choices"], key=lambda c: c["index"])]}

    @staticmethod
    def _sample(s: Server, job: dict, c: dict) -> dict:
        tokens = list(c["token_ids"])
        routes = None
        if c.get("routed_experts") is not None:
            routes = rl.routes_from_server(c["routed_experts"], len(job["prompt_ids"]) + len(tokens),
                                           skip_as_zero=s.kind == "vllm")
        return {"tokens": tokens, "logprobs": list(c["logprobs"]["token_logprobs"]),
                "finish_reason": c["finish_reason"], "routes": routes}

    def results(self) -> list:
        try:
            got = [self.done.get(timeout=self.result_timeout_s)]
        except queue_mod.Empty:
            raise RuntimeError(f"no rollout result in {self.result_timeout_s:.0f} s from "
                               f"{sum(s.healthy for s in self.servers)} live server(s)") from None
        while True:
            try:
                got.append(self.done.get_nowait())
            except queue_mod.Empty:
                break
        for x in got:
            if isinstance(x, BaseException):
                raise x
        return got

    # ---- weights (the trainer's thread)
    def _reachable(self, s: Server) -> bool:
        try:
            return self.client.get(s.url + "/health", timeout=10).status_code == 200
        except httpx.TransportError:
            return False

    def publish(self, plain, version: int):
        """Push `version` to every admitted server and every down one that answers again, verifying each; a server
        that fails on the way is marked down (the run goes on while one is up); one that accepts the push and serves
        other weights stops the run (RuntimeError)."""
        if self.sync is None:
            for s in self.servers:
                s.version = version
            return
        self.sync.prepare(plain, version)
        for s in self.servers:
            if not s.healthy and not self._reachable(s):
                continue
            t0 = time.perf_counter()
            try:
                self.sync.push(self.client, s, version)
                push_s = time.perf_counter() - t0
                diff = verify(self.client, s, version, plain, self.probe_ids, self.tolerance)
            except (httpx.TransportError, ServerDown) as e:
                print(f"rollouts: push of version {version} to {s.url} failed ({e}); marked down", flush=True)
                s.healthy = False
                continue
            if not s.healthy:
                print(f"rollouts: {s.url} re-admitted at policy version {version}", flush=True)
            s.healthy, s.version = True, version
            s.pushed.append(version)
            self.log.append({"server": s.url, "version": version, "push_s": push_s, "probe_diff": diff})
        if not any(s.healthy for s in self.servers):
            raise RuntimeError(f"no rollout server took policy version {version}: "
                               + ", ".join(s.url for s in self.servers))

    async def _stop(self):
        for t in asyncio.all_tasks(self.loop) - {asyncio.current_task()}:
            t.cancel()                       # jobs still in flight: their results are not wanted any more
        await self.aclient.aclose()

    def close(self):
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        for s in self.servers:
            if s.group is not None:
                s.group.close()
        if self.sync is not None:
            self.sync.close()
        self.client.close()
