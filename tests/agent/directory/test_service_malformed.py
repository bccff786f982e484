"""Bad input at every route of a real directory: a typed 4xx, and no state change."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from agent.directory.client import DirectoryClient
from agent.relationships.prekeys import PrekeyStore
from agent.relationships.suite import Suite
from hardware.softhsm import SoftHSMToken
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from tests.agent.directory.dirprocess import (
    DirectoryProcess,
    directory_key,
    intro_address,
    software_keys,
)

NAME = "bob@example.org"
JUNK_JWS = "eyJhbGciOiJFUzI1NiJ9.e30.AAAA"

POSTS: dict[str, list[bytes | dict[str, object]]] = {
    "/v1/dir/publish": [
        b"", b"not json", b"[]", b'{"a": 1.5}', {}, {"request": 1},
        {"request": JUNK_JWS, "package": JUNK_JWS, "prekeys": []},
        {"request": JUNK_JWS, "package": "x", "prekeys": "no"},
        {"request": JUNK_JWS, "package": JUNK_JWS, "prekeys": [], "extra": 1},
    ],
    "/v1/dir/withdraw": [b"", b"{", {}, {"request": None}, {"request": JUNK_JWS}],
    "/v1/dir/status": [b"", {}, {"request": 5}, {"request": JUNK_JWS, "more": 1}],
    "/v1/dir/claim": [
        b"", b"\xff\xfe", {}, {"request": ["x"]}, {"request": JUNK_JWS}, {"request": "a" * 20000},
    ],
}  # fmt: skip
GETS = [
    "/v1/dir/attest/UPPER", "/v1/dir/attest/nobody", "/v1/dir/attest/x@other.org",
    "/v1/dir/log/consistency", "/v1/dir/log/consistency?first=2&second=1",
    "/v1/dir/log/consistency?first=-1&second=1", "/v1/dir/log/consistency?first=0&second=99",
    "/v1/dir/log/inclusion?index=5&size=1", "/v1/dir/log/inclusion?index=a&size=1",
    "/v1/dir/log/entries?start=x", "/v1/dir/log/entries?start=0&end=5000",
    "/v1/dir/no-such-route",
]  # fmt: skip


@pytest.fixture(scope="module")
def world(
    softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[DirectoryProcess, KeyHandle]]:
    tmp = tmp_path_factory.mktemp("dir-malformed")
    process = DirectoryProcess(tmp / "dir", directory_key(softhsm_token.uri, "dir-malformed"))
    root = software_keys(tmp / "root", 1)[0]
    agreement = software_keys(tmp / "x", 1, Algorithm.X25519)[0]
    with DirectoryClient(process.url) as client:
        client.publish(
            root, agreement, PrekeyStore(tmp / "prekeys", Suite.X25519), name=NAME,
            intro=intro_address(), prekeys=2,
        )  # fmt: skip
    yield process, root
    process.stop()


def _state(url: str, root: KeyHandle) -> tuple[int, int]:
    with DirectoryClient(url) as client:
        return client.tree_head().tree_size, client.status(root, NAME)["remaining"]


@pytest.mark.parametrize("route", sorted(POSTS))
def test_bad_bodies_are_typed_refusals(
    world: tuple[DirectoryProcess, KeyHandle], route: str
) -> None:
    process, root = world
    before = _state(process.url, root)
    for body in POSTS[route]:
        if isinstance(body, bytes):
            response = httpx.post(f"{process.url}{route}", content=body, timeout=10)
        else:
            response = httpx.post(f"{process.url}{route}", json=body, timeout=10)
        assert 400 <= response.status_code < 500, (route, body, response.text)
        error = response.json()["error"]
        assert isinstance(error["code"], str) and error["code"] != "internal"
    big = httpx.post(f"{process.url}{route}", content=b"{" + b" " * (2 * 1024 * 1024), timeout=30)
    assert 400 <= big.status_code < 500
    assert _state(process.url, root) == before


def test_bad_queries_are_typed_refusals(world: tuple[DirectoryProcess, KeyHandle]) -> None:
    process, root = world
    before = _state(process.url, root)
    for path in GETS:
        response = httpx.get(f"{process.url}{path}", timeout=10)
        assert 400 <= response.status_code < 500, (path, response.text)
        assert "code" in response.json()["error"]
    assert httpx.post(f"{process.url}/v1/dir/tree-head", timeout=10).status_code == 405
    assert _state(process.url, root) == before


def test_the_service_documents_itself(world: tuple[DirectoryProcess, KeyHandle]) -> None:
    process, _ = world
    spec = httpx.get(f"{process.url}/openapi.json", timeout=10).json()
    assert "/v1/dir/claim" in spec["paths"]
    metrics = httpx.get(f"{process.url}/metrics", timeout=10).text
    assert "janus_directory_requests" in metrics
