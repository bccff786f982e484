"""Helpers for the directory's tests: real ``janus dir serve`` processes, owners, claimers."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Sequence
from pathlib import Path

from agent.cloud.process import ServerProcess
from agent.relationships.delivery import Address
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle

NAMESPACE = "example.org"


class DirectoryProcess(ServerProcess):
    """``janus dir serve`` on 127.0.0.1 (a free port, announced as JSON)."""

    def __init__(
        self,
        state_dir: Path,
        key_uri: str,
        *,
        store: str | None = None,
        rules: Path | None = None,
        namespace: str = NAMESPACE,
        extra: Sequence[str] = (),
    ) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable, "-m", "agent", "dir", "serve", "--namespace", namespace,
            "--key", key_uri, "--port", "0", "--json", "--state-dir", str(state_dir),
            *extra,
        ]  # fmt: skip
        if store:
            argv += ["--store", store]
        if rules:
            argv += ["--rules", str(rules)]
        env = dict(os.environ)
        super().__init__(argv, port=None, log_path=state_dir / "directory.log", env=env)


def directory_key(token_uri_for: object, label: str) -> str:
    """A fresh ES256 key on the SoftHSM token; its URI (with the token's pin-source)."""
    from janus_hsm import open_provider

    uri = token_uri_for(object=label)  # type: ignore[operator]
    provider = open_provider(uri)
    try:
        provider.find(uri)
    except Exception:
        provider.generate(uri, Algorithm.ES256)
    return str(uri)


def software_keys(
    directory: Path, count: int, algorithm: Algorithm = Algorithm.EdDSA
) -> list[KeyHandle]:
    """Claimers' keys: software keys in a keystore of their own (fast, many)."""
    from janus_hsm.backends.software import SoftwareProvider

    provider = SoftwareProvider.open(
        f"soft:dir={directory}", passphrase_source=lambda: "test passphrase", allow_extractable=True
    )
    keys = [
        provider.generate(f"soft:object=k{i}-{secrets.token_hex(4)}", algorithm)
        for i in range(count)
    ]
    return list(keys)


def intro_address(service: str = "http://127.0.0.1:9") -> Address:
    from janus_hsm import b64url

    return Address(service, b64url.encode(os.urandom(16)), b64url.encode(os.urandom(32)))
