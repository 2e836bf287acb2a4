"""`ServerThread`: an app (openzaya serve's, or any ASGI app) under uvicorn in a background thread, for tests and
benchmarks (bench/ scripts put tests/ on sys.path)."""

import threading
import time


class ServerThread:
    """uvicorn in a background thread on an ephemeral port. `url` is the base URL."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, grace_s: float = 5.0):
        import uvicorn

        kw = {}
        srv = getattr(getattr(app, "state", None), "srv", None)
        if srv is not None:   # openzaya serve's app: its HTTP protocol (read timeouts), as `openzaya serve` runs it
            from openzaya.http_guard import http_protocol
            kw["http"] = http_protocol(srv.cfg, srv.metrics)
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                    timeout_graceful_shutdown=grace_s, lifespan="on", **kw))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.host = host

    def __enter__(self):
        self.thread.start()
        t_end = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > t_end or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://{self.host}:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=60)
