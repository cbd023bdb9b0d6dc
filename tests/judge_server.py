"""A real OpenAI-compatible chat-completions server on loopback that ranks by a rule, for CycleAlign tests.

It answers ``POST /v1/chat/completions`` the way a vLLM or llama.cpp server
would: it reads the labelled responses ``[k] text`` of the last user message and
replies with a ranking line ``[a] > [b] > ...`` ordered by ``score(text)``
(highest first, ties to the lower label). ``script`` injects faults, one entry
per request in arrival order, then ``fault`` (settable while the server runs;
None, the default: every later request is answered normally). Faults of
transport: ``"500"`` (an HTTP 500), ``"timeout"`` (sleeps ``timeout_sleep`` s,
past the client's timeout), ``"garbage"`` (a 200 whose body, said to be JSON,
is not), ``"not_completion"`` (a 200 with JSON that is no chat completion).
Replies that are the judge's answer but no full ranking: ``"free"`` (free text),
``"partial"`` (leaves a label out), ``"repeat"`` (repeats a label). ``""`` in
the script: a normal answer. Every request body is kept in ``requests`` so
tests can see exactly what was sent. :func:`nothing_listening` is an address
where no server is.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Sequence

_LABELLED = re.compile(r"^\[(\d+)\] (.*)$")


class JudgeServer:
    def __init__(self, score: Callable[[str], float], script: Sequence[str] = (), timeout_sleep: float = 3.0,
                 fault: str | None = None):
        self.score, self.script, self.timeout_sleep, self.fault = score, list(script), timeout_sleep, fault
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with server._lock:
                    n = len(server.requests)
                    fault = server.script[n] if n < len(server.script) else (server.fault or "")
                    server.requests.append({"body": body, "auth": self.headers.get("Authorization")})
                if fault == "500":
                    return self._send(500, {"error": {"message": "injected failure"}})
                if fault == "garbage":
                    return self._send(200, None, raw=b"<html>upstream proxy error</html>")
                if fault == "not_completion":
                    return self._send(200, {"status": "ok", "detail": "not a chat completion"})
                if fault == "timeout":
                    time.sleep(server.timeout_sleep)
                text = server.reply_for(body["messages"], fault)
                self._send(200, {"id": "cmpl-test", "object": "chat.completion", "created": 0,
                                 "model": body.get("model", "rule"),
                                 "choices": [{"index": 0, "finish_reason": "stop",
                                              "message": {"role": "assistant", "content": text}}],
                                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _send(self, status, payload, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def reply_for(self, messages: list[dict], fault: str = "") -> str:
        labelled = [_LABELLED.match(line) for line in messages[-1]["content"].splitlines()]
        answers = {int(m.group(1)): m.group(2) for m in labelled if m}
        order = sorted(answers, key=lambda label: (-self.score(answers[label]), label))
        if fault == "free":
            return "They are all quite good answers, honestly."
        if fault == "partial":
            order = order[:-1]
        if fault == "repeat":
            order = order[:-1] + order[:1]
        return " > ".join(f"[{label}]" for label in order)

    def asked(self, since: int = 0) -> list[str]:
        """The last user message (the group as labelled) of each request from ``since`` on, in arrival order."""
        return [r["body"]["messages"][-1]["content"] for r in self.requests[since:]]

    def __enter__(self) -> "JudgeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()


def nothing_listening() -> str:
    """An OpenAI-style base URL on loopback where no server listens (a port just bound and released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"
