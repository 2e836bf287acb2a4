"""A real HTTP server speaking enough of the OpenAI protocol to test `OpenAIBackend` (stdlib only, real sockets).

    with StubServer(ignore_n=True) as server:
        backend = OpenAIBackend(server.url, "stub")

Text is deterministic: "<think>\nthinking about: {first 24 chars of prompt}\n</think>\n\nanswer {i} w w w ..." where
i is the choice index, padded with "w" words. Tokens are whitespace words (max_tokens cuts words, usage counts words).
Knobs (attributes, changeable between requests):
  ignore_n          answer with one choice whatever n is (like servers that ignore n)
  fail_statuses     list of HTTP statuses returned, one per request, before answering normally (e.g. [429, 500])
  delay_s           sleep before answering (slow server)
  reasoning_content chat answers put the thinking in message.reasoning_content and only the answer in content
  never_thinks      answers hold no thinking at all (an instruct model); chat requests with
                    chat_template_kwargs.enable_thinking=false get none either (as vLLM / SGLang)
  reject_max_completion_tokens  400 when a chat request uses max_completion_tokens (older servers)
  n_words           words in each answer (before max_tokens)
It records every request body in `requests` and the peak number of requests in flight in `max_in_flight`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class StubServer:
    def __init__(self, ignore_n=False, fail_statuses=None, delay_s=0.0, reasoning_content=False,
                 reject_max_completion_tokens=False, n_words=12, never_thinks=False):
        self.ignore_n, self.delay_s, self.reasoning_content = ignore_n, delay_s, reasoning_content
        self.never_thinks = never_thinks
        self.fail_statuses = list(fail_statuses or [])
        self.reject_max_completion_tokens, self.n_words = reject_max_completion_tokens, n_words
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    # ---------------------------------------------------------------- the "model"

    def answer(self, prompt: str, index: int) -> tuple[str, str]:
        """(reasoning, answer) of choice `index`, before stop strings and max_tokens."""
        return f"thinking about: {prompt[:24]}", " ".join([f"answer {index}"] + ["w"] * (self.n_words - 2))


def _cut(text: str, body: dict, max_tokens: int | None) -> tuple[str, str]:
    """Apply stop strings and max_tokens (whitespace words) to text; returns (text, finish_reason)."""
    finish = "stop"
    for s in body.get("stop") or []:
        if s in text:
            text = text[:text.index(s)]
    words = text.split(" ")
    if max_tokens is not None and len(words) > max_tokens:
        text, finish = " ".join(words[:max_tokens]), "length"
    return text, finish


def _make_handler(server: StubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def _send(self, status: int, payload: dict):
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            with server.lock:
                server.requests.append(body)
                server.in_flight += 1
                server.max_in_flight = max(server.max_in_flight, server.in_flight)
                fail = server.fail_statuses.pop(0) if server.fail_statuses else None
            try:
                if server.delay_s:
                    time.sleep(server.delay_s)
                if fail is not None:
                    return self._send(fail, {"error": {"message": f"scripted failure {fail}"}})
                if self.path.endswith("/chat/completions"):
                    return self._chat(body)
                if self.path.endswith("/completions"):
                    return self._completions(body)
                return self._send(404, {"error": {"message": f"no route {self.path}"}})
            finally:
                with server.lock:
                    server.in_flight -= 1

        def _choices(self, prompt: str, body: dict):
            n = 1 if server.ignore_n else int(body.get("n", 1))
            return [server.answer(prompt, i) for i in range(n)]

        def _completions(self, body: dict):
            prompt = body["prompt"]
            choices, total = [], 0
            for i, (reasoning, answer) in enumerate(self._choices(prompt, body)):
                text = answer if server.never_thinks else f"{reasoning}\n</think>\n\n{answer}"
                text, finish = _cut(text, body, body.get("max_tokens"))
                total += len(text.split())
                choices.append({"index": i, "text": text, "finish_reason": finish, "logprobs": None})
            usage = {"prompt_tokens": len(prompt.split()), "completion_tokens": total}
            self._send(200, {"id": "cmpl-stub", "object": "text_completion", "model": body.get("model"),
                             "choices": choices, "usage": {**usage, "total_tokens": sum(usage.values())}})

        def _chat(self, body: dict):
            if server.reject_max_completion_tokens and "max_completion_tokens" in body:
                return self._send(400, {"error": {"message": "Unrecognized request argument supplied: "
                                                             "max_completion_tokens"}})
            prompt = body["messages"][-1]["content"]
            max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
            choices, total = [], 0
            thinks = not server.never_thinks and (body.get("chat_template_kwargs") or {}).get("enable_thinking", True)
            for i, (reasoning, answer) in enumerate(self._choices(prompt, body)):
                if not thinks:
                    content, finish = _cut(answer, body, max_tokens)
                    message = {"role": "assistant", "content": content}
                    total += len(content.split())
                elif server.reasoning_content:
                    content, finish = _cut(answer, body, max_tokens)
                    message = {"role": "assistant", "content": content, "reasoning_content": reasoning}
                    total += len(content.split()) + len(reasoning.split())
                else:
                    content, finish = _cut(f"<think>\n{reasoning}\n</think>\n\n{answer}", body, max_tokens)
                    message = {"role": "assistant", "content": content}
                    total += len(content.split())
                choices.append({"index": i, "message": message, "finish_reason": finish})
            usage = {"prompt_tokens": sum(len(m["content"].split()) for m in body["messages"]),
                     "completion_tokens": total}
            self._send(200, {"id": "chatcmpl-stub", "object": "chat.completion", "model": body.get("model"),
                             "choices": choices, "usage": {**usage, "total_tokens": sum(usage.values())}})

    return Handler
