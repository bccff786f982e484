"""A directory started with --rules: enrolment by grant, rate limits, blocked claimers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.directory.client import DirectoryClient
from agent.directory.errors import ClaimerBlockedError, NotEnrolledError, RateLimitedError
from agent.relationships.prekeys import PrekeyStore
from agent.relationships.suite import Suite
from hardware.softhsm import SoftHSMToken
from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from policies.abilities import Ability
from policies.issue import grant
from tests.agent.directory.dirprocess import (
    DirectoryProcess,
    directory_key,
    intro_address,
    software_keys,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> list[KeyHandle]:
    # authority, owner, claimer, blocked claimer
    return software_keys(tmp_path_factory.mktemp("rules-keys"), 4)


@pytest.fixture(scope="module")
def directory(
    softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory, keys: list[KeyHandle]
) -> Iterator[DirectoryProcess]:
    tmp = tmp_path_factory.mktemp("dir-rules")
    rules = tmp / "rules.toml"
    rules.write_text(
        f'[enrolment]\nmode = "grant"\nauthority = "{keys[0].did}"\n\n'
        '[limits]\nclaims_per_claimer = 2\nclaims_per_name = 100\nwindow = "1h"\n\n'
        f'[blocked]\nclaimers = ["{keys[3].did}"]\n'
    )
    process = DirectoryProcess(
        tmp / "dir", directory_key(softhsm_token.uri, "dir-rules"), rules=rules
    )
    yield process
    process.stop()


def test_enrolment_rate_limits_and_blocking(
    directory: DirectoryProcess, keys: list[KeyHandle], tmp_path: Path
) -> None:
    authority, owner, claimer, blocked = keys
    agreement = software_keys(tmp_path / "x", 1, Algorithm.X25519)[0]
    store = PrekeyStore(tmp_path / "prekeys", Suite.X25519)
    name = "carol@example.org"
    with DirectoryClient(directory.url) as client:
        with pytest.raises(NotEnrolledError, match="authority's grant"):
            client.publish(owner, agreement, store, name=name, intro=intro_address(), prekeys=5)
        elsewhere = grant(
            authority, audience=owner.did, abilities=[Ability("janus:dir/dave@example.org",
            "dir/publish")], ttl_seconds=3600, uses=1,
        )  # fmt: skip
        with pytest.raises(NotEnrolledError, match="does not cover"):
            client.publish(
                owner, agreement, store, name=name, intro=intro_address(), prekeys=5,
                grant=elsewhere,
            )  # fmt: skip
        forged = grant(
            owner, audience=owner.did, abilities=[Ability(f"janus:dir/{name}", "dir/publish")],
            ttl_seconds=3600, uses=1,
        )  # fmt: skip
        with pytest.raises(NotEnrolledError, match="does not hold"):
            client.publish(
                owner, agreement, store, name=name, intro=intro_address(), prekeys=5, grant=forged
            )
        enrolment = grant(
            authority, audience=owner.did, abilities=[Ability(f"janus:dir/{name}", "dir/publish")],
            ttl_seconds=3600, uses=1,
        )  # fmt: skip
        done = client.publish(
            owner, agreement, store, name=name, intro=intro_address(), prekeys=5, grant=enrolment
        )
        assert done["remaining"] == 5

        client.claim(claimer, name)
        client.claim(claimer, name)
        with pytest.raises(RateLimitedError):
            client.claim(claimer, name)
        with pytest.raises(ClaimerBlockedError):
            client.claim(blocked, name)
        # Refused claims consumed nothing.
        assert client.status(owner, name)["remaining"] == 3
