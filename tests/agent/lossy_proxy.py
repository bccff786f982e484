"""A lossy network in front of a real receiving service, for tests with real processes.

Every request is forwarded to the service unchanged, except deliveries (``POST
/v1/receiving/deliveries``, what sending services post) while ``faulty`` is set: each
is then, by a seeded random draw, *lost* (answered as the service answers a delivery it
took, and never forwarded), *duplicated* (forwarded twice) or *held back* (answered at
once, forwarded after the next delivery that passes, so it arrives out of order).  A
pickup releases whatever is still held, so nothing is held forever.

Written with the standard library's HTTP server rather than a proxy package: it must
lie to the sender about exactly one route, which no general proxy does.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

DELIVERIES = "/v1/receiving/deliveries"
PICKUP = "/v1/receiving/pickup"


class LossyProxy:
    def __init__(
        self,
        upstream: str,
        *,
        seed: int,
        lose: float = 0.1,
        duplicate: float = 0.1,
        hold: float = 0.15,
    ) -> None:
        self.seed = seed
        parts = urlsplit(upstream)
        self._host, self._port = parts.hostname or "127.0.0.1", parts.port or 80
        self._random = random.Random(seed)
        self._odds = (lose, duplicate, hold)
        self._lock = threading.Lock()
        self._held: list[tuple[str, dict[str, str], bytes]] = []
        self.faulty = False
        #: What was done to deliveries: "lost", "duplicated", "held", "passed".
        self.counts: Counter[str] = Counter()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._answer(*proxy._forward("GET", self.path, self._headers(), b""))

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                self._answer(*proxy._post(self.path, self._headers(), body))

            def _headers(self) -> dict[str, str]:
                return {k: v for k, v in self.headers.items() if k.lower() in {"content-type"}}

            def _answer(self, status: int, headers: dict[str, str], data: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _forward(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Any:
        connection = http.client.HTTPConnection(self._host, self._port, timeout=60)
        try:
            connection.request(method, path, body=body or None, headers=headers)
            answer = connection.getresponse()
            data = answer.read()
            kept = {"content-type": answer.getheader("content-type", "application/json")}
            return answer.status, kept, data
        finally:
            connection.close()

    def _post(self, path: str, headers: dict[str, str], body: bytes) -> Any:
        if path == PICKUP:
            self._release()
        if path != DELIVERIES or not self.faulty:
            return self._forward("POST", path, headers, body)
        lose, duplicate, hold = self._odds
        with self._lock:
            draw = self._random.random()
            fate = (
                "lost"
                if draw < lose
                else "held"
                if draw < lose + hold
                else "duplicated"
                if draw < lose + hold + duplicate
                else "passed"
            )
            self.counts[fate] += 1
            if fate == "held":
                self._held.append((path, headers, body))
        if fate in ("lost", "held"):  # answered as the service answers a delivery it took
            return 202, {"content-type": "application/json"}, b'{"status":"accepted"}'
        answer = self._forward("POST", path, headers, body)
        if fate == "duplicated":
            self._forward("POST", path, headers, body)
        self._release()  # what was held back arrives after this one
        return answer

    def _release(self) -> None:
        with self._lock:
            held, self._held = self._held, []
        for path, headers, body in held:
            try:
                self._forward("POST", path, headers, body)
            except OSError:
                with self._lock:
                    self.counts["lost"] += 1  # the service went away meanwhile: a loss too
