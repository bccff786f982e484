"""The software keystore backend, on real files in a temporary directory (no mocks).

Passphrase-protected keys cost one scrypt (n=2**15, ~0.1 s) to make and one to unlock,
so tests that need many unlocks use keys wrapped to another key instead.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import pickle
import re
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, x25519
from cryptography.x509.oid import NameOID
from hypothesis import assume, given
from hypothesis import strategies as st

from janus_hsm import open_key, open_provider
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software import SoftwareKeyHandle, SoftwareProvider, SoftwareUri
from janus_hsm.errors import (
    AttestationUnavailableError,
    ExtractableKeyError,
    JanusHSMError,
    KeyExistsError,
    KeyNotFoundError,
    KeystoreError,
    MechanismUnsupportedError,
    UriError,
)
from janus_hsm.provider import KeyHandle, SignatureFormat, raw_to_der
from janus_hsm.public_keys import jwk_thumbprint, to_jwk

PASSPHRASE = "correct horse battery staple"
SIGNING = [Algorithm.ES256, Algorithm.ES384, Algorithm.EdDSA]
EXCHANGING = [Algorithm.ES256, Algorithm.ES384, Algorithm.X25519]


def _never() -> str:
    raise AssertionError("the passphrase was asked for, but nothing needed it")


@pytest.fixture
def keystore(tmp_path: Path) -> Path:
    return tmp_path / "keys"


def open_store(
    directory: Path,
    passphrase: str | Callable[[], str] = PASSPHRASE,
    *,
    allow_extractable: bool = True,
    wrapping_key: KeyHandle | None = None,
) -> SoftwareProvider:
    source = passphrase if callable(passphrase) else (lambda: passphrase)
    return SoftwareProvider.open(
        f"soft:dir={directory}",
        passphrase_source=source,
        allow_extractable=allow_extractable,
        wrapping_key=wrapping_key,
    )


@pytest.fixture
def store(keystore: Path) -> Iterator[SoftwareProvider]:
    provider = open_store(keystore)
    yield provider
    provider.close()


@pytest.fixture
def wrapper(tmp_path: Path) -> KeyHandle:
    """An X25519 software key in a keystore of its own, to wrap other keys with."""
    provider = open_store(tmp_path / "wrapping")
    return provider.generate("soft:object=wrap", Algorithm.X25519)


def _files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _verify(handle: KeyHandle, data: bytes, signature: bytes, fmt: SignatureFormat) -> None:
    public = handle.public_key()
    if isinstance(public, ed25519.Ed25519PublicKey):
        public.verify(signature, data)
        return
    assert isinstance(public, ec.EllipticCurvePublicKey)
    hash_alg = handle.algorithm.hash_algorithm
    assert hash_alg is not None
    der = (
        signature
        if fmt is SignatureFormat.DER
        else raw_to_der(signature, handle.algorithm.coordinate_size)
    )
    public.verify(der, data, ec.ECDSA(hash_alg))


# --- generate, find, list, delete ---------------------------------------------------


@pytest.mark.parametrize("alg", list(Algorithm), ids=str)
def test_generate_find_list_delete(store: SoftwareProvider, keystore: Path, alg: Algorithm) -> None:
    handle = store.generate(f"soft:object=key-{alg.value}", alg)
    assert isinstance(handle, SoftwareKeyHandle)
    assert handle.uri == f"soft:dir={keystore};object=key-{alg.value}"
    assert handle.algorithm is alg
    assert handle.path == keystore / f"key-{alg.value}.jkey"

    found = store.find(handle.uri)
    assert to_jwk(found.public_key()) == to_jwk(handle.public_key())
    assert found.jwk()["kid"] == handle.jwk()["kid"]
    assert found.did == handle.did
    # A URI without dir= names a key in the open keystore.
    assert store.find(f"soft:object=key-{alg.value}").uri == handle.uri

    assert [h.uri for h in store.list_keys()] == [handle.uri]

    store.delete(handle.uri)
    assert store.list_keys() == []
    assert not handle.path.exists()
    with pytest.raises(KeyNotFoundError, match=r"janus keys list soft:dir="):
        store.find(handle.uri)
    with pytest.raises(KeyNotFoundError):
        store.delete(handle.uri)


def test_properties_say_software_keys_are_extractable(store: SoftwareProvider) -> None:
    handle = store.generate("soft:object=k", Algorithm.ES256)
    props = handle.properties
    assert props.backend == "software"
    assert props.algorithm is Algorithm.ES256
    assert (props.sensitive, props.extractable) == (False, True)
    assert (props.always_sensitive, props.never_extractable, props.local) == (False, False, True)
    assert not props.custody_grade
    with pytest.raises(AttestationUnavailableError):
        handle.attest()


def test_keys_are_listed_sorted_and_without_a_passphrase(keystore: Path) -> None:
    with open_store(keystore) as maker:
        for name, alg in [("b", Algorithm.EdDSA), ("a", Algorithm.X25519)]:
            maker.generate(f"soft:object={name}", alg)
    reader = open_store(keystore, _never)
    handles = reader.list_keys()
    assert [h.uri.rsplit("=", 1)[1] for h in handles] == ["a", "b"]
    assert [h.algorithm for h in handles] == [Algorithm.X25519, Algorithm.EdDSA]
    for handle in handles:
        handle.jwk()  # public key without unlocking
    assert not any(isinstance(h, SoftwareKeyHandle) and h.unlocked for h in handles)


def test_generate_refuses_an_existing_name(store: SoftwareProvider, keystore: Path) -> None:
    store.generate("soft:object=k", Algorithm.EdDSA)
    before = (keystore / "k.jkey").read_bytes()
    with pytest.raises(KeyExistsError, match="already has a key named 'k'"):
        store.generate("soft:object=k", Algorithm.ES256)
    assert (keystore / "k.jkey").read_bytes() == before


def test_concurrent_generation_of_one_name_makes_one_key(store: SoftwareProvider) -> None:
    results: list[object] = []

    def make() -> None:
        try:
            results.append(store.generate("soft:object=race", Algorithm.EdDSA))
        except KeyExistsError as exc:
            results.append(exc)

    threads = [threading.Thread(target=make) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    made = [r for r in results if isinstance(r, SoftwareKeyHandle)]
    assert len(made) == 1
    assert len(results) == 4
    assert to_jwk(store.find("soft:object=race").public_key()) == to_jwk(made[0].public_key())


def test_uri_must_name_the_open_keystore_and_a_key(store: SoftwareProvider, tmp_path: Path) -> None:
    with pytest.raises(UriError, match="open on"):
        store.generate(f"soft:dir={tmp_path}/other;object=k", Algorithm.ES256)
    with pytest.raises(UriError, match="object="):
        store.generate("soft:", Algorithm.ES256)
    with pytest.raises(UriError, match="object="):
        store.find(f"soft:dir={store.directory}")


def test_delete_and_close_stop_existing_handles(keystore: Path) -> None:
    provider = open_store(keystore)
    made = provider.generate("soft:object=gone", Algorithm.EdDSA)
    found = provider.find("soft:object=gone")
    found.sign(b"x")
    provider.delete("soft:object=gone")
    for handle in (made, found):
        with pytest.raises(KeyNotFoundError, match="was deleted"):
            handle.sign(b"x")

    kept = provider.generate("soft:object=kept", Algorithm.EdDSA)
    provider.close()
    with pytest.raises(KeystoreError, match="closed"):
        kept.sign(b"x")
    with pytest.raises(KeystoreError, match="closed"):
        provider.list_keys()


def test_handles_cannot_be_pickled_or_copied(store: SoftwareProvider) -> None:
    handle = store.generate("soft:object=k", Algorithm.EdDSA)
    with pytest.raises(TypeError):
        pickle.dumps(handle)
    with pytest.raises(TypeError):
        copy.copy(handle)


# --- operations ---------------------------------------------------------------------


@pytest.mark.parametrize("alg", SIGNING, ids=str)
def test_signatures_verify_with_cryptography(keystore: Path, alg: Algorithm) -> None:
    with open_store(keystore) as maker:
        made = maker.generate("soft:object=signer", alg)
        _verify(made, b"fresh", made.sign(b"fresh"), SignatureFormat.RAW)
    # A new provider decrypts the file rather than reusing the key it generated.
    with open_store(keystore) as reader:
        handle = reader.find("soft:object=signer")
        data = b"payload to sign"
        raw = handle.sign(data)
        _verify(handle, data, raw, SignatureFormat.RAW)
        if alg is Algorithm.EdDSA:
            assert len(raw) == 64
            with pytest.raises(MechanismUnsupportedError):
                handle.sign(data, format=SignatureFormat.DER)
        else:
            assert len(raw) == 2 * alg.coordinate_size
            der = handle.sign(data, format=SignatureFormat.DER)
            _verify(handle, data, der, SignatureFormat.DER)


@pytest.mark.parametrize("alg", [Algorithm.ES256, Algorithm.ES384], ids=str)
def test_certificate_signed_through_cryptography_builders(
    store: SoftwareProvider, alg: Algorithm
) -> None:
    handle = store.generate("soft:object=ca", alg)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "software key")])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(handle.as_cryptography_key(), hashes.SHA256())
    )
    assert csr.is_signature_valid


@pytest.mark.parametrize("alg", EXCHANGING, ids=str)
def test_ecdh_equals_cryptographys_own(keystore: Path, alg: Algorithm) -> None:
    with open_store(keystore) as maker:
        maker.generate("soft:object=agree", alg)
    with open_store(keystore) as reader:
        handle = reader.find("soft:object=agree")
        peer: ec.EllipticCurvePrivateKey | x25519.X25519PrivateKey
        if alg is Algorithm.X25519:
            peer = x25519.X25519PrivateKey.generate()
            ours = handle.public_key()
            assert isinstance(ours, x25519.X25519PublicKey)
            expected = peer.exchange(ours)
        else:
            assert alg.curve is not None
            peer = ec.generate_private_key(alg.curve)
            ours_ec = handle.public_key()
            assert isinstance(ours_ec, ec.EllipticCurvePublicKey)
            expected = peer.exchange(ec.ECDH(), ours_ec)
        assert handle.exchange(peer.public_key()) == expected
        assert len(expected) == alg.coordinate_size


def test_what_each_algorithm_cannot_do(store: SoftwareProvider) -> None:
    ed = store.generate("soft:object=ed", Algorithm.EdDSA)
    xk = store.generate("soft:object=x", Algorithm.X25519)
    p256 = store.generate("soft:object=p256", Algorithm.ES256)
    with pytest.raises(MechanismUnsupportedError, match="X25519"):
        ed.exchange(x25519.X25519PrivateKey.generate().public_key())
    with pytest.raises(MechanismUnsupportedError, match="key agreement only"):
        xk.sign(b"x")
    with pytest.raises(MechanismUnsupportedError, match="P-384"):
        p256.exchange(ec.generate_private_key(ec.SECP384R1()).public_key())
    with pytest.raises(MechanismUnsupportedError, match="digest"):
        p256.sign_digest(b"\x00" * 20)


def test_small_order_x25519_peer_is_refused(store: SoftwareProvider) -> None:
    handle = store.generate("soft:object=x", Algorithm.X25519)
    with pytest.raises(JanusHSMError, match="key agreement"):
        handle.exchange(x25519.X25519PublicKey.from_public_bytes(bytes(32)))


# --- custody ------------------------------------------------------------------------


def test_custody_checks_refuse_software_keys_unless_allowed(keystore: Path) -> None:
    strict = open_store(keystore, allow_extractable=False)
    with pytest.raises(ExtractableKeyError, match="allow-extractable"):
        strict.generate("soft:object=k", Algorithm.ES256)
    assert not keystore.exists()  # refused before anything was written

    open_store(keystore).generate("soft:object=k", Algorithm.ES256)
    with pytest.raises(ExtractableKeyError, match="EXTRACTABLE is true"):
        strict.find("soft:object=k")
    shown = strict.lookup("soft:object=k")  # showing and listing are fine …
    assert [h.uri for h in strict.list_keys()] == [shown.uri]
    with pytest.raises(ExtractableKeyError):  # … using is not
        shown.sign(b"x")
    with pytest.raises(ExtractableKeyError):
        shown.exchange(ec.generate_private_key(ec.SECP256R1()).public_key())
    with pytest.raises(ExtractableKeyError):
        open_key(f"soft:dir={keystore};object=k", pin_source=lambda: PASSPHRASE)
    handle = open_key(
        f"soft:dir={keystore};object=k", pin_source=lambda: PASSPHRASE, allow_extractable=True
    )
    handle.sign(b"x")
    strict.delete("soft:object=k")  # deleting needs no opt-in
    assert not (keystore / "k.jkey").exists()


def test_open_provider_dispatches_soft_uris(keystore: Path) -> None:
    provider = open_provider(
        f"soft:dir={keystore}", pin_source=lambda: PASSPHRASE, allow_extractable=True
    )
    assert isinstance(provider, SoftwareProvider)
    assert provider.directory == keystore
    assert provider.store_uri == f"soft:dir={keystore}"


# --- passphrases --------------------------------------------------------------------


def test_passphrase_is_read_lazily_and_the_key_cached(keystore: Path) -> None:
    open_store(keystore).generate("soft:object=k", Algorithm.EdDSA)
    calls: list[int] = []

    def source() -> str:
        calls.append(1)
        return PASSPHRASE

    provider = open_store(keystore, source)
    handle = provider.find("soft:object=k")
    assert calls == [] and not handle.unlocked
    handle.sign(b"one")
    handle.sign(b"two")
    assert calls == [1] and handle.unlocked


def test_passphrase_from_pin_source_file_or_environment(
    keystore: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pin_file = tmp_path / "passphrase"
    pin_file.write_text(PASSPHRASE + "\n")
    pin_file.chmod(0o600)
    uri = f"soft:dir={keystore};object=k?pin-source=file:{pin_file}"
    provider = SoftwareProvider.open(uri, allow_extractable=True)
    made = provider.generate(uri, Algorithm.EdDSA)
    assert "pin-source" not in made.uri

    monkeypatch.setenv("JANUS_PIN", PASSPHRASE)
    handle = open_key(f"soft:dir={keystore};object=k", allow_extractable=True)
    _verify(handle, b"x", handle.sign(b"x"), SignatureFormat.RAW)


def test_wrong_passphrase_is_a_keystore_error_and_changes_nothing(keystore: Path) -> None:
    open_store(keystore).generate("soft:object=k", Algorithm.ES256)
    before = (keystore / "k.jkey").read_bytes()
    wrong = open_store(keystore, "not the passphrase")
    handle = wrong.find("soft:object=k")
    with pytest.raises(KeystoreError, match="passphrase is wrong"):
        handle.sign(b"x")
    with pytest.raises(KeystoreError, match="passphrase is wrong"):
        handle.unlock()
    assert not handle.unlocked
    assert (keystore / "k.jkey").read_bytes() == before
    assert _files(keystore) == [".janus-keystore.lock", "k.jkey"]
    open_store(keystore).find("soft:object=k").unlock()


# --- files on disk ------------------------------------------------------------------


def test_files_are_0600_in_a_0700_directory(keystore: Path) -> None:
    old = os.umask(0)  # even a careless umask must not loosen them
    try:
        open_store(keystore).generate("soft:object=k", Algorithm.EdDSA)
    finally:
        os.umask(old)
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o700
    assert stat.S_IMODE((keystore / "k.jkey").stat().st_mode) == 0o600
    assert stat.S_IMODE((keystore / ".janus-keystore.lock").stat().st_mode) == 0o600


def test_a_keystore_others_can_write_to_is_refused(keystore: Path) -> None:
    keystore.mkdir()
    keystore.chmod(0o777)
    with pytest.raises(KeystoreError, match="writable by other users"):
        open_store(keystore).generate("soft:object=k", Algorithm.EdDSA)
    assert _files(keystore) == []


def test_file_format(store: SoftwareProvider, keystore: Path) -> None:
    handle = store.generate("soft:object=k", Algorithm.ES256)
    data = (keystore / "k.jkey").read_bytes()
    doc = json.loads(data)
    # Canonical JSON, one line: sorted keys, no whitespace.
    assert data == json.dumps(doc, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    assert set(doc) == {
        "format", "version", "name", "alg", "created", "public_jwk", "protection", "enc",
        "nonce", "ciphertext",
    }  # fmt: skip
    assert (doc["format"], doc["version"], doc["name"], doc["alg"], doc["enc"]) == (
        "janus-software-key", 1, "k", "ES256", "A256GCM",
    )  # fmt: skip
    assert doc["public_jwk"] == to_jwk(handle.public_key())
    assert doc["protection"]["mode"] == "passphrase"
    assert doc["protection"]["kdf"] == "scrypt"
    assert (doc["protection"]["n"], doc["protection"]["r"], doc["protection"]["p"]) == (2**15, 8, 1)
    assert len(doc["protection"]["salt"]) == 22  # 16 bytes, base64url
    assert len(doc["nonce"]) == 16  # 12 bytes
    assert handle.created.tzinfo is not None
    assert doc["created"] == handle.created.strftime("%Y-%m-%dT%H:%M:%SZ")


def test_a_renamed_or_linked_file_is_refused(store: SoftwareProvider, keystore: Path) -> None:
    store.generate("soft:object=a", Algorithm.EdDSA)
    os.rename(keystore / "a.jkey", keystore / "b.jkey")
    with pytest.raises(KeystoreError, match="cannot be renamed"):
        store.lookup("soft:object=b")
    os.rename(keystore / "b.jkey", keystore / "a.jkey")
    os.symlink(keystore / "a.jkey", keystore / "c.jkey")
    with pytest.raises(KeystoreError, match="symbolic link"):
        store.lookup("soft:object=c")
    assert [h.uri.rsplit("=", 1)[1] for h in store.list_keys()] == ["a"]


def test_a_fifo_under_a_keys_name_does_not_hang(store: SoftwareProvider, keystore: Path) -> None:
    store.generate("soft:object=real", Algorithm.EdDSA)  # the directory exists
    os.mkfifo(keystore / "pipe.jkey", 0o600)  # opening it for reading would block
    with pytest.raises(KeystoreError):
        store.lookup("soft:object=pipe")
    assert [h.uri.rsplit("=", 1)[1] for h in store.list_keys()] == ["real"]


def test_scrypt_costs_beyond_128_mib_are_refused_before_any_work(
    store: SoftwareProvider, keystore: Path
) -> None:
    store.generate("soft:object=k", Algorithm.EdDSA)
    path = keystore / "k.jkey"
    data = path.read_bytes()
    assert data.count(b'"n":32768') == 1 and b'"r":8' in data
    path.write_bytes(data.replace(b'"n":32768', b'"n":1048576'))  # 1 GiB: was accepted
    with pytest.raises(KeystoreError, match="out of bounds"):
        store.lookup("soft:object=k").unlock()


def test_a_corrupt_file_is_skipped_by_listing(store: SoftwareProvider, keystore: Path) -> None:
    store.generate("soft:object=good", Algorithm.EdDSA)
    (keystore / "bad.jkey").write_bytes(b"{not json")
    assert [h.uri.rsplit("=", 1)[1] for h in store.list_keys()] == ["good"]
    with pytest.raises(KeystoreError, match="not JSON"):
        store.find("soft:object=bad")


def _value_offsets(data: bytes, doc: dict[str, Any]) -> dict[str, int]:
    """Offset of a byte inside each field's value, to flip it."""

    def inside(value: str) -> int:
        encoded = json.dumps(value).encode()
        start = data.index(encoded)
        return start + len(encoded) // 2

    protection = doc["protection"]
    return {
        "alg": inside(doc["alg"]),
        "name": inside(doc["name"]),
        "created": inside(doc["created"]),
        "nonce": inside(doc["nonce"]),
        "ciphertext first": data.index(doc["ciphertext"].encode()),
        "ciphertext": inside(doc["ciphertext"]),
        "ciphertext last": data.index(doc["ciphertext"].encode()) + len(doc["ciphertext"]) - 1,
        "public key x": inside(doc["public_jwk"]["x"]),
        "public key crv": inside(doc["public_jwk"]["crv"]),
        "salt": inside(protection["salt"]),
        "kdf": inside(protection["kdf"]),
        "n": data.index(b'"n":') + 5,
        "r": data.index(b'"r":') + 4,
        "format": inside(doc["format"]),
        "version": data.index(b'"version":') + 10,
    }


def _flipped(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    return data[:offset] + bytes([data[offset] ^ mask]) + data[offset + 1 :]


def _assert_refused(provider: SoftwareProvider, uri: str) -> None:
    with pytest.raises(KeystoreError):
        provider.lookup(uri).unlock()


@pytest.mark.parametrize("alg", [Algorithm.ES256, Algorithm.EdDSA], ids=str)
def test_tampering_with_a_passphrase_file_is_refused(
    store: SoftwareProvider, keystore: Path, alg: Algorithm
) -> None:
    store.generate("soft:object=k", alg)
    path = keystore / "k.jkey"
    original = path.read_bytes()
    offsets = _value_offsets(original, json.loads(original))
    for field, offset in offsets.items():
        path.write_bytes(_flipped(original, offset))
        try:
            _assert_refused(store, "soft:object=k")
        except pytest.fail.Exception:
            pytest.fail(f"flipping a byte of {field} was not noticed")
    path.write_bytes(original)
    open_store(keystore).find("soft:object=k").unlock()


def test_flipping_any_byte_of_a_wrapped_file_is_refused(keystore: Path, wrapper: KeyHandle) -> None:
    provider = open_store(keystore, _never, wrapping_key=wrapper)
    provider.generate("soft:object=k", Algorithm.ES256)
    path = keystore / "k.jkey"
    original = path.read_bytes()
    for offset in range(len(original)):
        for mask in (0x01, 0x20, 0x80):
            path.write_bytes(_flipped(original, offset, mask))
            try:
                _assert_refused(provider, "soft:object=k")
            except pytest.fail.Exception:
                pytest.fail(f"flipping byte {offset} with {mask:#x} was not noticed")
    path.write_bytes(original[:-1])  # truncated
    _assert_refused(provider, "soft:object=k")
    path.write_bytes(original)
    handle = provider.find("soft:object=k")
    _verify(handle, b"x", handle.sign(b"x"), SignatureFormat.RAW)


def test_no_header_field_can_be_swapped_between_files(
    store: SoftwareProvider, keystore: Path
) -> None:
    store.generate("soft:object=a", Algorithm.EdDSA)
    store.generate("soft:object=b", Algorithm.EdDSA)
    a = json.loads((keystore / "a.jkey").read_bytes())
    b = json.loads((keystore / "b.jkey").read_bytes())
    for field in ("public_jwk", "nonce", "created", "protection", "ciphertext"):
        mixed = {**a, field: b[field]}
        data = json.dumps(mixed, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        (keystore / "a.jkey").write_bytes(data)
        if mixed == a:
            continue
        _assert_refused(store, "soft:object=a")


# --- atomic writes ------------------------------------------------------------------


def test_a_failed_rename_leaves_nothing_half_written(
    store: SoftwareProvider, keystore: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.generate("soft:object=old", Algorithm.EdDSA)
    old = (keystore / "old.jkey").read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(errno.EIO, "simulated crash before the rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeystoreError, match="cannot write"):
        store.generate("soft:object=new", Algorithm.EdDSA)
    monkeypatch.undo()

    assert _files(keystore) == [".janus-keystore.lock", "old.jkey"]
    assert (keystore / "old.jkey").read_bytes() == old
    assert [h.uri.rsplit("=", 1)[1] for h in store.list_keys()] == ["old"]
    open_store(keystore).find("soft:object=old").sign(b"still works")
    store.generate("soft:object=new", Algorithm.EdDSA)  # the name is still free


def test_a_process_killed_mid_write_leaves_no_key_file(keystore: Path) -> None:
    with open_store(keystore) as provider:
        provider.generate("soft:object=old", Algorithm.EdDSA)
    old = (keystore / "old.jkey").read_bytes()
    script = textwrap.dedent(
        f"""
        import os
        from janus_hsm.algorithms import Algorithm
        from janus_hsm.backends.software import SoftwareProvider

        provider = SoftwareProvider.open(
            {f"soft:dir={keystore}"!r}, passphrase_source=lambda: "pw", allow_extractable=True
        )
        os.replace = lambda src, dst: os._exit(7)  # the process dies before the rename
        provider.generate("soft:object=new", Algorithm.EdDSA)
        """
    )
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 7, result.stderr
    leftovers = [n for n in _files(keystore) if n.startswith(".tmp-")]
    assert len(leftovers) == 1  # the dead writer's temp file, complete or not …
    assert not (keystore / "new.jkey").exists()  # … but never a key file
    assert (keystore / "old.jkey").read_bytes() == old
    with open_store(keystore) as provider:
        assert [h.uri.rsplit("=", 1)[1] for h in provider.list_keys()] == ["old"]
        provider.generate("soft:object=new", Algorithm.EdDSA)
    # The next writer cleans up after the dead one.
    assert _files(keystore) == [".janus-keystore.lock", "new.jkey", "old.jkey"]


# --- wrapping keys ------------------------------------------------------------------


@pytest.mark.parametrize("wrap_alg", [Algorithm.X25519, Algorithm.ES256, Algorithm.ES384], ids=str)
def test_keys_wrapped_to_another_software_key(
    keystore: Path, tmp_path: Path, wrap_alg: Algorithm
) -> None:
    wrapping_store = open_store(tmp_path / "wrapping")
    wrapping = wrapping_store.generate("soft:object=wrap", wrap_alg)
    other = wrapping_store.generate("soft:object=other", wrap_alg)

    provider = open_store(keystore, _never, wrapping_key=wrapping)
    made = provider.generate("soft:object=k", Algorithm.EdDSA)
    assert made.protection == "ecdh-es"
    assert made.wrapping_key_uri == wrapping.uri
    doc = json.loads((keystore / "k.jkey").read_bytes())
    assert doc["protection"]["mode"] == "ecdh-es"
    assert doc["protection"]["kdf"] == "HKDF-SHA256"
    assert doc["protection"]["wrapping_key"] == {
        "uri": wrapping.uri,
        "thumbprint": jwk_thumbprint(wrapping.public_key()),
    }
    assert doc["protection"]["epk"]["crv"] == wrap_alg.jwk_crv

    # Reopened with the same wrapping key (found anew): works, without a passphrase.
    again = open_store(keystore, _never, wrapping_key=wrapping_store.find("soft:object=wrap"))
    handle = again.find("soft:object=k")
    _verify(handle, b"data", handle.sign(b"data"), SignatureFormat.RAW)

    # A different key of the same type, or none: refused, naming the right one.
    wrong = open_store(keystore, _never, wrapping_key=other).find("soft:object=k")
    with pytest.raises(KeystoreError, match="is a different key") as info:
        wrong.sign(b"data")
    assert wrapping.uri in str(info.value)
    assert jwk_thumbprint(wrapping.public_key()) in str(info.value)
    without = open_store(keystore, _never).find("soft:object=k")
    with pytest.raises(KeystoreError, match="no wrapping key was given"):
        without.sign(b"data")


def test_an_eddsa_key_cannot_wrap(store: SoftwareProvider, keystore: Path) -> None:
    signer = store.generate("soft:object=ed", Algorithm.EdDSA)
    with pytest.raises(MechanismUnsupportedError, match="cannot do key agreement"):
        open_store(keystore, wrapping_key=signer)


def test_a_wrapping_key_that_refuses_use_writes_nothing(keystore: Path, tmp_path: Path) -> None:
    # A software wrapping key opened without allow_extractable refuses ECDH, so the
    # round-trip check at generation fails before anything is written.
    open_store(tmp_path / "w").generate("soft:object=wrap", Algorithm.X25519)
    strict_wrapper = open_store(tmp_path / "w", allow_extractable=False).lookup("soft:object=wrap")
    provider = open_store(keystore, _never, wrapping_key=strict_wrapper)
    with pytest.raises(ExtractableKeyError):
        provider.generate("soft:object=k", Algorithm.EdDSA)
    assert not (keystore / "k.jkey").exists()


def test_keys_wrapped_to_a_softhsm_key(pkcs11_provider: Any, keystore: Path, key_name: str) -> None:
    wrapping = pkcs11_provider.generate(f"pkcs11:object={key_name}", Algorithm.ES256)
    try:
        assert wrapping.properties.custody_grade
        provider = open_store(keystore, _never, wrapping_key=wrapping)
        made = provider.generate("soft:object=cloud", Algorithm.EdDSA)
        doc = json.loads((keystore / "cloud.jkey").read_bytes())
        recorded = doc["protection"]["wrapping_key"]
        assert recorded["uri"] == wrapping.uri.partition("?")[0]
        assert recorded["uri"].startswith("pkcs11:") and "?" not in recorded["uri"]
        assert recorded["thumbprint"] == jwk_thumbprint(wrapping.public_key())

        found = pkcs11_provider.find(f"pkcs11:object={key_name}")
        handle = open_store(keystore, _never, wrapping_key=found).find("soft:object=cloud")
        data = b"signed by a key the token unwrapped"
        signature = handle.sign(data)
        _verify(handle, data, signature, SignatureFormat.RAW)
        assert to_jwk(handle.public_key()) == to_jwk(made.public_key())

        software = open_store(keystore.parent / "w").generate("soft:object=w", Algorithm.ES256)
        wrong = open_store(keystore, _never, wrapping_key=software).find("soft:object=cloud")
        with pytest.raises(KeystoreError, match="is a different key"):
            wrong.unlock()
    finally:
        pkcs11_provider.delete(f"pkcs11:object={key_name}")


# --- URIs ---------------------------------------------------------------------------


def test_uri_attributes_and_printing() -> None:
    uri = SoftwareUri.parse("soft:object=grant-1;dir=/var/lib/janus%20keys?pin-source=file:/run/p")
    assert uri.dir == "/var/lib/janus keys"
    assert uri.object == "grant-1"
    assert uri.pin_source == "file:/run/p"
    assert str(uri) == "soft:dir=/var/lib/janus%20keys;object=grant-1?pin-source=file:/run/p"
    assert uri.directory == Path("/var/lib/janus keys")
    assert str(uri.without_query()) == "soft:dir=/var/lib/janus%20keys;object=grant-1"
    assert str(SoftwareUri.parse("SOFT:")) == "soft:"
    assert SoftwareUri.parse("soft:object=a.b_c-D9").object == "a.b_c-D9"


def test_default_directory_is_the_users_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert SoftwareUri.parse("soft:object=k").directory == tmp_path / "data" / "janus" / "keys"
    provider = SoftwareProvider.open(
        "soft:", passphrase_source=lambda: PASSPHRASE, allow_extractable=True
    )
    handle = provider.generate("soft:object=k", Algorithm.EdDSA)
    assert handle.path == tmp_path / "data" / "janus" / "keys" / "k.jkey"
    assert handle.uri == f"soft:dir={tmp_path}/data/janus/keys;object=k"


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("pkcs11:object=k", "must start with 'soft:'"),
        ("soft", "must start with 'soft:'"),
        ("soft:token=x", "'token'"),
        ("soft:object=k;colour=blue", "'colour'"),
        ("soft:object=k?module-path=/x.so", "'module-path'"),
        ("soft:object=a;object=b", "'object' appears twice"),
        ("soft:dir=/a;dir=/b", "'dir' appears twice"),
        ("soft:object=k?pin-source=/a&pin-source=/b", "'pin-source' appears twice"),
        ("soft:object=k;pin-source=/p", "query attribute"),
        ("soft:?object=k", "path attribute"),
        ("soft:object=k?pin-value=1234", "pin-value is refused"),
        ("soft:object", "without '='"),
        ("soft:=k", "without a name"),
        ("soft:object=a%2Fb", "not a valid key name"),
        ("soft:object=..", "not a valid key name"),
        ("soft:object=.hidden", "not a valid key name"),
        ("soft:object=", "not a valid key name"),
        ("soft:object=" + "a" * 65, "not a valid key name"),
        ("soft:object=caf%C3%A9", "not a valid key name"),
        ("soft:object=a b", "must be percent-encoded"),
        ("soft:object=a#b", "must be percent-encoded"),
        ("soft:object=a%2", "bad percent-encoding"),
        ("soft:object=a%zz", "bad percent-encoding"),
        ("soft:dir=%FF", "not UTF-8"),
        ("soft:dir=relative/path", "absolute"),
        ("soft:dir=", "absolute"),
        ("soft:dir=/a/../b", "normalised"),
        ("soft:dir=/a/", "normalised"),
        ("soft:dir=/a%00b", "NUL"),
        ("soft:object=k?pin-source=relative", "pin-source"),
        ("soft:object=k?pin-source=https://example.com/p", "pin-source"),
        ("soft:object=k?pin-source=file://%5B", "pin-source"),
    ],
)
def test_malformed_uris_are_refused(text: str, complaint: str) -> None:
    with pytest.raises(UriError, match=re.escape(complaint)):
        SoftwareUri.parse(text)


def test_uri_values_are_validated_when_built_directly() -> None:
    with pytest.raises(UriError):
        SoftwareUri(object="../etc/passwd")
    with pytest.raises(UriError):
        SoftwareUri(dir="relative")
    with pytest.raises(UriError, match="surrogates"):
        SoftwareUri(pin_source="/\ud800")


_segment = st.text(st.characters(exclude_characters="/\x00"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
_abs_path = st.lists(_segment, min_size=0, max_size=4).map(lambda parts: "/" + "/".join(parts))
_pin_source = st.one_of(_abs_path, _abs_path.map(lambda p: "file:" + p))


@st.composite
def software_uris(draw: st.DrawFn) -> SoftwareUri:
    directory = draw(st.none() | _abs_path)
    name = draw(st.none() | st.from_regex(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}", fullmatch=True))
    pin_source = draw(st.none() | _pin_source)
    try:
        return SoftwareUri(directory, name, pin_source)
    except UriError:
        assume(False)
        raise


@given(software_uris())
def test_uri_round_trip(uri: SoftwareUri) -> None:
    text = str(uri)
    assert text.isascii()
    assert SoftwareUri.parse(text) == uri


@given(
    st.text(
        st.sampled_from("soft:dirobject=pin-source;?&%/.-_aZ09~#é\x00 ")
        | st.characters(codec="utf-8"),
        max_size=60,
    )
)
def test_parse_either_refuses_or_round_trips(text: str) -> None:
    try:
        uri = SoftwareUri.parse("soft:" + text)
    except UriError:
        return
    assert SoftwareUri.parse(str(uri)) == uri
