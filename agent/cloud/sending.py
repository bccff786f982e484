"""The sending service (``janus cloud serve --sending``): store and forward of sealed messages.

An owner grants this agent ``msg/submit`` on ``janus:sending`` (use and rate limits in
the grant, counted by the ledger like any other action).  A submission names a
receiving service, the recipient's address sealed to that service's key, the ciphertext
and an optional delay.  It is committed to SQLite before it is answered, and worker
threads forward it with retries and exponential backoff until the receiving service
takes it, refuses it for good, or it is too old.

What this service never has: the recipient's address (only the sealed blob, which only
the receiving service can open) and any plaintext.  Its logs name submissions by their
random id only.  Once a submission is done its blobs are erased (``secure_delete`` zeroes
the freed pages) and its status row is kept for a day.

Where it forwards (server-side request forgery): only ``https`` URLs whose host resolves
to public unicast addresses, checked at submission and again before every attempt, with
redirects not followed.  Hosts named with ``--sending-allow-host`` are exempt (plain
``http`` and private addresses allowed), e.g. 127.0.0.1 in tests or a receiving service
on the same private network.  See docs/services.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.cloud.receiving import delivery_body_limit
from agent.cloud.service import CloudAgent, ServiceAction
from agent.errors import BadRequestError
from agent.http_service import Endpoint, read_object
from agent.relationships.delivery import (
    DEFAULT_MAX_MESSAGE,
    MAX_DELAY,
    SEALED_BYTES,
    SENDING_RESOURCE,
    SUBMIT_ACTION,
    AddressFormatError,
    MessageTooLargeError,
    ReceivingUrlRefusedError,
    SealedAddressError,
    UnknownSubmissionError,
    check_service_url,
    delivery_body,
)
from janus_hsm import b64url

log = logging.getLogger(__name__)

DAY = 86400
QUEUED, DELIVERED, FAILED = "queued", "delivered", "failed"
_SUBMISSION_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_CODE = re.compile(r"[a-z0-9_]{1,64}")
# Receiving-service answers that will not change on a retry.
_PERMANENT = {400, 401, 403, 404, 405, 410, 413, 422}


@dataclass(frozen=True)
class SendingConfig:
    retry_base: float = 2.0  # first retry after this, doubling each time
    retry_cap: float = 3600.0  # never wait longer than this between attempts
    max_age: float = 3 * DAY  # then the submission fails (below receiving key overlap)
    max_message: int = DEFAULT_MAX_MESSAGE
    allow_hosts: frozenset[str] = field(default_factory=frozenset)
    workers: int = 4
    keep_done: float = DAY  # status rows of finished submissions
    timeout: float = 10.0


_SCHEMA = """
CREATE TABLE IF NOT EXISTS submissions (
    id TEXT PRIMARY KEY,
    receiving TEXT NOT NULL,
    sealed BLOB,
    ciphertext BLOB,
    created_at REAL NOT NULL,
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL,
    last_error TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS submissions_due ON submissions (state, next_attempt);
"""


class Refused(Exception):
    """A forward the receiving service (or the URL policy) refused for good."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


def check_receiving_url(url: Any, allow_hosts: frozenset[str], *, resolve: bool) -> str:
    """The URL if this service may forward to it (see the module docstring)."""
    try:
        checked = check_service_url(url)
    except AddressFormatError as exc:
        raise ReceivingUrlRefusedError(str(exc)) from None
    parts = urlsplit(checked)
    host = (parts.hostname or "").lower()
    if host in allow_hosts:
        return checked
    if parts.scheme != "https":
        raise ReceivingUrlRefusedError("the receiving service URL must be https")
    if host == "localhost" or host.endswith((".localhost", ".local", ".internal")):
        raise ReceivingUrlRefusedError("the receiving service must be on a public host")
    try:
        literal: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    elif resolve:
        try:
            infos = socket.getaddrinfo(host, parts.port or 443, type=socket.SOCK_STREAM)
        except OSError:
            raise ConnectionError("the receiving service's host does not resolve") from None
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    else:
        return checked
    for address in addresses:
        if not address.is_global or address.is_multicast:
            raise ReceivingUrlRefusedError("the receiving service must be on a public address")
    return checked


@dataclass(frozen=True)
class _Submission:
    receiving: str
    sealed: bytes
    ciphertext: bytes
    delay: int


class SendingService:
    """Thread-safe; one per cloud agent process (it owns ``sending.db``)."""

    def __init__(self, agent: CloudAgent, config: SendingConfig | None = None) -> None:
        self.agent = agent
        self.config = config or SendingConfig()
        self.path = agent.config.state_dir / "sending.db"
        self._db = _connect(self.path)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._in_flight: set[str] = set()
        self._stopping = False
        self._last_sweep = 0.0
        self._threads: list[threading.Thread] = []
        self._http = httpx.Client(timeout=self.config.timeout, follow_redirects=False)
        self.on_event: Callable[[str], None] = lambda event: None
        agent.actions[SUBMIT_ACTION] = ServiceAction(self.check, self.perform)

    # --- submission ----------------------------------------------------------------------

    def _parse(self, request: Mapping[str, Any]) -> _Submission:
        if not isinstance(request, Mapping) or not {"receiving", "sealed", "ciphertext"} <= set(
            request
        ):
            raise BadRequestError(
                "msg/submit needs receiving, sealed and ciphertext (delay optional)"
            )
        if not set(request) <= {"receiving", "sealed", "ciphertext", "delay"}:
            raise BadRequestError("msg/submit takes only receiving, sealed, ciphertext and delay")
        receiving = check_receiving_url(
            request["receiving"], self.config.allow_hosts, resolve=False
        )
        sealed = _b64(request["sealed"], "sealed")
        if len(sealed) != SEALED_BYTES:
            raise SealedAddressError(f"a sealed address is {SEALED_BYTES} bytes")
        ciphertext = _b64(request["ciphertext"], "ciphertext")
        if not ciphertext:
            raise BadRequestError("the ciphertext is empty")
        if len(ciphertext) > self.config.max_message:
            raise MessageTooLargeError(f"a message here is at most {self.config.max_message} bytes")
        delay = request.get("delay", 0)
        if not isinstance(delay, int) or isinstance(delay, bool) or not 0 <= delay <= MAX_DELAY:
            raise BadRequestError(f"delay must be an integer from 0 to {MAX_DELAY} seconds")
        return _Submission(receiving, sealed, ciphertext, delay)

    def check(self, request: Mapping[str, Any]) -> None:
        self._parse(request)

    def perform(self, request: Mapping[str, Any], *, now: float | None = None) -> dict[str, Any]:
        """Store the submission durably (committed before this returns)."""
        now = time.time() if now is None else now
        sub = self._parse(request)
        submission_id = b64url.random_id(16)
        due = now + sub.delay
        with self._wake:
            self._db.execute(
                "INSERT INTO submissions (id, receiving, sealed, ciphertext, created_at,"
                " next_attempt, state) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (submission_id, sub.receiving, sub.sealed, sub.ciphertext, now, due, QUEUED),
            )
            self._db.commit()
            self._wake.notify()
        self.on_event("submitted")
        log.info("submission %s queued", submission_id)
        return {"submission": submission_id, "not_before": int(due)}

    def status(self, submission_id: str) -> dict[str, Any]:
        if not _SUBMISSION_ID.fullmatch(submission_id):
            raise UnknownSubmissionError("not a submission id")
        with self._lock:
            row = self._db.execute(
                "SELECT state, attempts, next_attempt, last_error, created_at, done_at"
                " FROM submissions WHERE id = ?",
                (submission_id,),
            ).fetchone()
        if row is None:
            raise UnknownSubmissionError("no such submission here (or it is long done)")
        state, attempts, next_attempt, error, created, done = row
        return {
            "submission": submission_id,
            "state": state,
            "attempts": attempts,
            "next_attempt": next_attempt if state == QUEUED else None,
            "last_error": error,
            "created_at": created,
            "done_at": done,
        }

    # --- forwarding ------------------------------------------------------------------------

    def start(self) -> None:
        for n in range(self.config.workers):
            thread = threading.Thread(target=self._work, name=f"sending-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout=self.config.timeout + 1)
        self._http.close()
        with self._lock:
            self._db.close()

    def _claim(self) -> tuple[str, str, bytes, bytes, int, float] | None:
        """The next due submission, reserved for this thread; waits until one is due."""
        with self._wake:
            while not self._stopping:
                now = time.time()
                # The earliest due one no other worker holds (at most one each).
                rows = self._db.execute(
                    "SELECT id, receiving, sealed, ciphertext, attempts, created_at, next_attempt"
                    " FROM submissions WHERE state = ? ORDER BY next_attempt LIMIT ?",
                    (QUEUED, len(self._in_flight) + 1),
                ).fetchall()
                row = next((r for r in rows if r[0] not in self._in_flight), None)
                if row is not None and row[6] <= now:
                    self._in_flight.add(row[0])
                    return row[0], row[1], row[2], row[3], row[4], row[5]
                wait = 1.0 if row is None else min(1.0, row[6] - now)
                self._wake.wait(timeout=max(wait, 0.005))
                self._sweep(now)
        return None

    def _work(self) -> None:
        while True:
            claimed = self._claim()
            if claimed is None:
                return
            submission_id = claimed[0]
            try:
                self._attempt(*claimed)
            except Exception:  # a worker must outlive any one submission
                log.exception("forwarding submission %s failed unexpectedly", submission_id)
                self._finish(submission_id, FAILED, "internal")
            finally:
                with self._lock:
                    self._in_flight.discard(submission_id)

    def _attempt(
        self,
        submission_id: str,
        receiving: str,
        sealed: bytes,
        ciphertext: bytes,
        attempts: int,
        created: float,
    ) -> None:
        attempts += 1
        try:
            url = check_receiving_url(receiving, self.config.allow_hosts, resolve=True)
            response = self._http.post(
                f"{url}/v1/receiving/deliveries", json=delivery_body(sealed, ciphertext)
            )
            if response.status_code in _PERMANENT:
                raise Refused(_error_code(response))
            if response.status_code >= 300:
                raise ConnectionError(f"status {response.status_code}")
        except ReceivingUrlRefusedError:
            self._finish(submission_id, FAILED, ReceivingUrlRefusedError.code, attempts)
        except Refused as refused:
            log.warning(
                "submission %s refused by the receiving service: %s", submission_id, refused
            )
            self._finish(submission_id, FAILED, refused.code, attempts)
        except (httpx.HTTPError, ConnectionError) as exc:
            self._retry(submission_id, attempts, created, type(exc).__name__, str(exc))
        else:
            log.info("submission %s forwarded (attempt %d)", submission_id, attempts)
            self._finish(submission_id, DELIVERED, None, attempts)

    def _retry(
        self, submission_id: str, attempts: int, created: float, kind: str, detail: str
    ) -> None:
        now = time.time()
        if now - created >= self.config.max_age:
            log.warning("submission %s given up after %d attempts", submission_id, attempts)
            self._finish(submission_id, FAILED, "expired", attempts)
            return
        backoff = min(self.config.retry_cap, self.config.retry_base * 2 ** (attempts - 1))
        backoff *= random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not a secret
        error = "unreachable" if kind != "ConnectionError" else "retry"
        log.warning(
            "submission %s: attempt %d failed (%s); next in %.1fs",
            submission_id,
            attempts,
            kind if kind != "ConnectionError" else detail[:40],
            backoff,
        )
        with self._lock:
            self._db.execute(
                "UPDATE submissions SET attempts = ?, next_attempt = ?, last_error = ?"
                " WHERE id = ?",
                (attempts, now + backoff, error, submission_id),
            )
            self._db.commit()
        self.on_event("retried")

    def _finish(
        self, submission_id: str, state: str, error: str | None, attempts: int | None = None
    ) -> None:
        with self._lock:
            self._db.execute(
                "UPDATE submissions SET state = ?, last_error = ?, done_at = ?,"
                " attempts = COALESCE(?, attempts), sealed = NULL, ciphertext = NULL"
                " WHERE id = ?",
                (state, error, time.time(), attempts, submission_id),
            )
            self._db.commit()
        self.on_event("forwarded" if state == DELIVERED else "failed")

    def _sweep(self, now: float) -> None:
        """Forget finished submissions after ``keep_done`` (called with the lock held)."""
        if now - self._last_sweep < 60:
            return
        self._last_sweep = now
        self._db.execute(
            "DELETE FROM submissions WHERE state != ? AND done_at < ?",
            (QUEUED, now - self.config.keep_done),
        )
        self._db.commit()


def _b64(value: Any, name: str) -> bytes:
    if not isinstance(value, str):
        raise BadRequestError(f"'{name}' must be a base64url string")
    return b64url.decode(value, name, error=BadRequestError)


def _error_code(response: httpx.Response) -> str:
    """The receiving service's error code, if it is one (nothing else of its answer)."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return f"status_{response.status_code}"
    return code if isinstance(code, str) and _CODE.fullmatch(code) else "refused"


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False)
    os.chmod(path, 0o600)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")  # a submission answered 202 survives a power cut
    db.execute("PRAGMA secure_delete=ON")  # erased blobs are zeroed, not left in free pages
    db.executescript(_SCHEMA)
    return db


# --- HTTP ------------------------------------------------------------------------------------


def sending_routes(
    service: SendingService,
    endpoint: Endpoint,
    threaded: Callable[..., Any],
    check_bearer: Callable[[Request], None],
) -> list[Route]:
    """The service's routes, wrapped by the app's ``endpoint`` (errors, metrics)."""
    limit = delivery_body_limit(service.config.max_message) + 4096

    def too_large() -> Exception:
        return MessageTooLargeError(f"a message here is at most {service.config.max_message} bytes")

    async def submit(request: Request) -> JSONResponse:
        check_bearer(request)
        body = await read_object(request, limit, too_large)
        grant_id, payload = body.get("grant_id"), body.get("request")
        if (
            set(body) != {"grant_id", "request"}
            or not isinstance(grant_id, str)
            or not isinstance(payload, dict)
        ):
            raise BadRequestError("body must be {'grant_id': str, 'request': object}")
        result = await threaded(
            service.agent.act, grant_id, SUBMIT_ACTION, SENDING_RESOURCE, payload
        )
        return JSONResponse({"grant_id": result.grant_id, **result.result}, status_code=202)

    async def status(request: Request) -> dict[str, Any]:
        result: dict[str, Any] = await threaded(
            service.status, request.path_params["submission_id"]
        )
        return result

    async def info(request: Request) -> dict[str, Any]:
        return {
            "action": SUBMIT_ACTION,
            "resource": SENDING_RESOURCE,
            "max_message": service.config.max_message,
            "max_delay": MAX_DELAY,
            "max_age": service.config.max_age,
        }

    return [
        Route("/v1/sending", endpoint("sending_info", info), methods=["GET"]),
        Route("/v1/sending/submissions", endpoint("sending_submit", submit), methods=["POST"]),
        Route(
            "/v1/sending/submissions/{submission_id}",
            endpoint("sending_status", status),
            methods=["GET"],
        ),
    ]
