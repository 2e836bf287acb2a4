"""What `openzaya serve` does with a connection and a request before FastAPI parses anything: the API key, the body
cap, read deadlines, and counting every request's status as the status sent.

- `GuardMiddleware` (ASGI): 401 without the API key; 413 for a body over `max_body_bytes`, by Content-Length or, for
  chunked bodies, as the bytes come; 408 when the body has not arrived `read_timeout_s` after the headers (the
  connection is then closed). It reads the body whole and hands it to the app, so FastAPI never sees a cut body.
  An exception from the app is answered 500 here, inside the counting, so /metrics records the 500 (FastAPI's own
  last-resort handler sits outside every middleware: its 500s were counted as 499, "client closed").
- `TimedH11Protocol` (uvicorn's HTTP/1.1 protocol, given to uvicorn with `http=http_protocol(...)`): a deadline on
  reading a request's head. uvicorn has none: its keep-alive timer runs only between requests and any byte cancels
  it, so a client that connects and sends nothing, or trickles its request line and headers (or the rest of a body
  answered early with 413), held its socket for as long as it liked.

Both deadlines are the one `ServeConfig.read_timeout_s`: for the head, counted from the connection (or, once a
response is complete, from the next byte); for the body, from the end of the head.
Simplified: no cap on the number of connections (each one is bounded in time instead).
"""

from __future__ import annotations

import asyncio
import secrets
import time

from fastapi.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

from .openai_format import APIError
from .scheduler import Metrics

ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/version",
             "/tokenize", "/detokenize", "/tokenizer_info")   # and /v1/models/{id}; others: "other"
LATENCY_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


def endpoint_label(path: str) -> str:
    """The endpoint label of a path in the metrics (a bounded set: an id in a path is not a label value)."""
    if path in ENDPOINTS:
        return path
    return "/v1/models/{id}" if path.startswith("/v1/models/") else "other"


async def read_body(receive, max_bytes: int, timeout_s: float) -> bytes | int:
    """The whole request body, or the status that ends the request: 413 once it passes max_bytes, 408 when it has
    not all arrived timeout_s from now (a client trickling its body byte by byte is cut), 499 when the client went
    away."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    chunks, size = [], 0
    while True:
        try:
            message = await asyncio.wait_for(receive(), deadline - loop.time())
        except asyncio.TimeoutError:
            return 408
        if message["type"] == "http.disconnect":
            return 499
        size += len(message.get("body", b""))
        if size > max_bytes:
            return 413
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive callable that hands the app the body already read, then passes on (disconnect notices)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def error_response(status: int, message: str, type: str = "invalid_request_error", param=None, code=None,
                   close: bool = False) -> JSONResponse:
    """An error in the OpenAI shape; close=True ends the connection after it (uvicorn honours Connection: close)."""
    resp = JSONResponse(APIError(status, message, type, param, code).body(), status_code=status)
    if close:
        resp.raw_headers.append((b"connection", b"close"))
    return resp


class GuardMiddleware:
    """The API key, the body cap and deadline, and the request metrics (count by status sent, latency) of every
    HTTP request. `cfg` is the server's `ServeConfig` (api_key, max_body_bytes, read_timeout_s); the key guards
    /v1/* and the `protected` paths (serve_rl's weight-update routes)."""

    def __init__(self, app, cfg, metrics: Metrics, protected: tuple[str, ...] = ()):
        self.app, self.cfg, self.metrics, self.protected = app, cfg, metrics, protected

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, cfg = scope.get("path", ""), self.cfg
        endpoint = endpoint_label(path)
        t0 = time.perf_counter()
        status = [0]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        async def reply(*args, **kw):
            await error_response(*args, **kw)(scope, receive, send_counted)

        try:
            headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
            if cfg.api_key and (path.startswith("/v1/") or path in self.protected):
                auth = headers.get("authorization", "")
                token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
                if not secrets.compare_digest(token.encode(), cfg.api_key.encode()):
                    return await reply(401, "invalid or missing API key (Authorization: Bearer ...)",
                                       "authentication_error", code="invalid_api_key")
            too_large = f"request body over {cfg.max_body_bytes} bytes"
            length = headers.get("content-length", "")
            if length.isdigit() and int(length) > cfg.max_body_bytes:
                return await reply(413, too_large, code="body_too_large")
            body = await read_body(receive, cfg.max_body_bytes, cfg.read_timeout_s)
            if body == 413:   # the rest of the body is read and dropped by uvicorn, within TimedH11Protocol's deadline
                return await reply(413, too_large, code="body_too_large")
            if body == 408:
                return await reply(408, f"the request body did not arrive within {cfg.read_timeout_s} s",
                                   "timeout_error", code="read_timeout", close=True)
            if body == 499:
                return
            await self.app(scope, replay(body, receive), send_counted)
        except Exception as e:   # answered here (FastAPI's last-resort handler is outside): its 500 is counted
            if status[0] == 0:
                await reply(500, f"internal error: {type(e).__name__}: {e}", "server_error")
            raise
        finally:
            self.metrics.count_request(endpoint, status[0] or 499)
            if endpoint in LATENCY_ENDPOINTS:
                self.metrics.observe_latency(endpoint, time.perf_counter() - t0)


class TimedH11Protocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline on reading a request's head: a connection that has not sent a
    whole request line and headers `read_timeout_s` after it opened (or, once a response is complete, after the
    next byte it sent) is closed, with a 408 when it had sent part of a request. `http_protocol` makes the class of
    one server (its `cfg` and `metrics`)."""
    cfg = None
    metrics: Metrics | None = None
    _head_timer = None

    def _reading_head(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm(self):
        if self._head_timer is None and self._reading_head():
            self._head_timer = self.loop.call_later(self.cfg.read_timeout_s, self._head_timeout)

    def _disarm(self):
        if self._head_timer is not None and not self._reading_head():
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self):
        self._head_timer = None
        if not self._reading_head() or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:   # part of a request head: say why
            self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
            self.metrics.count_request("other", 408)
        self.transport.close()

    def connection_made(self, transport):
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes):
        self._arm()
        super().data_received(data)
        self._disarm()

    def handle_events(self):   # also runs for pipelined requests once a response is complete
        super().handle_events()
        self._disarm()

    def connection_lost(self, exc):
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)


def http_protocol(cfg, metrics: Metrics) -> type[H11Protocol]:
    """The protocol class to give uvicorn for one server (uvicorn.Config(http=...)): `TimedH11Protocol` reading the
    server's `cfg.read_timeout_s` (at each connection: a test may change it) and counting its 408s in `metrics`."""
    return type("TimedH11Protocol", (TimedH11Protocol,), {"cfg": cfg, "metrics": metrics})
