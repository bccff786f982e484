"""``janus dir consistency`` and ``janus dir monitor`` as scripts use them: real processes.

The consistency proofs the CLI prints are checked here by a verifier written from
RFC 9162 §2.1.4.2 alone, against roots computed from the log's entries, so a fault
shared by the directory and the project's own verifier cannot hide.
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest

from agent.cloud.process import CloudProcess
from agent.directory.keypackage import binding_leaf
from agent.directory.store import DirectoryStore
from agent.edge.agent import EdgeAgent
from hardware.softhsm import SoftHSMToken
from janus_hsm.database_url import sqlite_url
from tests.agent.directory.dirprocess import DirectoryProcess, directory_key, software_keys


def janus(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=120
    )


def ok_json(*args: str) -> Any:
    done = janus(*args, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def refused(*args: str) -> subprocess.CompletedProcess[str]:
    done = janus(*args)
    assert done.returncode == 1, done.stdout
    assert done.stderr.startswith("janus: error: ") and len(done.stderr.splitlines()) == 1
    return done


# --- RFC 9162, written from the text, independent of agent.directory.merkle ---------------


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def mth(leaves: Sequence[bytes]) -> bytes:
    """MTH(D[n]) of §2.1.1."""
    if not leaves:
        return _h(b"")
    if len(leaves) == 1:
        return _h(b"\x00" + leaves[0])
    k = 1
    while k * 2 < len(leaves):
        k *= 2
    return _h(b"\x01" + mth(leaves[:k]) + mth(leaves[k:]))


def rfc9162_consistent(
    first: int, second: int, first_hash: bytes, second_hash: bytes, path: Sequence[bytes]
) -> bool:
    """§2.1.4.2 step by step (with the trivial cases of equal and empty trees)."""
    if first == second:
        return not path and first_hash == second_hash
    if first == 0:
        return not path
    if not 0 < first < second or not path:
        return False
    path = list(path)
    if first & (first - 1) == 0:  # an exact power of 2
        path.insert(0, first_hash)
    fn, sn = first - 1, second - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            fr = _h(b"\x01" + c + fr)
            sr = _h(b"\x01" + c + sr)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            sr = _h(b"\x01" + sr + c)
        fn, sn = fn >> 1, sn >> 1
    return fr == first_hash and sr == second_hash and sn == 0


# --- the world ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(
    softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("dir-cli-log")
    owner, _ = EdgeAgent.init(tmp / "owner", softhsm_token.uri(), name="dir-log-owner")
    receiving = CloudProcess(tmp / "receiving", owner=owner.did, extra_args=["--receiving"])
    directory = DirectoryProcess(tmp / "dir", directory_key(softhsm_token.uri, "dir-cli-log"))
    store = DirectoryStore(sqlite_url((tmp / "dir" / "directory.db").resolve()))
    stranger = software_keys(tmp / "stranger", 1)[0].did
    yield {
        "owner": owner, "receiving": receiving, "directory": directory, "tmp": tmp,
        "store": store, "stranger": stranger,
    }  # fmt: skip
    store.close()
    directory.stop()
    receiving.stop()


def publish(world: dict[str, Any], name: str) -> dict[str, Any]:
    answer: dict[str, Any] = ok_json(
        "dir", "publish", "--directory", world["directory"].url, "--name", name,
        "--prekeys", "1", "--state-dir", str(world["tmp"] / "owner"),
        "--receiving", world["receiving"].url,
    )  # fmt: skip
    return answer


def inject(world: dict[str, Any], name: str, root: str) -> int:
    """A binding the directory's operator writes straight into its own database."""
    leaf = binding_leaf(
        op="publish",
        name=name,
        root=root,
        suite=None,
        idk=None,
        ts_ms=int(time.time() * 1000),
    )
    with world["store"].transaction() as tx:
        return int(tx.log().append(leaf))


def log_entries(url: str) -> list[bytes]:
    got = httpx.get(f"{url}/v1/dir/log/entries", params={"start": 0, "end": 1000}, timeout=10)
    got.raise_for_status()
    return [base64.b64decode(e, validate=True) for e in got.json()["entries"]]


# --- janus dir consistency -----------------------------------------------------------------


def test_consistency_proofs_check_with_rfc9162(world: dict[str, Any]) -> None:
    url = world["directory"].url
    publish(world, "hana")
    while len(log_entries(url)) < 9:
        inject(world, f"filler{len(log_entries(url))}@example.org", world["stranger"])
    leaves = log_entries(url)
    size = len(leaves)
    pairs = [(1, 2), (1, size), (2, 5), (3, 7), (4, 8), (5, size), (6, 7), (7, size), (size, size)]
    for first, second in pairs:
        shown = ok_json("dir", "consistency", "--directory", url, "--from", str(first),
                        "--to", str(second))  # fmt: skip
        assert set(shown) >= {"first_root", "second_root", "proof"}
        first_root = base64.b64decode(shown["first_root"], validate=True)
        second_root = base64.b64decode(shown["second_root"], validate=True)
        proof = [base64.b64decode(p, validate=True) for p in shown["proof"]]
        assert first_root == mth(leaves[:first]) and second_root == mth(leaves[:second])
        assert rfc9162_consistent(first, second, first_root, second_root, proof), (first, second)
        if first < second:  # the verifier is not a rubber stamp: a changed hash fails it
            bent = [proof[0][:-1] + bytes([proof[0][-1] ^ 1]), *proof[1:]]
            assert not rfc9162_consistent(first, second, first_root, second_root, bent)
            assert not rfc9162_consistent(first, second, first_root, second_root, proof[:-1])
    head = ok_json("dir", "consistency", "--directory", url, "--from", "2", "--to", str(size))
    assert base64.b64decode(head["tree_head"]["root_hash"]) == mth(leaves)


def test_consistency_refuses_sizes_it_cannot_prove(world: dict[str, Any]) -> None:
    url = world["directory"].url
    done = refused("dir", "consistency", "--directory", url, "--from", "5", "--to", "3")
    assert "--from" in done.stderr
    done = refused("dir", "consistency", "--directory", url, "--from", "1", "--to", "100000")
    assert "entries" in done.stderr


# --- janus dir monitor ---------------------------------------------------------------------


def test_monitor_of_a_clean_log(world: dict[str, Any]) -> None:
    url, owner_dir = world["directory"].url, world["tmp"] / "owner"
    published = publish(world, "ivy")
    for given in ("ivy", "ivy@example.org"):
        report = ok_json("dir", "monitor", given, "--directory", url, "--state-dir",
                         str(owner_dir))  # fmt: skip
        assert report["ok"] is True and report["name"] == "ivy@example.org"
        assert report["bindings"] == [published["leaf_index"]]
    text = janus("dir", "monitor", "ivy", "--directory", url, "--state-dir", str(owner_dir))
    assert text.returncode == 0 and "all published by this owner" in text.stdout


def test_monitor_accepts_the_owners_unrecorded_publishes(world: dict[str, Any]) -> None:
    """Entries under the owner's root are the owner's, recorded in this state dir or not
    (published from another machine, or before the record existed)."""
    url, owner_dir = world["directory"].url, world["tmp"] / "owner"
    published = publish(world, "jade")
    record = owner_dir / "directory" / "published.json"
    kept = record.read_bytes()
    record.unlink()
    try:
        report = ok_json("dir", "monitor", "jade", "--directory", url, "--state-dir",
                         str(owner_dir))  # fmt: skip
    finally:
        record.write_bytes(kept)
    assert report["ok"] is True and report["bindings"] == [published["leaf_index"]]


def test_monitor_refuses_a_name_of_another_domain(world: dict[str, Any]) -> None:
    url, owner_dir = world["directory"].url, str(world["tmp"] / "owner")
    publish(world, "kim")
    done = refused("dir", "monitor", "kim@other.org", "--directory", url, "--state-dir", owner_dir)
    assert "kim@other.org is not a name of this directory's namespace (@example.org)" in (
        done.stderr
    )


def test_monitor_reports_a_binding_the_owner_did_not_publish(world: dict[str, Any]) -> None:
    url, owner_dir = world["directory"].url, str(world["tmp"] / "owner")
    published = publish(world, "lena")
    assert ok_json("dir", "monitor", "lena", "--directory", url, "--state-dir", owner_dir)["ok"]
    forged = inject(world, "lena@example.org", world["stranger"])

    done = refused("dir", "monitor", "lena", "--directory", url, "--state-dir", owner_dir)
    assert "1 entry for lena@example.org that this owner did not publish" in done.stderr
    shown = janus("dir", "monitor", "lena", "--directory", url, "--state-dir", owner_dir, "--json")
    assert shown.returncode == 1
    error = json.loads(shown.stdout)["error"]
    assert error["code"] == "binding_not_published"
    assert [(e["problem"], e["leaf_index"]) for e in error["entries"]] == [
        ("not_published", forged)
    ]
    leaf = json.loads(base64.b64decode(error["entries"][0]["leaf"]))
    assert leaf["root"] == world["stranger"] and leaf["name"] == "lena@example.org"
    assert published["leaf_index"] < forged
