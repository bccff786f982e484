"""Invitations: what one owner hands another (file, ``janus:`` URI, QR code) to start.

An invitation carries the inviter's prekey bundle (keys bound by its root), the address
the first message goes to, an id the first message names, and an expiry; the whole is
a compact JWS by the same root, so the address cannot be swapped for an attacker's.
The three forms hold the same JWS:

- file: ``{"type": "https://janus.dev/rel/1.0/invitation", "invitation": "<JWS>"}``
- URI:  ``janus:invitation?v=1&jws=<JWS>`` (a JWS is URL-safe as it is)
- QR:   the URI; when it is larger than one QR symbol holds, a Structured Append
  sequence of symbols (ISO/IEC 18004), which readers join back into the URI.

Everything read here comes from outside: strict parsing, one typed error per defect,
and an expired invitation says what to do.
"""

from __future__ import annotations

import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from agent.relationships.delivery import Address
from agent.relationships.errors import RelationshipError
from agent.relationships.prekeys import PrekeyBundle
from janus_hsm.provider import KeyHandle
from janus_hsm.strictjson import StrictJSONError, loads_object
from policies.errors import PolicyError
from policies.jws import parse_compact, public_key_for, sign_compact, verify_signature

INVITATION_TYPE: Final = "https://janus.dev/rel/1.0/invitation"
INVITATION_TYP: Final = "janus-rel-invitation+jws"
URI_PREFIX: Final = "janus:invitation?"
#: An invitation is a few kilobytes (the ML-KEM prekey is 1,184 bytes); anything much
#: larger is not one.
MAX_INVITATION: Final = 32 * 1024
DEFAULT_TTL: Final = 7 * 86400
#: Symbol size of a QR sequence: version 25 (117x117 modules) stays readable for phone
#: cameras from a screen; an invitation (its ML-KEM key alone is 1,184 bytes) takes a few.
QR_VERSION: Final = 25
_ID = re.compile(r"[A-Za-z0-9_-]{22}")
_PAYLOAD_MEMBERS = frozenset({"type", "id", "iss", "bundle", "address", "expires", "iat"})


class BadInvitationError(RelationshipError):
    """Not an invitation: malformed, badly signed, or its parts disagree."""

    code = "bad_invitation"


class InvitationExpiredError(RelationshipError):
    """The invitation's time is up; its keys and address may already be gone."""

    code = "invitation_expired"
    status = 410


@dataclass(frozen=True)
class Invitation:
    id: str
    bundle: PrekeyBundle
    address: Address
    expires: int
    issued: int
    jws: str

    @property
    def inviter(self) -> str:
        return self.bundle.root_did

    # --- making -----------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        root: KeyHandle,
        *,
        invitation_id: str,
        bundle: PrekeyBundle,
        address: Address,
        expires: int,
        now: int | None = None,
    ) -> Invitation:
        issued = int(time.time()) if now is None else now
        if bundle.root_did != root.did:
            raise BadInvitationError("the prekey bundle is not this root's")
        payload = {
            "type": INVITATION_TYPE,
            "id": invitation_id,
            "iss": root.did,
            "bundle": bundle.to_dict(),
            "address": address.to_dict(),
            "expires": expires,
            "iat": issued,
        }
        jws = sign_compact(root, {"typ": INVITATION_TYP}, payload)
        return cls(invitation_id, bundle, address, expires, issued, jws)

    # --- the three forms ----------------------------------------------------------------

    def to_file(self) -> bytes:
        import json

        return (
            json.dumps({"type": INVITATION_TYPE, "invitation": self.jws}, indent=1) + "\n"
        ).encode()

    def to_uri(self) -> str:
        return f"{URI_PREFIX}v=1&jws={self.jws}"

    def qr_terminal(self) -> str:
        """The URI as QR code(s) drawn with block characters, for a terminal."""
        out = io.StringIO()
        for n, symbol in enumerate(_symbols(self.to_uri()), start=1):
            if n > 1:
                out.write(f"\n(part {n})\n")
            symbol.terminal(out=out, compact=True)
        return out.getvalue()

    def qr_png(self, path: Path) -> list[Path]:
        """The URI as PNG file(s): ``path`` itself, or ``stem-NN.png`` for a sequence."""
        symbols = _symbols(self.to_uri())
        if len(symbols) == 1:
            symbols[0].save(str(path), kind="png", scale=4)
            return [path]
        written = []
        for n, symbol in enumerate(symbols, start=1):
            target = path.with_name(f"{path.stem}-{n:02d}{path.suffix or '.png'}")
            symbol.save(str(target), kind="png", scale=4)
            written.append(target)
        return written

    # --- reading ------------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | bytes, *, now: int | None = None) -> Invitation:
        """An invitation from any of its forms (file content or URI); typed errors."""
        if isinstance(text, bytes):
            if len(text) > MAX_INVITATION:
                raise BadInvitationError(f"an invitation is at most {MAX_INVITATION} bytes")
            try:
                text = text.decode("utf-8")
            except UnicodeDecodeError:
                raise BadInvitationError("an invitation is UTF-8 text") from None
        if len(text) > MAX_INVITATION:
            raise BadInvitationError(f"an invitation is at most {MAX_INVITATION} bytes")
        stripped = text.strip()
        if stripped.startswith("janus:"):
            jws = _from_uri(stripped)
        elif stripped.startswith("{"):
            jws = _from_file(stripped)
        else:
            raise BadInvitationError(
                "not an invitation: expected a file from `janus rel invite` or a janus: URI"
            )
        return cls.from_jws(jws, now=now)

    @classmethod
    def from_jws(cls, jws: str, *, now: int | None = None) -> Invitation:
        current = int(time.time()) if now is None else now
        try:
            parsed = parse_compact(jws, typ=INVITATION_TYP, what="the invitation")
            payload = parsed.payload
            verify_signature(
                parsed, public_key_for(payload.get("iss"), "the invitation's issuer"),
                what="the invitation",
            )  # fmt: skip
        except PolicyError as exc:
            raise BadInvitationError(f"the invitation does not verify: {exc}") from None
        if set(payload) != _PAYLOAD_MEMBERS or payload["type"] != INVITATION_TYPE:
            raise BadInvitationError("the invitation has missing or unknown members")
        invitation_id, expires, issued = payload["id"], payload["expires"], payload["iat"]
        if not isinstance(invitation_id, str) or not _ID.fullmatch(invitation_id):
            raise BadInvitationError("the invitation's id is malformed")
        for value, name in ((expires, "expires"), (issued, "iat")):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise BadInvitationError(f"the invitation's {name} must be a time (integer)")
        if expires <= current:
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(expires))
            raise InvitationExpiredError(
                f"this invitation expired on {when}: ask its sender for a new one "
                "(they run `janus rel invite`)"
            )
        try:
            bundle = PrekeyBundle.from_dict(payload["bundle"], now=current)
        except RelationshipError as exc:
            raise BadInvitationError(f"the invitation's keys: {exc}") from None
        if bundle.root_did != payload["iss"]:
            raise BadInvitationError("the invitation's keys belong to another root than its signer")
        try:
            address = Address.from_dict(payload["address"])
        except RelationshipError as exc:
            raise BadInvitationError(f"the invitation's address: {exc}") from None
        return cls(invitation_id, bundle, address, expires, issued, jws)


def _from_uri(text: str) -> str:
    if not text.startswith(URI_PREFIX):
        raise BadInvitationError(f"a janus: invitation URI starts with {URI_PREFIX!r}")
    params: dict[str, str] = {}
    for part in text[len(URI_PREFIX) :].split("&"):
        name, sep, value = part.partition("=")
        if not sep or name in params:
            raise BadInvitationError("the invitation URI's parameters are malformed")
        params[name] = value
    if set(params) != {"v", "jws"} or params["v"] != "1":
        raise BadInvitationError("the invitation URI must carry exactly v=1 and jws=")
    return params["jws"]


def _from_file(text: str) -> str:
    try:
        obj: dict[str, Any] = loads_object(text, "the invitation file")
    except StrictJSONError as exc:
        raise BadInvitationError(str(exc)) from None
    if set(obj) != {"type", "invitation"} or obj["type"] != INVITATION_TYPE:
        raise BadInvitationError(
            f"an invitation file is {{'type': {INVITATION_TYPE!r}, 'invitation': JWS}}"
        )
    if not isinstance(obj["invitation"], str):
        raise BadInvitationError("the invitation file's 'invitation' must be a JWS string")
    return obj["invitation"]


def _symbols(uri: str) -> list[Any]:
    import segno

    try:
        return [segno.make_qr(uri, error="l", boost_error=False)]
    except segno.DataOverflowError:
        # Larger than one symbol: split over up to 16 (Structured Append).
        return list(segno.make_sequence(uri, error="l", boost_error=False, version=QR_VERSION))
