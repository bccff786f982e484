"""``kill -9`` at each step of sending and receiving: nothing lost, nothing taken twice.

The process kills itself (SIGKILL, as ``kill -9``) at a named step when the environment
says so (vault.CRASH_ENV); the tests then run the same command again and check what the
vault holds and that the session still works.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from agent.relationships.vault import CRASH_ENV
from hardware.softhsm import SoftHSMToken
from tests.agent.relationships.owners import Owner, connect, owner, texts


def janus(
    token: SoftHSMToken, owner_: Owner, *args: str, crash_at: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = token.environ()
    env.pop(CRASH_ENV, None)
    if crash_at is not None:
        env[CRASH_ENV] = crash_at
    return subprocess.run(
        [sys.executable, "-m", "agent", "rel", *args, "--state-dir", str(owner_.state), "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def stored_texts(who: Owner, name: str) -> list[str]:
    with who.rels() as rels:
        return [m["message"]["body"]["text"] for m in rels.messages(name)]


@pytest.mark.parametrize("step", ["receive:decrypted", "receive:committed", "receive:acked"])
def test_receive_killed_at_any_step(softhsm_token: SoftHSMToken, tmp_path: Path, step: str) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        with blair.rels() as rels:
            for n in range(3):
                rels.send("alex", text=f"m{n}")
        killed = janus(softhsm_token, alex, "receive", crash_at=step)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        again = janus(softhsm_token, alex, "receive")
        assert again.returncode == 0, again.stderr
        assert stored_texts(alex, "blair") == ["m0", "m1", "m2"]
        # The session still works, both ways.
        sent = janus(softhsm_token, alex, "send", "blair", "--text", "still here")
        assert sent.returncode == 0, sent.stderr
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["still here"]
            rels.send("alex", text="me too")
        assert (
            json.loads(janus(softhsm_token, alex, "receive").stdout)["messages"][0]["message"][
                "body"
            ]["text"]
            == "me too"
        )


@pytest.mark.parametrize("step", ["send:committed", "send:delivered"])
def test_send_killed_at_any_step(softhsm_token: SoftHSMToken, tmp_path: Path, step: str) -> None:
    with (
        owner(softhsm_token, tmp_path, "alex") as alex,
        owner(softhsm_token, tmp_path, "blair") as blair,
    ):
        connect(alex, blair)
        killed = janus(softhsm_token, alex, "send", "blair", "--text", "once", crash_at=step)
        assert killed.returncode == -signal.SIGKILL, killed.stderr
        # The next command of the owner hands over what is still queued.
        assert janus(softhsm_token, alex, "receive").returncode == 0
        with alex.rels() as rels:
            assert rels.vault.outbox() == []
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["once"]
        assert stored_texts(blair, "alex") == ["once"]
        assert janus(softhsm_token, alex, "send", "blair", "--text", "twice").returncode == 0
        with blair.rels() as rels:
            assert texts(rels.receive()) == ["twice"]


def test_vault_file_is_private(softhsm_token: SoftHSMToken, tmp_path: Path) -> None:
    with owner(softhsm_token, tmp_path, "alex") as alex:
        with alex.rels() as rels:
            rels.invite("blair")
            path = rels.vault.path
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert os.stat(path.parent).st_mode & 0o777 == 0o700
