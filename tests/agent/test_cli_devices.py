"""``janus device …`` as real subprocesses: three devices, each with its own SoftHSM token."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hardware.softhsm import SoftHSMToken, ensure_token

# Opens a device's keys in its own process (its token is only visible there) and tries
# every route by which a private key could leave the token.
_PROBE = """
import json, sys
from pathlib import Path
from agent.edge.agent import EdgeAgent
from janus_hsm.backends.pkcs11.export_probe import probe_export
edge = EdgeAgent.open(Path(sys.argv[1]))
print(json.dumps([[a.route, a.refused] for k in (edge.root, edge.agreement)
                  for a in probe_export(k)]))
"""


@dataclass
class Device:
    name: str
    token: SoftHSMToken
    state: Path

    def run(self, *args: str, json_output: bool = True) -> subprocess.CompletedProcess[str]:
        extra = ["--json"] if json_output else []
        result = subprocess.run(
            [sys.executable, "-m", "agent", *args, "--state-dir", str(self.state), *extra],
            env=self.token.environ(),
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert "Traceback" not in result.stderr, result.stderr
        return result

    def ok(self, *args: str) -> Any:
        result = self.run(*args)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def fails(self, *args: str) -> str:
        result = self.run(*args)
        assert result.returncode == 1, result.stdout
        assert result.stderr.startswith("janus: error: ") and result.stderr.count("\n") == 1
        code: str = json.loads(result.stdout)["error"]["code"]
        return code


def device(tmp_path: Path, name: str) -> Device:
    """A device: its own SoftHSM (own configuration, own token) and edge state."""
    token = ensure_token(tmp_path / f"{name}-hsm", name)
    made = Device(name, token, tmp_path / name)
    made.ok("edge", "init", "--token", token.uri())
    return made


def test_three_devices_from_the_shell(tmp_path: Path) -> None:
    laptop, desktop, phone = (device(tmp_path, n) for n in ("laptop", "desktop", "phone"))
    assert laptop.ok("device", "list") == {"this_device": laptop.ok("edge", "did")["id"],
                                           "state": "no list"}  # fmt: skip
    started = laptop.ok("device", "init", "--name", "laptop")
    owner = started["owner"]
    assert started["version"] == 1 and started["this_device"] == owner

    # The desktop asks to join; the laptop approves with the code the desktop shows.
    request_file = tmp_path / "desktop.request"
    asked = desktop.ok("device", "request", "--name", "desktop", "--out", str(request_file))
    assert desktop.ok("device", "list")["state"] == "pending"
    assert laptop.fails("device", "add", str(request_file), "--code", "1111 2222 3333") == (
        "device_code_mismatch"
    )
    assert laptop.ok("device", "list")["version"] == 1  # nothing changed
    # An inbox needs the owner's receiving service: refused before the list changes.
    assert laptop.fails("device", "add", str(request_file), "--code", asked["code"],
                        "--inbox-out", str(tmp_path / "inbox")) == "no_service"  # fmt: skip
    assert laptop.ok("device", "list")["version"] == 1 and not (tmp_path / "inbox").exists()
    v2 = tmp_path / "v2.jws"
    added = laptop.ok("device", "add", str(request_file), "--code", asked["code"],
                      "--out", str(v2))  # fmt: skip
    assert added["version"] == 2 and added["added"]["did"] == asked["device"]
    assert desktop.fails("device", "accept", str(v2), "--owner", asked["device"]) == (
        "device_list_wrong_root"
    )
    joined = desktop.ok("device", "accept", str(v2), "--owner", owner)
    assert joined["state"] == "current" and joined["version"] == 2

    # The phone asks; the desktop (no root on its token) can approve nothing alone.
    phone_request = phone.ok("device", "request", "--name", "phone")
    code = phone_request["code"]
    assert desktop.fails("device", "add", phone_request["request"], "--code", code) == (
        "device_not_root"
    )
    # It approves, and the laptop (holding the root) signs the next version.
    approval = tmp_path / "phone.approval"
    approved = desktop.ok("device", "add", phone_request["request"], "--code", code,
                          "--approve-only", "--out", str(approval))  # fmt: skip
    assert approved["approved"]["version"] == 3
    assert approved["approval"]["entry"]["approver"] == asked["device"]
    assert desktop.fails("device", "add", phone_request["request"]) == "bad_request"  # no code
    v3 = laptop.ok("device", "add", str(approval))["list"]
    for other in (desktop, phone):
        assert other.ok("device", "accept", v3)["state"] == "current"
    listed = [d.ok("device", "list") for d in (laptop, desktop, phone)]
    assert {(s["version"], s["hash"], s["owner"]) for s in listed} == {
        (3, listed[0]["hash"], owner)
    }
    assert [e["name"] for e in listed[0]["devices"]] == ["laptop", "desktop", "phone"]
    assert listed[0]["devices"][2]["approver"] == asked["device"]
    assert [s["root_here"] for s in listed] == [True, False, False]
    assert [s["this_device"] for s in listed] == [owner, asked["device"], phone_request["device"]]
    text = phone.run("device", "list", json_output=False)
    assert text.returncode == 0 and "* phone" in text.stdout and "  laptop" in text.stdout

    # The phone is removed: the others take the new list; the phone learns it.
    v4 = tmp_path / "v4.jws"
    gone = laptop.ok("device", "remove", "phone", "--out", str(v4))
    assert gone["version"] == 4 and gone["removed"]["did"] == phone_request["device"]
    assert laptop.fails("device", "remove", "laptop") == "device_holds_root"
    assert desktop.ok("device", "accept", str(v4))["changed"] is True
    learnt = phone.run("device", "accept", str(v4))
    assert learnt.returncode == 0 and "removed" in learnt.stderr
    assert json.loads(learnt.stdout)["state"] == "removed"
    assert phone.ok("device", "list")["state"] == "removed"
    again = phone.run("device", "accept", str(v4))
    assert json.loads(again.stdout)["changed"] is False

    # Rollback, garbage: typed refusals, no state change.
    assert desktop.fails("device", "accept", str(v2)) == "device_list_not_newer"
    garbage = tmp_path / "garbage"
    garbage.write_text("not a list")
    assert desktop.fails("device", "accept", str(garbage)) == "malformed_device_list"
    assert desktop.ok("device", "list")["version"] == 4


def test_a_removed_device_cannot_approve(tmp_path: Path) -> None:
    laptop, tablet = device(tmp_path, "laptop"), device(tmp_path, "tablet")
    laptop.ok("device", "init", "--name", "laptop")
    asked = tablet.ok("device", "request", "--name", "tablet")
    listed = laptop.ok("device", "add", asked["request"], "--code", asked["code"])["list"]
    tablet.ok("device", "accept", listed)
    removed = laptop.ok("device", "remove", asked["device"])["list"]
    tablet.ok("device", "accept", removed)
    other = laptop.ok("device", "list")  # a request made by anyone: here the laptop's own
    assert tablet.fails("device", "add", other["list"], "--code", "0") == (
        "malformed_device_request"
    )
    fresh = device(tmp_path, "watch")
    watch = fresh.ok("device", "request", "--name", "watch")
    assert tablet.fails("device", "add", watch["request"], "--code", watch["code"]) == (
        "device_removed"
    )


def test_device_keys_are_never_exported(tmp_path: Path) -> None:
    own = device(tmp_path, "laptop")
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, str(own.state)],
        env=own.token.environ(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr
    attempts = json.loads(probe.stdout)
    assert len(attempts) >= 10 and all(refused for _, refused in attempts), attempts
