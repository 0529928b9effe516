"""A small OpenAI-compatible HTTP server on loopback for the HTTP engine's fault tests.

It is a real server (``http.server`` in a thread, real sockets), not a mock transport: the engine's httpx client
connects, sends and parses exactly as it would with vLLM. By default it answers like vLLM's server with canned,
deterministic content; a script of faults (status codes, delays, garbage or truncated bodies, dropped
connections, a wrong number of choices, corrupted fields, huge or trickled bodies, error bodies that echo the
request's headers) is served first, one fault per request, in order.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

# Canned answers: the sampled ids are a function of the request's seed, so tests can check that seeds travel.
CANNED_TOKENS = [28, 9064, 42, 2]  # ends with EOS (2): a finished generation
DIGIT_LOGPROB = -3.0  # log-prob given to every candidate id asked for (logprob_token_ids)


def canned_tokens(seed: int) -> list[int]:
    return [CANNED_TOKENS[0] + seed % 50, *CANNED_TOKENS[1:]]


class FaultServer:
    """Serves ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` on ``127.0.0.1:<free port>``.

    Attributes:
        faults: actions served before normal answers, one per POST request: ``("status", code)`` or
            ``("status", code, headers)``, ``("delay", seconds)`` (then a normal answer), ``("garbage",)``,
            ``("truncated",)``, ``("drop",)``, ``("choices", k)``, ``("edit", fn)`` (the normal answer after
            ``fn(answer)`` changed it in place; NaN is sent as JSON's ``NaN`` literal), ``("pad", n, declare)``
            (the normal answer with an ``n``-byte padding field, with a ``Content-Length`` header when ``declare``,
            else streamed until the connection closes), ``("raw", payload)`` (HTTP 200 with these bytes as the
            body), ``("trickle", chunks, seconds)`` (the normal answer in ``chunks`` pieces, ``seconds`` apart),
            ``("echo", code, pad)`` (HTTP ``code`` whose error message is ``pad`` dots and then the request's
            ``Authorization`` header, as some proxies do).
        outage: while set, every POST is answered with this HTTP status (a server that is down for a while).
        requests: ``(method, path, headers, body)`` of every request received.
        max_in_flight: the most requests that were being handled at once.
    """

    def __init__(self, models: tuple[str, ...] = ("tiny",)):
        self.models = models
        self.faults: list[tuple[Any, ...]] = []
        self.requests: list[tuple[str, str, dict[str, str], Any]] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.answer_delay = 0.0
        self.outage: int | None = None
        self._connections: set[Any] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def do_GET(self) -> None:
                server._handle(self, "GET")

            def do_POST(self) -> None:
                server._handle(self, "POST")

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop listening and cut the open (keep-alive) connections: the server is gone."""
        self.httpd.shutdown()
        self.httpd.server_close()
        with self._lock:
            for conn in self._connections:
                try:
                    conn.shutdown(2)
                except OSError:
                    pass

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        raw = h.rfile.read(length) if length else b""
        body = json.loads(raw) if raw else None
        with self._lock:
            self._connections.add(h.connection)
            self.requests.append((method, h.path, dict(h.headers), body))
            fault = self.faults.pop(0) if self.faults and method == "POST" else None
            if self.outage is not None and method == "POST":
                fault = ("status", self.outage)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.answer_delay:
                time.sleep(self.answer_delay)
            self._answer(h, method, body, fault)
        finally:
            with self._lock:
                self.in_flight -= 1

    def _answer(self, h: BaseHTTPRequestHandler, method: str, body: Any, fault: tuple[Any, ...] | None) -> None:
        kind = fault[0] if fault else None
        if kind == "delay":
            time.sleep(fault[1])
        if kind == "status":
            headers = fault[2] if len(fault) > 2 else {"Retry-After": "0"} if fault[1] == 429 else None
            return self._send(h, fault[1], json.dumps({"error": {"message": f"injected {fault[1]}"}}).encode(),
                              extra=headers)
        if kind == "echo":
            message = "." * fault[2] + f" received Authorization: {h.headers.get('Authorization')}"
            return self._send(h, fault[1], json.dumps({"error": {"message": message}}).encode())
        if kind == "garbage":
            return self._send(h, 200, b"<html>definitely not json")
        if kind == "raw":
            return self._send(h, 200, fault[1])
        if kind == "truncated":
            return self._send(h, 200, json.dumps(self._completion(body))[:40].encode())
        if kind == "drop":
            h.close_connection = True
            h.connection.shutdown(2)
            return None
        if method == "GET" and h.path.rstrip("/") == "/v1/models":
            return self._send(h, 200, json.dumps({"object": "list", "data": [{"id": m} for m in self.models]}).encode())
        if method != "POST" or h.path not in ("/v1/completions", "/v1/chat/completions"):
            return self._send(h, 404, b'{"error": {"message": "not found"}}')
        if body.get("model") not in self.models:
            return self._send(h, 404, json.dumps({"error": {"message": f"model {body.get('model')} not served"}})
                              .encode())
        answer = self._chat(body) if h.path.endswith("chat/completions") else self._completion(body)
        if kind == "choices":
            answer["choices"] = answer["choices"][:1] * fault[1]
        if kind == "edit":
            fault[1](answer)
        if kind == "pad":
            answer["padding"] = "x" * fault[1]
            if not fault[2]:
                return self._stream_until_close(h, json.dumps(answer).encode())
        payload = json.dumps(answer).encode()
        if kind == "trickle":
            return self._send(h, 200, payload, pieces=fault[1], interval_s=fault[2])
        return self._send(h, 200, payload)

    @staticmethod
    def _completion(body: dict[str, Any]) -> dict[str, Any]:
        if body.get("logprob_token_ids"):  # a judge request: one token, log-probs of the candidates
            cands = body["logprob_token_ids"]
            top = {f"token_id:{c}": DIGIT_LOGPROB - 0.5 * i for i, c in enumerate(cands)}
            choice = {"index": 0, "text": "", "token_ids": [cands[0]], "finish_reason": "length",
                      "logprobs": {"tokens": [f"token_id:{cands[0]}"], "token_logprobs": [DIGIT_LOGPROB],
                                   "top_logprobs": [top]}}
        else:
            toks = canned_tokens(int(body.get("seed") or 0))[: body["max_tokens"]]
            choice = {"index": 0, "text": "canned", "token_ids": toks, "prompt_token_ids": body["prompt"],
                      "finish_reason": "stop" if toks[-1] == 2 else "length"}
            if body.get("logprobs") is not None:
                choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in toks],
                                      "token_logprobs": [-0.25] * len(toks), "top_logprobs": None}
        return {"id": "cmpl-test", "object": "text_completion", "model": body["model"], "choices": [choice]}

    @staticmethod
    def _chat(body: dict[str, Any]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": "Question: canned?"},
                                  "finish_reason": "stop"}
        if body.get("logprobs"):
            top = [{"token": str(d), "logprob": DIGIT_LOGPROB - 0.5 * (d - 1)} for d in range(1, 10, 2)]
            choice["logprobs"] = {"content": [{"token": "1", "logprob": DIGIT_LOGPROB, "top_logprobs": top}]}
        return {"id": "chat-test", "object": "chat.completion", "model": body["model"], "choices": [choice]}

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, payload: bytes, extra: dict[str, str] | None = None,
              pieces: int = 1, interval_s: float = 0.0) -> None:
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(payload)))
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        step = -(-len(payload) // pieces)
        try:
            for i in range(0, len(payload), step):
                if i:
                    time.sleep(interval_s)
                h.wfile.write(payload[i:i + step])
                h.wfile.flush()
        except OSError:  # the client gave up (a deadline, a size cap): nothing more to send
            h.close_connection = True

    @staticmethod
    def _stream_until_close(h: BaseHTTPRequestHandler, payload: bytes) -> None:
        """A body without ``Content-Length``: the client reads until the server closes the connection."""
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Connection", "close")
        h.end_headers()
        h.close_connection = True
        try:
            for i in range(0, len(payload), 1 << 16):
                h.wfile.write(payload[i:i + (1 << 16)])
        except OSError:
            pass
