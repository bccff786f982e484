"""Two owners with two devices each, as real processes: every device its own SoftHSM
token and state, each owner its own cloud agent (receiving and sending service).

A relationship between the two root devices fans out to one session per device pair;
sends from several devices, one device offline for a while, then the same history on
every device; a removed device receives nothing new.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from agent.cloud.process import CloudProcess
from hardware.softhsm import SoftHSMToken, ensure_token

pytestmark = pytest.mark.slow
SERVICE_ARGS = ["--receiving", "--sending", "--sending-allow-host", "127.0.0.1"]


class Device:
    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.token: SoftHSMToken = ensure_token(base / name / "softhsm", name)
        self.state = base / name / "edge"
        self.did = str(self.ok("edge", "init", "--token", self.token.uri(), "--name", name)["did"])

    def janus(self, *args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "agent", *args, "--state-dir", str(self.state), "--json"]
        done = subprocess.run(
            argv, env=self.token.environ(), capture_output=True, text=True, timeout=180,
            check=False,
        )  # fmt: skip
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def ok(self, *args: str) -> Any:
        done = self.janus(*args)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def fails(self, *args: str) -> str:
        done = self.janus(*args)
        assert done.returncode == 1 and done.stderr.startswith("janus: error: "), done.stderr
        code: str = json.loads(done.stdout)["error"]["code"]
        return code

    def receive(self) -> list[str]:
        got = self.ok("rel", "receive")
        return [m["message"]["body"]["text"] for m in got["messages"]]

    def devices(self) -> dict[str, Any]:
        status: dict[str, Any] = self.ok("sync", "status")["devices"]
        return status

    def history_items(self) -> list[dict[str, Any]]:
        """This device's conversation with the other owner, in history order; checks
        that every message comes after its causal parents."""
        items: list[dict[str, Any]] = self.ok("rel", "history")["history"]
        seen: set[str] = set()
        for item in items:
            assert set(item["parents"]) <= seen, item
            seen.add(item["id"])
        return items

    def history(self) -> list[str]:
        """The texts of ``history_items``."""
        return [h["message"]["body"]["text"] for h in self.history_items()]


def join(root: Device, new: Device, base: Path) -> None:
    request = base / f"{new.name}.request"
    code = new.ok("device", "request", "--name", new.name, "--out", str(request))["code"]
    listed, inbox = base / f"{new.name}.list", base / f"{new.name}.inbox"
    root.ok("device", "add", str(request), "--code", code, "--out", str(listed),
            "--inbox-out", str(inbox))  # fmt: skip
    assert (inbox.stat().st_mode & 0o777) == 0o600
    joined = new.ok("device", "accept", str(listed), "--owner", root.did, "--inbox", str(inbox))
    assert joined["state"] == "current" and joined["inbox"] is True


def settle(devices: list[Device], rounds: int = 1) -> None:
    for _ in range(rounds):
        for device in devices:
            device.receive()


# Run with the device's token: the sync stores are sealed under a key of its vault.
_READ_STORE = """
import base64, json, sys
from pathlib import Path
from agent.relationships.manager import Relationships
from agent.sync.sealing import StoreSealer
from agent.sync.store import SyncStore

state, name = Path(sys.argv[1]), sys.argv[2]
with Relationships.open(state) as rels:
    store = SyncStore(state / "sync" / name, sealer=StoreSealer.of_vault(rels.vault))
    shown = [m for conv in store.conversations() for _, m in store.delivered(conv)]
    store.close()
print(json.dumps({
    "authors": {m.id: m.author for m in shown},
    "bodies": [base64.b64encode(m.body).decode() for m in shown],
}))
"""


def authors(device: Device, store_name: str) -> dict[str, str]:
    """Message id -> author key, of every message in one of a device's sync stores;
    checks on the way that the store's files hold none of those bodies (sealed at rest)."""
    done = subprocess.run(
        [sys.executable, "-c", _READ_STORE, str(device.state), store_name],
        env=device.token.environ(), capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    read = json.loads(done.stdout)
    files = b"".join(p.read_bytes() for p in (device.state / "sync").glob(f"{store_name}*"))
    bodies = [base64.b64decode(b) for b in read["bodies"]]
    assert bodies and all(len(b) >= 8 and b not in files for b in bodies)
    written: dict[str, str] = read["authors"]
    return written


def sessions(device: Device) -> set[str]:
    return {d for owner in device.devices()["owners"] for d in owner["sessions"]}


def make_owners(
    base: Path, devices: dict[str, int], clouds: list[CloudProcess]
) -> dict[str, list[Device]]:
    """Each owner's laptop (root device) with its own cloud agent as receiving and sending
    service, and with 2 ``devices`` a desktop joined to it; every cloud agent started
    goes into ``clouds``, for the caller to stop, also on failure.

    The owners share nothing, so they are set up at the same time: one owner's set-up
    runs while another's waits on its subprocesses.
    """

    def one(owner: str) -> list[Device]:
        root = Device(f"{owner}-laptop", base)
        cloud = CloudProcess(base / owner / "cloud", owner=root.did, extra_args=SERVICE_ARGS)
        clouds.append(cloud)
        for role in ("receiving", "sending"):
            root.ok("edge", "service", "add", cloud.url, "--role", role)
        root.ok("device", "init", "--name", "laptop")
        if devices[owner] == 1:
            return [root]
        other = Device(f"{owner}-desktop", base)
        join(root, other, base)
        return [root, other]

    with ThreadPoolExecutor(max_workers=len(devices)) as pool:
        made = {owner: pool.submit(one, owner) for owner in devices}
    return {owner: future.result() for owner, future in made.items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    base = tmp_path_factory.mktemp("fanout")
    clouds: list[CloudProcess] = []
    try:
        owners = make_owners(base, {"alex": 2, "blair": 2}, clouds)
        alex, blair = owners["alex"], owners["blair"]
        # An inbox document is for one device: another refuses it.
        listed, inbox = base / f"{alex[1].name}.list", base / f"{blair[1].name}.inbox"
        assert alex[1].fails("device", "accept", str(listed), "--inbox", str(inbox)) == (
            "bad_inbox_document"
        )
        invitation = base / "blair.invite"
        alex[0].ok("rel", "invite", "--name", "blair", "--out", str(invitation))
        blair[0].ok("rel", "accept", str(invitation), "--name", "alex")
        yield {"alex": alex, "blair": blair, "base": base}
    finally:
        for cloud in clouds:
            cloud.stop()


def test_fanout_converges_and_a_removed_device_gets_nothing(world: dict[str, Any]) -> None:
    alex, blair = world["alex"], world["blair"]
    everyone = alex + blair
    dids = {d.did for d in everyone}
    for _ in range(4):  # the relationship's start carries the two announcements
        settle(everyone)
        if converged := all(sessions(d) == dids - {d.did} for d in everyone):
            break
    assert converged, {d.name: sessions(d) for d in everyone}

    # Sends from three devices; Blair's desktop is offline meanwhile.
    assert alex[0].ok("rel", "send", "blair", "--text", "one")["devices"] == sorted(
        dids - {alex[0].did}
    )
    assert "one" in alex[1].receive() and "one" in blair[0].receive()
    blair[0].ok("rel", "send", "alex", "--text", "two")
    # Alex's desktop has no relationship of its own: it names the peer by its root did.
    alex[1].receive()
    alex[1].ok("rel", "send", blair[0].did, "--text", "three")
    settle([alex[0], blair[0], alex[1]])
    assert blair[1].receive() == ["one", "two", "three"]  # back online: all of it, in order
    settle(everyone)
    shown = [d.history_items() for d in everyone]
    histories = [[h["message"]["body"]["text"] for h in items] for items in shown]
    assert all(h == ["one", "two", "three"] for h in histories), histories
    hashes = {c["history_hash"] for d in everyone for c in d.devices()["conversations"]}
    assert len(hashes) == 1
    # Each message is signed by its device's sync key (certified once by the device's
    # key: the token signs no message), and shown as written on that device.
    items = shown[everyone.index(blair[1])]
    assert [h["device"] for h in items] == [alex[0].did, blair[0].did, alex[1].did]
    written = authors(blair[1], "direct.db")
    assert len(set(written.values())) == 3 and not set(written.values()) & dids

    # Blair removes the desktop: from then on no device sends it anything.
    blair[0].ok("device", "remove", blair[1].did)
    settle([blair[0], alex[0], alex[1]])
    for device in (alex[0], alex[1]):
        ended = {d for o in device.devices()["owners"] for d in o["ended"]}
        assert blair[1].did in ended
    sent = alex[0].ok("rel", "send", "blair", "--text", "four")
    assert blair[1].did not in sent["devices"]
    settle(everyone)
    assert "four" not in blair[1].history() and "four" in blair[0].history()
    assert alex[1].history()[-1] == "four"
    assert blair[1].devices()["removed"] is True
