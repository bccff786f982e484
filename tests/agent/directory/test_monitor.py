"""The monitor catches a binding of the owner's name that the owner did not publish,
an entry of the owner's that the log lost, a log whose entries do not hash to the
signed root, and a forked history; HttpLogSource reads a real HTTP server."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from agent.directory.errors import (
    BindingNotPublishedError,
    DirectoryUnreachableError,
    EquivocationError,
    ProofError,
)
from agent.directory.keypackage import binding_leaf
from agent.directory.merkle import MemoryNodeStore, MerkleLog, b64, unb64, verify_consistency
from agent.directory.monitor import (
    ConsistencyAnswer,
    HttpLogSource,
    consistency_report,
    monitor,
    record_published,
    seen_heads,
)
from agent.directory.treehead import TreeHead, sign_tree_head
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeyNotFoundError
from janus_hsm.provider import KeyHandle

ALICE = "alice@example.org"
OWNER_ROOT = "did:key:z6MkOwnerRootxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"
MALLORY_ROOT = "did:key:z6MkMalloryRootxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"


@pytest.fixture
def directory_key(pkcs11_provider: Any, key_name: str) -> Iterator[KeyHandle]:
    handle: KeyHandle = pkcs11_provider.generate(f"pkcs11:object={key_name}", Algorithm.ES256)
    yield handle
    with contextlib.suppress(KeyNotFoundError):
        pkcs11_provider.delete(handle.uri)


class FakeDirectory:
    """A test double of a directory's transparency routes over an in-memory log."""

    def __init__(self, key: KeyHandle) -> None:
        self.key = key
        self.log = MerkleLog(MemoryNodeStore())

    def tree_head(self) -> TreeHead:
        return sign_tree_head(self.key, self.log.size(), self.log.root(), int(time.time() * 1000))

    def entries(self, start: int, end: int) -> list[bytes]:
        return self.log.leaves(start, min(end, self.log.size()))

    def consistency(self, first: int, second: int) -> ConsistencyAnswer:
        return ConsistencyAnswer(
            first, second, self.log.root(first), self.log.root(second),
            self.log.consistency(first, second),
        )  # fmt: skip


def _binding(name: str, root: str, ts: int, op: str = "publish") -> bytes:
    return binding_leaf(op=op, name=name, root=root, suite=None, idk=None, ts_ms=ts)


def _owner_publishes(directory: FakeDirectory, state: Path, ts: int) -> None:
    leaf = _binding(ALICE, OWNER_ROOT, ts)
    index = directory.log.append(leaf)
    record_published(state, directory.key.did, ALICE, leaf, index)


def test_the_owners_own_bindings_pass(directory_key: KeyHandle, tmp_path: Path) -> None:
    directory = FakeDirectory(directory_key)
    directory.log.append(_binding("bob@example.org", MALLORY_ROOT, 1))
    _owner_publishes(directory, tmp_path, 2)
    directory.log.append(b"not a binding entry")
    _owner_publishes(directory, tmp_path, 3)
    report = monitor(directory, ALICE, tmp_path, expected_key=directory_key.did, page=2)
    assert report.bindings == [1, 3]
    assert report.unreadable == [2]
    assert report.to_dict()["ok"] is True
    assert report.to_dict()["entries_checked"] == 4
    assert seen_heads(tmp_path).head(directory_key.did) is not None


def test_a_binding_the_owner_did_not_publish_is_caught(
    directory_key: KeyHandle, tmp_path: Path
) -> None:
    directory = FakeDirectory(directory_key)
    _owner_publishes(directory, tmp_path, 1)
    monitor(directory, ALICE, tmp_path)
    # The directory binds alice to Mallory's key (and appends it honestly to the log).
    directory.log.append(_binding(ALICE, MALLORY_ROOT, 2))
    with pytest.raises(BindingNotPublishedError) as caught:
        monitor(directory, ALICE, tmp_path)
    assert caught.value.code == "binding_not_published"
    assert [(e["problem"], e["leaf_index"]) for e in caught.value.entries] == [("not_published", 1)]
    # Another name's binding to Mallory is none of alice's business.
    assert monitor(directory, "bob@example.org", tmp_path).bindings == []


def test_owner_roots_vouch_for_entries_made_before_the_record(
    directory_key: KeyHandle, tmp_path: Path
) -> None:
    directory = FakeDirectory(directory_key)
    directory.log.append(_binding(ALICE, OWNER_ROOT, 1))
    with pytest.raises(BindingNotPublishedError):
        monitor(directory, ALICE, tmp_path)
    assert monitor(directory, ALICE, tmp_path, owner_roots=frozenset({OWNER_ROOT})).bindings == [0]
    directory.log.append(_binding(ALICE, MALLORY_ROOT, 2))
    with pytest.raises(BindingNotPublishedError):
        monitor(directory, ALICE, tmp_path, owner_roots=frozenset({OWNER_ROOT}))


def test_a_directory_that_drops_the_owners_entry_is_caught(
    directory_key: KeyHandle, tmp_path: Path
) -> None:
    honest = FakeDirectory(directory_key)
    honest.log.append(_binding("bob@example.org", MALLORY_ROOT, 1))
    _owner_publishes(honest, tmp_path, 2)
    # A fork that left the owner's publish out, shown to an owner who saw no head yet.
    fresh_state = tmp_path / "other-state"
    record_published(fresh_state, directory_key.did, ALICE, honest.log.leaf(1), 1)
    fork = FakeDirectory(directory_key)
    fork.log.append(_binding("bob@example.org", MALLORY_ROOT, 1))
    fork.log.append(_binding("carol@example.org", MALLORY_ROOT, 2))
    with pytest.raises(BindingNotPublishedError) as caught:
        monitor(fork, ALICE, fresh_state)
    assert caught.value.entries[0]["problem"] == "missing"
    # An owner who saw the honest head catches the fork as equivocation.
    monitor(honest, ALICE, tmp_path)
    with pytest.raises(EquivocationError) as equivocation:
        monitor(fork, ALICE, tmp_path)
    assert len(equivocation.value.evidence) == 2


def test_entries_that_do_not_hash_to_the_signed_root_are_refused(
    directory_key: KeyHandle, tmp_path: Path
) -> None:
    directory = FakeDirectory(directory_key)
    _owner_publishes(directory, tmp_path, 1)
    directory.log.append(_binding(ALICE, MALLORY_ROOT, 2))

    class Hiding(FakeDirectory):
        """Signs the real log but serves its entries without Mallory's binding."""

        def entries(self, start: int, end: int) -> list[bytes]:
            return [
                _binding("x@example.org", MALLORY_ROOT, 2) if i == 1 else leaf
                for i, leaf in enumerate(directory.entries(start, end), start)
            ]

    hiding = Hiding(directory_key)
    hiding.log = directory.log
    with pytest.raises(ProofError):
        monitor(hiding, ALICE, tmp_path)


def test_consistency_report_is_verified(directory_key: KeyHandle, tmp_path: Path) -> None:
    directory = FakeDirectory(directory_key)
    for i in range(11):
        directory.log.append(_binding(f"n{i}@example.org", OWNER_ROOT, i))
    report = consistency_report(directory, 4, 11, seen=seen_heads(tmp_path))
    verify_consistency(
        4,
        11,
        unb64(report["first_root"], "r"),
        unb64(report["second_root"], "r"),
        [unb64(h, "h") for h in report["proof"]],
    )
    assert report["second_root"] == report["tree_head"]["root_hash"]
    with pytest.raises(ProofError):
        consistency_report(directory, 5, 4)
    with pytest.raises(ProofError):
        consistency_report(directory, 4, 12)

    class Lying(FakeDirectory):
        def consistency(self, first: int, second: int) -> ConsistencyAnswer:
            real = directory.consistency(first, second)
            return ConsistencyAnswer(
                first, second, real.first_root, real.second_root, real.proof[1:]
            )

    lying = Lying(directory_key)
    lying.log = directory.log
    with pytest.raises(ProofError):
        consistency_report(lying, 4, 11)


# --- over real HTTP


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve(directory: FakeDirectory, broken: bool = False) -> Iterator[str]:
    def head(request: Request) -> JSONResponse:
        return JSONResponse(directory.tree_head().to_dict())

    def log(request: Request) -> JSONResponse:
        start, end = int(request.query_params["start"]), int(request.query_params["end"])
        leaves = directory.entries(start, end)
        entries = [b64(x) for x in leaves]
        if broken:
            entries.pop()  # a short page: every later index would be off by one
        return JSONResponse({"start": start, "tree_size": directory.log.size(), "entries": entries})

    def consistency(request: Request) -> JSONResponse:
        first, second = int(request.query_params["first"]), int(request.query_params["second"])
        if second > directory.log.size():
            return JSONResponse({"error": {"code": "directory_error", "message": "too big"}}, 400)
        a = directory.consistency(first, second)
        return JSONResponse({
            "first": first, "second": second, "first_root": b64(a.first_root),
            "second_root": b64(a.second_root), "proof": [b64(h) for h in a.proof],
        })  # fmt: skip

    app = Starlette(
        routes=[
            Route("/v1/dir/tree-head", head),
            Route("/v1/dir/log/entries", log),
            Route("/v1/dir/log/consistency", consistency),
        ]
    )
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def test_http_log_source_against_a_real_server(directory_key: KeyHandle, tmp_path: Path) -> None:
    directory = FakeDirectory(directory_key)
    for i in range(5):
        _owner_publishes(directory, tmp_path, i)
    with _serve(directory) as url:
        source = HttpLogSource(url)
        try:
            assert monitor(source, ALICE, tmp_path, page=2).bindings == [0, 1, 2, 3, 4]
            directory.log.append(_binding(ALICE, MALLORY_ROOT, 9))
            with pytest.raises(BindingNotPublishedError):
                monitor(source, ALICE, tmp_path, page=2)
            report = consistency_report(source, 2, 6, seen=seen_heads(tmp_path))
            assert (report["from"], report["to"]) == (2, 6)
            with pytest.raises(DirectoryUnreachableError, match="too big"):
                source.consistency(1, 60)
        finally:
            source.close()
    with _serve(directory, broken=True) as url:
        source = HttpLogSource(url)
        with pytest.raises(DirectoryUnreachableError, match="do not match the range"):
            source.entries(0, 3)
        source.close()
    closed = HttpLogSource(url)
    with pytest.raises(DirectoryUnreachableError, match="could not be reached"):
        closed.tree_head()
    closed.close()
