"""A bundle from a directory claim survives its dict form (the relationship vault stores it)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from agent.directory import merkle
from agent.directory.keypackage import OneTimePrekey, Package, sign_package
from agent.relationships.errors import BadPrekeyBundleError
from agent.relationships.prekeys import PrekeyBundle, PrekeyStore
from agent.relationships.suite import Suite
from janus_hsm import b64url
from janus_hsm.algorithms import Algorithm
from tests.agent.directory.dirprocess import intro_address, software_keys

DIRECTORY = "did:key:z6MkpTHR8VNsBxYAAWHut2Geadd9jSwuBV8xRoAnwWsdvktH"


@pytest.fixture(scope="module")
def claimed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Package, list[OneTimePrekey]]:
    tmp = tmp_path_factory.mktemp("bundle-form")
    root = software_keys(tmp / "root", 1)[0]
    agreement = software_keys(tmp / "agreement", 1, Algorithm.X25519)[0]
    store = PrekeyStore(tmp / "prekeys", Suite.X25519)
    spk, pq, opks, pqopks = store.generate(one_time=3)
    batch = [OneTimePrekey(o[0], o[1], p[0], p[1]) for o, p in zip(opks, pqopks, strict=True)]
    statement = sign_package(
        root, agreement, name="blair@example.org", directory=DIRECTORY, signed_prekey=spk,
        pq_prekey=pq, one_time=batch, batch_id="b" * 22, intro=intro_address(),
    )  # fmt: skip
    return Package.verify(statement), batch


def _proven(package: Package, batch: list[OneTimePrekey], index: int) -> PrekeyBundle:
    hashes = [merkle.leaf_hash(p.leaf()) for p in batch]
    path = merkle.audit_path(index, hashes)
    package.check_prekey(batch[index], index, path)
    return package.bundle(batch[index], index, path)


def test_a_claimed_bundle_round_trips(claimed: tuple[Package, list[OneTimePrekey]]) -> None:
    package, batch = claimed
    bundle = _proven(package, batch, 1)
    again = PrekeyBundle.from_dict(bundle.to_dict())
    assert again == bundle and again.binding_form == "directory-batch"
    assert again.one_time_prekeys == ((batch[1].opk_id, batch[1].opk_jwk),)
    last_resort = package.bundle(None)
    assert PrekeyBundle.from_dict(last_resort.to_dict()) == last_resort


def test_a_tampered_claimed_bundle_is_refused(
    claimed: tuple[Package, list[OneTimePrekey]], tmp_path: Path
) -> None:
    package, batch = claimed
    good = _proven(package, batch, 2).to_dict()

    def refused(change: dict[str, object]) -> None:
        with pytest.raises(BadPrekeyBundleError):
            PrekeyBundle.from_dict(change)

    swapped = copy.deepcopy(good)  # another prekey than the proven one
    swapped["one_time_prekeys"] = [{"id": batch[0].opk_id, "jwk": batch[0].opk_jwk}]
    refused(swapped)
    wrong_index = copy.deepcopy(good)
    wrong_index["one_time_proof"]["index"] = 0
    refused(wrong_index)
    unproven = copy.deepcopy(good)
    del unproven["one_time_proof"]
    refused(unproven)
    other_spk = copy.deepcopy(good)
    other_spk["signed_prekey"]["id"] = "A" * 16
    refused(other_spk)
    no_form = copy.deepcopy(good)
    del no_form["form"], no_form["one_time_proof"]
    refused(no_form)  # read as an ordinary bundle: its binding signs no prekey digest
    unknown = dict(good, form="other")
    refused(unknown)
    bad_path = copy.deepcopy(good)
    bad_path["one_time_proof"]["audit_path"] = [b64url.encode(b"\x00" * 32)]
    refused(bad_path)
