"""DIDComm encrypted messages: General JSON JWE with ECDH-ES+A256KW or ECDH-1PU+A256KW.

The layout the DIDComm spec fixes ("ECDH-1PU key wrapping and common protected
headers"): one ephemeral key for all recipients in the protected ``epk``; ``apv`` the
base64url SHA-256 of the recipients' kids, sorted and joined with "."; for authcrypt
``skid`` and ``apu`` = base64url(skid); each recipient's header holds only its ``kid``.

Key agreement with a *static* private key - the recipient's on unpack, the sender's on
authcrypt pack - goes through ``exchange`` on that key's handle, one call per shared
secret, so the key may sit in SoftHSM or on a YubiKey.  Only the ephemeral key, made and
thrown away here, is a software key.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519, x25519

from agent.didcomm import jwa
from agent.didcomm._encoding import b64d, b64e, dumps, load_object
from agent.didcomm.errors import (
    ConsistencyError,
    DecryptionError,
    InvalidPublicKeyError,
    KeyResolutionError,
    MalformedEnvelopeError,
    PackError,
    UnsupportedAlgorithmError,
    UnusableKeyError,
    WrongRecipientError,
)
from agent.didcomm.keys import (
    AGREEMENT_CURVES,
    AgreementKey,
    LocalKey,
    NamedKey,
    PublicKey,
    Recipient,
    SenderResolver,
    check_x25519_peer,
    crv_of,
    did_key_ident,
    jwk_to_public,
    key_fingerprint,
    public_to_jwk,
    resolve_did_key_url,
    resolve_sender,
)
from agent.didcomm.message import ENCRYPTED_TYP, media_type_is
from janus_hsm.errors import MechanismUnsupportedError
from janus_hsm.public_keys import PublicKeyFormatError

_JWE_MEMBERS = frozenset({"protected", "recipients", "iv", "ciphertext", "tag"})


def is_jwe(obj: Mapping[str, Any]) -> bool:
    return "ciphertext" in obj or "recipients" in obj


def apv_for(kids: Sequence[str]) -> bytes:
    """SHA-256 of the recipients' kids, sorted and joined with "." (the spec's ``apv``)."""
    return hashlib.sha256(".".join(sorted(kids)).encode()).digest()


def _exchange(key: AgreementKey, peer: PublicKey, what: str) -> bytes:
    """ECDH with a static key through its handle, with backend errors made envelope errors."""
    try:
        z = key.exchange(peer)
    except PublicKeyFormatError as exc:  # the backend refused the peer point
        raise InvalidPublicKeyError(f"{what}: {exc}") from None
    except MechanismUnsupportedError as exc:
        raise UnusableKeyError(f"{what}: {exc}") from None
    jwa.check_shared_secret(z)
    return z


# --- pack -------------------------------------------------------------------------------


def encrypt(
    payload: bytes,
    recipients: Sequence[Recipient],
    *,
    enc: str,
    sender: AgreementKey | None = None,
    skid: str | None = None,
    include_skid: bool = True,
) -> str:
    """Encrypt ``payload`` to every recipient: anoncrypt, or authcrypt when ``sender``.

    ``include_skid=False`` leaves the sender's kid in ``apu`` only, which ECDH-1PU allows
    and receivers must handle (the spec says so); Janus itself always writes ``skid``.
    """
    if not recipients:
        raise PackError("at least one recipient is needed")
    if enc not in jwa.CONTENT:
        raise PackError(f"unknown content encryption {enc!r}; use one of {list(jwa.CONTENT)}")
    kids = [r.kid for r in recipients]
    if len(set(kids)) != len(kids):
        raise PackError("the same recipient kid is listed twice")
    crvs = {r.crv for r in recipients}
    if len(crvs) != 1:
        raise PackError(
            f"recipients use different curves ({', '.join(sorted(crvs))}); DIDComm shares one "
            "ephemeral key per envelope, so pack once per key type"
        )
    crv = crvs.pop()
    authcrypt = sender is not None
    alg = jwa.ECDH_1PU_A256KW if authcrypt else jwa.ECDH_ES_A256KW
    if authcrypt:
        assert sender is not None and skid is not None
        if enc != jwa.A256CBC_HS512:
            raise PackError("authcrypt (ECDH-1PU) requires A256CBC-HS512 content encryption")
        sender_crv = crv_of(sender.public_key())
        if sender_crv != crv:
            raise PackError(f"the sender key is {sender_crv} but the recipients' keys are {crv}")

    ephemeral = jwa.Ephemeral(crv)
    apv = apv_for(kids)
    header: dict[str, Any] = {
        "typ": ENCRYPTED_TYP,
        "alg": alg,
        "enc": enc,
        "epk": public_to_jwk(ephemeral.public_key),
        "apv": b64e(apv),
    }
    apu = b""
    if authcrypt:
        assert skid is not None
        apu = skid.encode()
        if include_skid:
            header["skid"] = skid
        header["apu"] = b64e(apu)
    protected = b64e(dumps(header).encode())
    cek = jwa.new_cek(enc)
    iv, ciphertext, tag = jwa.encrypt(enc, cek, payload, protected.encode("ascii"))

    entries = []
    for recipient in recipients:
        z = ephemeral.exchange(recipient.public_key)
        if authcrypt:
            assert sender is not None
            # ECDH-1PU: Z = Ze || Zs, and the content tag is bound into the KDF, which is
            # why the content is encrypted before any key is wrapped.
            z += _exchange(sender, recipient.public_key, "sender key agreement")
            kek = jwa.concat_kdf(z, alg=alg, apu=apu, apv=apv, tag=tag)
        else:
            kek = jwa.concat_kdf(z, alg=alg, apu=apu, apv=apv)
        wrapped = b64e(jwa.wrap_key(kek, cek))
        entries.append(f'{{"header":{{"kid":{dumps(recipient.kid)}}},"encrypted_key":"{wrapped}"}}')
    # Written out rather than through json: every value but the kids (JSON-escaped above)
    # is base64url, which needs no escaping, and this is on every envelope's path.
    return (
        f'{{"protected":"{protected}","recipients":[{",".join(entries)}],'
        f'"iv":"{b64e(iv)}","ciphertext":"{b64e(ciphertext)}","tag":"{b64e(tag)}"}}'
    )


# --- unpack -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Decrypted:
    payload: bytes
    alg: str
    enc: str
    recipient_kid: str
    recipient_kids: tuple[str, ...]
    skid: str | None


@dataclass(frozen=True)
class _Local:
    kid: str | None
    fingerprint: tuple[str, bytes]
    did_key_ident: str | None
    key: AgreementKey


def prepare_local_keys(keys: Sequence[LocalKey]) -> list[_Local]:
    """Index the caller's private keys by what envelopes call them (kid, did:key)."""
    out = []
    for item in keys:
        key = item.key if isinstance(item, NamedKey) else item
        if not callable(getattr(key, "exchange", None)):
            raise UnusableKeyError(f"{type(key).__name__} is not a key that can do ECDH")
        public = key.public_key()
        if isinstance(public, ed25519.Ed25519PublicKey):
            raise UnusableKeyError(
                "Ed25519 keys cannot decrypt: DIDComm encrypts to key-agreement keys "
                "(X25519, P-256, P-384). An Ed25519 did:key receives at the X25519 key "
                "derived from it, which a key kept in a token cannot provide; give an "
                "X25519, P-256 or P-384 key"
            )
        ident = did_key_ident(public)  # None e.g. for P-521: reachable only as a NamedKey
        out.append(
            _Local(
                kid=item.kid if isinstance(item, NamedKey) else None,
                fingerprint=key_fingerprint(public),
                did_key_ident=ident,
                key=key,
            )
        )
    return out


def _matches(local: _Local, kid: str) -> bool:
    if local.kid is not None:
        return local.kid == kid
    if local.did_key_ident is None or not kid.startswith("did:key:"):
        return False
    did, _, fragment = kid.partition("#")
    if fragment != local.did_key_ident:
        return False
    if did == "did:key:" + fragment:
        return True
    # did:key:<Ed25519>#<X25519>: believe the DID part only if the key really derives.
    try:
        return key_fingerprint(resolve_did_key_url(kid)) == local.fingerprint
    except (KeyResolutionError, InvalidPublicKeyError):
        return False


def _header(obj: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    extra = set(obj) - _JWE_MEMBERS
    if extra:
        raise MalformedEnvelopeError(
            f"unsupported JWE members {sorted(extra)} (DIDComm uses General JSON JWE "
            "with every shared header protected)"
        )
    missing = _JWE_MEMBERS - set(obj)
    if missing:
        raise MalformedEnvelopeError(f"JWE is missing {sorted(missing)}")
    protected_b64 = obj["protected"]
    header = load_object(b64d(protected_b64, "JWE protected header"), "JWE protected header")
    return protected_b64, header


def decrypt(
    obj: Mapping[str, Any],
    local_keys: Sequence[_Local],
    resolver: SenderResolver | None,
) -> Decrypted:
    """Decrypt one JWE layer; every check passes before any plaintext is returned."""
    protected_b64, header = _header(obj)
    if "crit" in header or "zip" in header:
        raise UnsupportedAlgorithmError("JWE 'crit' and 'zip' are not supported")
    if "typ" in header and not media_type_is(header["typ"], ENCRYPTED_TYP):
        raise MalformedEnvelopeError(f"JWE 'typ' must be {ENCRYPTED_TYP}")
    alg, enc = header.get("alg"), header.get("enc")
    if alg not in (jwa.ECDH_ES_A256KW, jwa.ECDH_1PU_A256KW):
        raise UnsupportedAlgorithmError(f"JWE alg {alg!r} is not accepted")
    if not isinstance(enc, str) or enc not in jwa.CONTENT:  # (a list is unhashable)
        raise UnsupportedAlgorithmError(f"JWE enc {enc!r} is not accepted")
    assert isinstance(alg, str) and isinstance(enc, str)
    authcrypt = alg == jwa.ECDH_1PU_A256KW
    if authcrypt and enc != jwa.A256CBC_HS512:
        raise UnsupportedAlgorithmError("ECDH-1PU requires A256CBC-HS512 (draft-madden 2.1)")

    # Cheap structural checks of the rest before any public-key arithmetic.
    iv = b64d(obj["iv"], "JWE iv")
    ciphertext = b64d(obj["ciphertext"], "JWE ciphertext")
    tag = b64d(obj["tag"], "JWE tag")
    recipients = obj["recipients"]
    if not isinstance(recipients, list) or not recipients:
        raise MalformedEnvelopeError("JWE 'recipients' must be a non-empty list")
    kids: list[str] = []
    wrapped: list[bytes] = []
    for entry in recipients:
        if not isinstance(entry, dict) or set(entry) - {"header", "encrypted_key"}:
            raise MalformedEnvelopeError("each JWE recipient is {header: {kid}, encrypted_key}")
        rheader = entry.get("header")
        if not isinstance(rheader, dict) or set(rheader) & set(header):
            raise MalformedEnvelopeError("a recipient header must not repeat protected members")
        kid = rheader.get("kid")
        if not isinstance(kid, str) or "#" not in kid or not kid.startswith("did:"):
            raise MalformedEnvelopeError("each recipient 'kid' must be a DID URL (did:…#…)")
        kids.append(kid)
        wrapped.append(b64d(entry.get("encrypted_key"), "JWE encrypted_key"))
    if len(set(kids)) != len(kids):
        raise MalformedEnvelopeError("a recipient kid is listed twice")
    apv = b64d(header.get("apv"), "JWE 'apv'")
    if apv != apv_for(kids):
        raise ConsistencyError("'apv' does not match the recipients' kids")

    apu = b""
    skid: str | None = None
    if "apu" in header:
        apu = b64d(header["apu"], "JWE 'apu'")
    if authcrypt:
        if "apu" not in header:
            raise MalformedEnvelopeError("authcrypt needs 'apu' (the sender's kid)")
        try:
            skid = apu.decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedEnvelopeError("'apu' is not a UTF-8 key id") from None
        if "skid" in header and header["skid"] != skid:
            raise ConsistencyError("'skid' and 'apu' name different sender keys")
        if not isinstance(skid, str) or "#" not in skid or not skid.startswith("did:"):
            raise MalformedEnvelopeError("the sender kid must be a DID URL (did:…#…)")

    epk = jwk_to_public(header.get("epk"), "JWE 'epk'")
    crv = crv_of(epk)
    if crv not in AGREEMENT_CURVES:
        raise UnsupportedAlgorithmError(f"'epk' is a {crv} key, not a key-agreement curve")
    sender_public: PublicKey | None = None
    if authcrypt:
        assert skid is not None
        sender_public = resolve_sender(skid, resolver)
        if crv_of(sender_public) != crv:
            raise ConsistencyError(f"the sender key {skid} is not on the epk's curve {crv}")
        if isinstance(sender_public, x25519.X25519PublicKey):
            check_x25519_peer(sender_public, f"sender key {skid}")

    candidates = [
        (kid, key, blob)
        for kid, blob in zip(kids, wrapped, strict=True)
        for key in local_keys
        if key.fingerprint[0] == crv and _matches(key, kid)
    ]
    if not candidates:
        raise WrongRecipientError(
            f"the envelope is for {', '.join(kids)}; none of the given keys is one of them"
        )
    aad = protected_b64.encode("ascii")
    failure: DecryptionError | None = None
    for kid, local, blob in candidates:
        z = _exchange(local.key, epk, f"key agreement for {kid}")
        if authcrypt:
            assert sender_public is not None
            z += _exchange(local.key, sender_public, f"sender key agreement for {kid}")
            kek = jwa.concat_kdf(z, alg=alg, apu=apu, apv=apv, tag=tag)
        else:
            kek = jwa.concat_kdf(z, alg=alg, apu=apu, apv=apv)
        try:
            cek = jwa.unwrap_key(kek, blob)
            payload = jwa.decrypt(enc, cek, iv, ciphertext, tag, aad)
        except DecryptionError as exc:
            failure = exc
            continue
        return Decrypted(
            payload=payload,
            alg=alg,
            enc=enc,
            recipient_kid=kid,
            recipient_kids=tuple(kids),
            skid=skid,
        )
    assert failure is not None
    raise failure
