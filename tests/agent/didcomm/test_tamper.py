"""Bad envelopes: every alteration is a typed EnvelopeError, and nothing leaks out.

Altered members, truncation at every length class, off-curve and small-order ``epk``,
unknown algorithms, headers that contradict each other, senders that do not add up,
oversized input, layers in an order DIDComm forbids.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from agent.didcomm import (
    A256CBC_HS512,
    A256GCM,
    XC20P,
    ConsistencyError,
    DecryptionError,
    EnvelopeError,
    EnvelopeTooLargeError,
    InvalidPublicKeyError,
    MalformedEnvelopeError,
    Message,
    MessageFormatError,
    NamedKey,
    SignatureError,
    UnknownSenderError,
    UnsupportedAlgorithmError,
    jwe,
    pack_anoncrypt,
    pack_authcrypt,
    pack_signed,
    unpack,
)
from agent.didcomm._encoding import b64d, b64e
from agent.didcomm.keys import agreement_kid, resolve_recipient
from janus_hsm.provider import KeyHandle

TYPE = "https://example.com/protocols/test/1.0/ping"
Mutation = Callable[[dict[str, Any]], None]


def msg(sender: KeyHandle | None = None, **kwargs: Any) -> Message:
    return Message.new(TYPE, {"n": 1}, from_=sender.did if sender is not None else None, **kwargs)


@pytest.fixture(scope="module")
def envelopes(soft_keys: dict[str, KeyHandle]) -> dict[str, str]:
    x_a, x_b = soft_keys["x25519-a"], soft_keys["x25519-b"]
    p_a, p_b = soft_keys["p256-a"], soft_keys["p256-b"]
    return {
        "anon-x25519-cbc": pack_anoncrypt(msg(), [x_b.did], enc=A256CBC_HS512),
        "anon-x25519-gcm": pack_anoncrypt(msg(), [x_b.did], enc=A256GCM),
        "anon-x25519-xc20p": pack_anoncrypt(msg(), [x_b.did], enc=XC20P),
        "anon-p256-gcm": pack_anoncrypt(msg(), [p_b.did], enc=A256GCM),
        "auth-x25519": pack_authcrypt(msg(x_a), [x_b.did], x_a),
        "auth-p256": pack_authcrypt(msg(p_a), [p_b.did], p_a),
    }


def keys_for(name: str, soft_keys: dict[str, KeyHandle]) -> list[KeyHandle]:
    return [soft_keys["p256-b" if "p256" in name else "x25519-b"]]


def protected(obj: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(b64d(obj["protected"], "p"))
    return result


def set_protected(obj: dict[str, Any], header: dict[str, Any]) -> None:
    obj["protected"] = b64e(json.dumps(header).encode())


def flip(member: str, index: int = 0) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        holder = obj["recipients"][0] if member == "encrypted_key" else obj
        raw = bytearray(b64d(holder[member], member))
        raw[index % len(raw)] ^= 0x40
        holder[member] = b64e(bytes(raw))

    return mutate


def edit_header(**changes: Any) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        header = protected(obj)
        for key, value in changes.items():
            if value is None:
                header.pop(key, None)
            else:
                header[key] = value
        set_protected(obj, header)

    return mutate


def reorder_header(obj: dict[str, Any]) -> None:
    header = protected(obj)
    set_protected(obj, dict(reversed(list(header.items()))))


def set_member(path: str, value: Any) -> Mutation:
    def mutate(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        target: Any = obj
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value

    return mutate


_DELETE = object()

# (name, mutation, expected error)
MUTATIONS: list[tuple[str, Mutation, type[EnvelopeError]]] = [
    ("ciphertext first byte", flip("ciphertext", 0), DecryptionError),
    ("ciphertext last byte", flip("ciphertext", -1), DecryptionError),
    ("tag", flip("tag", 3), DecryptionError),
    ("iv", flip("iv", 1), DecryptionError),
    ("encrypted_key", flip("encrypted_key", 5), DecryptionError),
    ("protected header re-ordered", reorder_header, DecryptionError),
    ("protected header extra member", edit_header(foo="bar"), DecryptionError),
    ("enc changed", edit_header(enc="A256GCM"), EnvelopeError),
    ("alg unknown", edit_header(alg="RSA-OAEP-256"), UnsupportedAlgorithmError),
    ("alg direct ECDH-ES", edit_header(alg="ECDH-ES"), UnsupportedAlgorithmError),
    ("enc unknown", edit_header(enc="A128CBC-HS256"), UnsupportedAlgorithmError),
    ("enc not a string", edit_header(enc=[]), UnsupportedAlgorithmError),
    ("enc an object", edit_header(enc={"x": 1}), UnsupportedAlgorithmError),
    ("alg not a string", edit_header(alg=["ECDH-ES+A256KW"]), UnsupportedAlgorithmError),
    ("crit", edit_header(crit=["exp"]), UnsupportedAlgorithmError),
    ("zip", edit_header(zip="DEF"), UnsupportedAlgorithmError),
    ("typ", edit_header(typ="application/json"), MalformedEnvelopeError),
    ("apv changed", edit_header(apv=b64e(bytes(32))), ConsistencyError),
    ("apv missing", edit_header(apv=None), MalformedEnvelopeError),
    ("epk missing", edit_header(epk=None), InvalidPublicKeyError),
    (
        "epk private",
        edit_header(epk={"kty": "OKP", "crv": "X25519", "x": "", "d": ""}),
        InvalidPublicKeyError,
    ),
    (
        "recipient kid changed",
        set_member("recipients.0.header.kid", "did:key:zX#zX"),
        ConsistencyError,
    ),
    (
        "recipient kid not a DID URL",
        set_member("recipients.0.header.kid", "key-1"),
        MalformedEnvelopeError,
    ),
    (
        "recipient header repeats alg",
        set_member("recipients.0.header.alg", "ECDH-ES+A256KW"),
        MalformedEnvelopeError,
    ),
    ("recipients empty", set_member("recipients", []), MalformedEnvelopeError),
    ("recipients not a list", set_member("recipients", {}), MalformedEnvelopeError),
    ("no tag", set_member("tag", _DELETE), MalformedEnvelopeError),
    ("no iv", set_member("iv", _DELETE), MalformedEnvelopeError),
    ("extra aad", set_member("aad", "eHl6"), MalformedEnvelopeError),
    ("extra unprotected", set_member("unprotected", {}), MalformedEnvelopeError),
    ("padded base64", set_member("tag", "AAAAAAAAAAAAAAAAAAAAAA=="), MalformedEnvelopeError),
    ("non-alphabet base64", set_member("iv", "a+b/"), MalformedEnvelopeError),
    ("tag a number", set_member("tag", 5), MalformedEnvelopeError),
    ("empty ciphertext", set_member("ciphertext", ""), DecryptionError),
    ("truncated tag", lambda o: o.__setitem__("tag", o["tag"][:-4]), EnvelopeError),
]


@pytest.mark.parametrize(
    "name",
    [
        "anon-x25519-cbc",
        "anon-x25519-gcm",
        "anon-x25519-xc20p",
        "anon-p256-gcm",
        "auth-x25519",
        "auth-p256",
    ],
)
@pytest.mark.parametrize(("what", "mutate", "error"), MUTATIONS, ids=[m[0] for m in MUTATIONS])
def test_tampered_envelopes_are_refused(
    envelopes: dict[str, str],
    soft_keys: dict[str, KeyHandle],
    name: str,
    what: str,
    mutate: Mutation,
    error: type[EnvelopeError],
) -> None:
    obj = json.loads(envelopes[name])
    mutate(obj)
    with pytest.raises(error):
        unpack(json.dumps(obj), keys_for(name, soft_keys))


def test_authcrypt_header_tampering(
    envelopes: dict[str, str], soft_keys: dict[str, KeyHandle]
) -> None:
    keys = keys_for("auth-x25519", soft_keys)
    other = agreement_kid(soft_keys["x25519-c"].did)
    cases: list[tuple[Mutation, type[EnvelopeError]]] = [
        (edit_header(skid=other), ConsistencyError),  # skid ≠ apu
        (edit_header(apu=b64e(other.encode()), skid=other), DecryptionError),  # other sender
        (edit_header(apu=None), MalformedEnvelopeError),
        (edit_header(apu=b64e(b"did:example:nobody#k"), skid=None), UnknownSenderError),
        (edit_header(apu=b64e(b"not a kid"), skid=None), MalformedEnvelopeError),
        (edit_header(enc="A256GCM"), UnsupportedAlgorithmError),  # 1PU needs CBC-HS
        (edit_header(alg="ECDH-ES+A256KW"), DecryptionError),  # downgrade to anoncrypt
    ]
    for mutate, error in cases:
        obj = json.loads(envelopes["auth-x25519"])
        mutate(obj)
        with pytest.raises(error):
            unpack(obj, keys)


def test_authcrypt_without_skid_resolves_the_sender_from_apu(
    soft_keys: dict[str, KeyHandle],
) -> None:
    """The spec: implementations MUST resolve the sender from 'apu' if 'skid' is absent."""
    x_a, x_b = soft_keys["x25519-a"], soft_keys["x25519-b"]
    skid = agreement_kid(x_a.did)
    envelope = jwe.encrypt(
        msg(x_a).to_json().encode(),
        [resolve_recipient(x_b.did)],
        enc=A256CBC_HS512,
        sender=x_a,
        skid=skid,
        include_skid=False,
    )
    assert "skid" not in protected(json.loads(envelope))
    unpacked = unpack(envelope, [x_b])
    assert unpacked.metadata.sender_kid == skid


def test_truncation_at_every_length(
    envelopes: dict[str, str], soft_keys: dict[str, KeyHandle]
) -> None:
    for name in ("anon-x25519-gcm", "auth-p256"):
        text = envelopes[name]
        keys = keys_for(name, soft_keys)
        for cut in range(0, len(text), 7):
            with pytest.raises(EnvelopeError):
                unpack(text[:cut], keys)


@pytest.mark.parametrize(
    "y_change",
    ["plus-one", "zero", "p"],
)
def test_off_curve_epk_is_refused(
    soft_keys: dict[str, KeyHandle], envelopes: dict[str, str], y_change: str
) -> None:
    obj = json.loads(envelopes["anon-p256-gcm"])
    header = protected(obj)
    y = int.from_bytes(b64d(header["epk"]["y"], "y"), "big")
    p = 2**256 - 2**224 + 2**192 + 2**96 - 1
    new_y = {"plus-one": (y + 1) % p, "zero": 0, "p": p}[y_change]
    header["epk"]["y"] = b64e(new_y.to_bytes(32, "big"))
    set_protected(obj, header)
    counting = _CountingKey(soft_keys["p256-b"])
    with pytest.raises(InvalidPublicKeyError):
        unpack(obj, [counting])
    assert counting.exchanges == 0  # refused before the key was asked for anything


@pytest.mark.parametrize(
    "u",
    [
        0,
        1,
        325606250916557431795983626356110631294008115727848805560023387167927233504,
        39382357235489614581723060781553021112529911719440698176882885853963445705823,
        2**255 - 19 - 1,
        2**255 - 19,
        2**255 - 19 + 1,
        # High bit set: X25519 ignores it, so this is u = 0 again.
        2**255,
    ],
)
def test_small_order_x25519_epk_is_refused(
    soft_keys: dict[str, KeyHandle], envelopes: dict[str, str], u: int
) -> None:
    obj = json.loads(envelopes["anon-x25519-gcm"])
    header = protected(obj)
    header["epk"]["x"] = b64e(u.to_bytes(32, "little"))
    set_protected(obj, header)
    counting = _CountingKey(soft_keys["x25519-b"])
    with pytest.raises(InvalidPublicKeyError):
        unpack(obj, [counting])
    assert counting.exchanges == 0


def test_small_order_epk_never_reaches_the_token(
    hsm_keys: dict[str, KeyHandle],
) -> None:
    recipient = hsm_keys["x25519"]
    obj = json.loads(pack_anoncrypt(msg(), [recipient.did]))
    header = protected(obj)
    header["epk"]["x"] = b64e(bytes(32))
    set_protected(obj, header)
    with pytest.raises(InvalidPublicKeyError):
        unpack(obj, [recipient])


def test_epk_on_another_curve_than_the_recipient(
    soft_keys: dict[str, KeyHandle], envelopes: dict[str, str]
) -> None:
    obj = json.loads(envelopes["anon-p256-gcm"])
    header = protected(obj)
    header["epk"] = {"kty": "OKP", "crv": "X25519", "x": b64e(bytes(range(9, 41)))}
    set_protected(obj, header)
    from agent.didcomm import WrongRecipientError

    with pytest.raises(WrongRecipientError):
        unpack(obj, keys_for("anon-p256-gcm", soft_keys))


def test_oversized_envelopes(soft_keys: dict[str, KeyHandle]) -> None:
    recipient = soft_keys["x25519-a"]
    big = Message.new(TYPE, {"blob": "a" * (1024 * 1024)})
    envelope = pack_anoncrypt(big, [recipient.did])
    with pytest.raises(EnvelopeTooLargeError):
        unpack(envelope, [recipient])
    with pytest.raises(EnvelopeTooLargeError):
        unpack(json.loads(envelope), [recipient])
    assert unpack(envelope, [recipient], max_size=2 * 1024 * 1024).message == big
    small = pack_anoncrypt(msg(), [recipient.did])
    with pytest.raises(EnvelopeTooLargeError):
        unpack(small, [recipient], max_size=100)


@pytest.mark.parametrize(
    "text",
    ["", "null", "[]", '"jwe"', "{", '{"protected": "a", "protected": "b"}', "{]", "\ufeff{}"],
)
def test_not_an_envelope(text: str) -> None:
    with pytest.raises(EnvelopeError):
        unpack(text, [])


def test_plaintext_that_is_not_a_message() -> None:
    with pytest.raises(MessageFormatError):
        unpack('{"hello": "world"}')


def test_decrypted_payload_must_be_a_message(soft_keys: dict[str, KeyHandle]) -> None:
    recipient = soft_keys["x25519-a"]
    envelope = jwe.encrypt(b"not json", [resolve_recipient(recipient.did)], enc=A256GCM)
    with pytest.raises(MalformedEnvelopeError):
        unpack(envelope, [recipient])
    envelope = jwe.encrypt(b'{"id": 5}', [resolve_recipient(recipient.did)], enc=A256GCM)
    with pytest.raises(MessageFormatError):
        unpack(envelope, [recipient])


# --- senders and layers that do not add up ----------------------------------------------


def test_authcrypt_from_must_match_skid(soft_keys: dict[str, KeyHandle]) -> None:
    x_a, x_b, x_c = soft_keys["x25519-a"], soft_keys["x25519-b"], soft_keys["x25519-c"]
    recipient = resolve_recipient(x_b.did)
    skid = agreement_kid(x_a.did)
    for sent in (msg(x_c), msg()):  # someone else's DID, or none at all
        envelope = jwe.encrypt(
            sent.to_json().encode(), [recipient], enc=A256CBC_HS512, sender=x_a, skid=skid
        )
        with pytest.raises(ConsistencyError):
            unpack(envelope, [x_b])


def test_to_must_list_the_recipient(soft_keys: dict[str, KeyHandle]) -> None:
    x_b = soft_keys["x25519-b"]
    sent = msg(to=["did:example:someone-else"])
    envelope = jwe.encrypt(sent.to_json().encode(), [resolve_recipient(x_b.did)], enc=A256GCM)
    with pytest.raises(ConsistencyError, match="to"):
        unpack(envelope, [x_b])


def test_signed_tampering(soft_keys: dict[str, KeyHandle]) -> None:
    signer, other = soft_keys["ed25519"], soft_keys["p256-a"]
    good: dict[str, Any] = json.loads(pack_signed(msg(signer), signer))
    entry = good["signatures"][0]

    def variant(**changes: Any) -> dict[str, Any]:
        obj = copy.deepcopy(good)
        target = obj["signatures"][0]
        for key, value in changes.items():
            if key == "payload":
                obj["payload"] = value
            elif value is _DELETE:
                del target[key]
            else:
                target[key] = value
        return obj

    def with_protected(header: dict[str, Any]) -> str:
        return b64e(json.dumps(header).encode())

    sig = bytearray(b64d(entry["signature"], "s"))
    sig[0] ^= 1
    cases: list[tuple[dict[str, Any], type[EnvelopeError]]] = [
        (variant(signature=b64e(bytes(sig))), SignatureError),
        (variant(signature=entry["signature"][:-2]), EnvelopeError),
        (variant(payload=b64e(msg(signer).to_json().encode())), SignatureError),
        (variant(protected=with_protected({"alg": "none"})), UnsupportedAlgorithmError),
        (variant(protected=with_protected({"alg": "HS256"})), UnsupportedAlgorithmError),
        (variant(protected=with_protected({"alg": {}})), UnsupportedAlgorithmError),
        (variant(protected=with_protected({"alg": ["EdDSA"]})), UnsupportedAlgorithmError),
        (variant(protected=with_protected({"alg": "ES256"})), ConsistencyError),
        (
            variant(protected=with_protected({"alg": "EdDSA", "crit": ["b64"], "b64": False})),
            UnsupportedAlgorithmError,
        ),
        (variant(protected=with_protected({"alg": "EdDSA", "typ": "JWT"})), MalformedEnvelopeError),
        (variant(header={"kid": f"{other.did}#{other.did[8:]}"}), ConsistencyError),
        (variant(header={}), MalformedEnvelopeError),
        (variant(protected=_DELETE), MalformedEnvelopeError),
        (variant(extra=1), MalformedEnvelopeError),
    ]
    for obj, error in cases:
        with pytest.raises(error):
            unpack(obj)
    two = copy.deepcopy(good)
    two["signatures"].append(copy.deepcopy(entry))
    with pytest.raises(MalformedEnvelopeError):
        unpack(two)


def test_signed_from_must_be_the_signer(soft_keys: dict[str, KeyHandle]) -> None:
    signer = soft_keys["ed25519"]
    kid = f"{signer.did}#{signer.did[8:]}"
    forged = msg(soft_keys["p256-a"])  # claims another sender
    payload = b64e(forged.to_json().encode())
    protected_b64 = b64e(b'{"typ":"application/didcomm-signed+json","alg":"EdDSA"}')
    signature = b64e(signer.sign(f"{protected_b64}.{payload}".encode()))
    obj = {
        "payload": payload,
        "signatures": [
            {"protected": protected_b64, "signature": signature, "header": {"kid": kid}}
        ],
    }
    with pytest.raises(ConsistencyError):
        unpack(obj)


def test_layers_in_a_forbidden_order(soft_keys: dict[str, KeyHandle]) -> None:
    x_a, x_b = soft_keys["x25519-a"], soft_keys["x25519-b"]
    inner = pack_anoncrypt(msg(), [x_b.did])
    # anoncrypt inside anoncrypt
    outer = jwe.encrypt(inner.encode(), [resolve_recipient(x_b.did)], enc=A256GCM)
    with pytest.raises(MalformedEnvelopeError, match="order"):
        unpack(outer, [x_b])
    # a JWE inside a signature
    signer = soft_keys["ed25519"]
    kid = f"{signer.did}#{signer.did[8:]}"
    payload = b64e(inner.encode())
    protected_b64 = b64e(b'{"typ":"application/didcomm-signed+json","alg":"EdDSA"}')
    signature = b64e(signer.sign(f"{protected_b64}.{payload}".encode()))
    jws_obj = {
        "payload": payload,
        "protected": protected_b64,
        "signature": signature,
        "header": {"kid": kid},
    }
    with pytest.raises(MalformedEnvelopeError, match="order"):
        unpack(jws_obj, [x_b])
    # authcrypt inside authcrypt
    auth = pack_authcrypt(msg(x_a), [x_b.did], x_a)
    double = jwe.encrypt(
        auth.encode(),
        [resolve_recipient(x_b.did)],
        enc=A256CBC_HS512,
        sender=x_a,
        skid=agreement_kid(x_a.did),
    )
    with pytest.raises(MalformedEnvelopeError, match="order"):
        unpack(double, [x_b])


def test_sender_key_on_another_curve(soft_keys: dict[str, KeyHandle]) -> None:
    x_a, x_b, p_a = soft_keys["x25519-a"], soft_keys["x25519-b"], soft_keys["p256-a"]
    envelope = pack_authcrypt(msg(x_a), [x_b.did], x_a)
    obj = json.loads(envelope)
    skid = agreement_kid(p_a.did)
    edit_header(skid=skid, apu=b64e(skid.encode()))(obj)
    with pytest.raises(ConsistencyError):
        unpack(obj, [x_b])


def test_named_key_kid_must_be_a_did_url(soft_keys: dict[str, KeyHandle]) -> None:
    from agent.didcomm import KeyResolutionError

    with pytest.raises(KeyResolutionError):
        NamedKey("key-1", soft_keys["x25519-a"])


class _CountingKey:
    def __init__(self, handle: KeyHandle) -> None:
        self.handle, self.exchanges = handle, 0

    def public_key(self) -> Any:
        return self.handle.public_key()

    def exchange(self, peer: Any) -> bytes:
        self.exchanges += 1
        return self.handle.exchange(peer)
