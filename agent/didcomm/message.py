"""DIDComm plaintext messages (DIDComm Messaging v2, "Plaintext Message Structure").

The model is strict about the headers the spec defines - their types are checked on the
way in, so code further on can rely on them - and keeps every other top-level member
untouched in :attr:`Message.headers`, because the spec says unknown headers must be
ignored, not refused, and a forwarded or re-signed message should not lose them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from agent.didcomm._encoding import dumps, load_object
from agent.didcomm.errors import MalformedEnvelopeError, MessageError
from agent.didcomm.keys import is_did

PLAINTEXT_TYP = "application/didcomm-plain+json"
SIGNED_TYP = "application/didcomm-signed+json"
ENCRYPTED_TYP = "application/didcomm-encrypted+json"

_DEFINED = frozenset(
    {
        "id",
        "typ",
        "type",
        "from",
        "to",
        "created_time",
        "expires_time",
        "thid",
        "pthid",
        "from_prior",
        "body",
        "attachments",
    }
)
_ATTACHMENT_FIELDS = (
    "id",
    "description",
    "filename",
    "media_type",
    "format",
    "lastmod_time",
    "byte_count",
    "data",
)
_DATA_FIELDS = ("jws", "hash", "links", "base64", "json")


def _is_object(value: object) -> TypeGuard[Mapping[str, Any]]:
    # dict first: an ABC isinstance check costs more than the rest of a header check.
    return type(value) is dict or isinstance(value, Mapping)


def media_type_is(value: object, expected: str) -> bool:
    """``typ`` comparison per RFC 7515 4.1.9: the ``application/`` prefix may be omitted."""
    if not isinstance(value, str):
        return False
    value = value.lower()
    if "/" not in value:
        value = "application/" + value
    return value == expected


def _string(obj: Mapping[str, Any], name: str, where: str, *, required: bool = False) -> Any:
    value = obj.get(name)
    if value is None:
        if required or name in obj:
            raise MessageError(f"{where} '{name}' must be a string")
        return None
    if not isinstance(value, str) or (required and not value):
        raise MessageError(f"{where} '{name}' must be a{' non-empty' if required else ''} string")
    return value


def _timestamp(obj: Mapping[str, Any], name: str, where: str) -> int | None:
    if name not in obj:
        return None
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise MessageError(f"{where} '{name}' must be a non-negative integer (UTC epoch seconds)")
    return value


@dataclass(frozen=True)
class Attachment:
    """One entry of ``attachments``: ``data`` holds at least one of jws/hash/links/base64/json."""

    data: Mapping[str, Any]
    id: str | None = None
    description: str | None = None
    filename: str | None = None
    media_type: str | None = None
    format: str | None = None
    lastmod_time: int | None = None
    byte_count: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_data(self.data)

    @classmethod
    def from_dict(cls, obj: object) -> Attachment:
        where = "attachment"
        if not _is_object(obj):
            raise MessageError("each attachment must be a JSON object")
        for name in ("id", "description", "filename", "media_type", "format"):
            _string(obj, name, where)
        if "data" not in obj:
            raise MessageError("attachment 'data' is required")
        return cls(
            data=obj["data"],
            id=obj.get("id"),
            description=obj.get("description"),
            filename=obj.get("filename"),
            media_type=obj.get("media_type"),
            format=obj.get("format"),
            lastmod_time=_timestamp(obj, "lastmod_time", where),
            byte_count=_timestamp(obj, "byte_count", where),
            extra={k: v for k, v in obj.items() if k not in _ATTACHMENT_FIELDS},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name in _ATTACHMENT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                out[name] = dict(value) if name == "data" else value
        out.update(self.extra)
        return out


def _check_data(data: object) -> None:
    if not _is_object(data):
        raise MessageError("attachment 'data' must be a JSON object")
    if not any(name in data for name in _DATA_FIELDS):
        raise MessageError("attachment 'data' needs one of jws, hash, links, base64, json")
    if "hash" in data and not isinstance(data["hash"], str):
        raise MessageError("attachment data 'hash' must be a string")
    if "base64" in data and not isinstance(data["base64"], str):
        raise MessageError("attachment data 'base64' must be a string")
    links = data.get("links")
    if "links" in data and (
        not isinstance(links, list) or not all(isinstance(x, str) for x in links)
    ):
        raise MessageError("attachment data 'links' must be a list of strings")
    if "jws" in data and not isinstance(data["jws"], Mapping | str):
        raise MessageError("attachment data 'jws' must be a JWS object")


@dataclass(frozen=True)
class Message:
    """A DIDComm plaintext message.

    ``from_`` is the ``from`` header (a Python keyword).  ``body`` is always written out,
    as the spec recommends, and read as ``{}`` when a received message omits it.
    """

    id: str
    type: str
    body: Mapping[str, Any] = field(default_factory=dict)
    from_: str | None = None
    to: tuple[str, ...] | None = None
    created_time: int | None = None
    expires_time: int | None = None
    thid: str | None = None
    pthid: str | None = None
    from_prior: str | None = None
    attachments: tuple[Attachment, ...] | None = None
    headers: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise MessageError("message 'id' must be a non-empty string")
        if not isinstance(self.type, str) or not self.type:
            raise MessageError("message 'type' must be a non-empty string (a message type URI)")
        if not _is_object(self.body):
            raise MessageError("message 'body' must be a JSON object")
        if self.from_ is not None and not is_did(self.from_):
            raise MessageError("message 'from' must be a DID (a DID URL without fragment)")
        if self.to is not None:
            if isinstance(self.to, str) or not all(is_did(t) for t in self.to):
                raise MessageError("message 'to' must be a list of DIDs (without fragment)")
            object.__setattr__(self, "to", tuple(self.to))
        clash = _DEFINED.intersection(self.headers)
        if clash:
            raise MessageError(f"headers may not redefine {sorted(clash)}; use the fields")

    @classmethod
    def new(
        cls,
        type: str,
        body: Mapping[str, Any] | None = None,
        *,
        from_: str | None = None,
        to: Sequence[str] | None = None,
        expires_in: int | None = None,
        **kwargs: Any,
    ) -> Message:
        """A fresh message: random UUID id, created_time now, expires_time if asked."""
        now = int(time.time())
        return cls(
            id=str(uuid.uuid4()),
            type=type,
            body=dict(body or {}),
            from_=from_,
            to=tuple(to) if to is not None else None,
            created_time=now,
            expires_time=now + expires_in if expires_in is not None else None,
            **kwargs,
        )

    @classmethod
    def from_dict(cls, obj: object) -> Message:
        """Parse a message object; raise MessageError on any header of the wrong type."""
        if not _is_object(obj):
            raise MessageError("a DIDComm message must be a JSON object")
        where = "message"
        if "typ" in obj and not media_type_is(obj["typ"], PLAINTEXT_TYP):
            raise MessageError(f"plaintext 'typ' must be {PLAINTEXT_TYP}")
        to = obj.get("to")
        if "to" in obj and (not isinstance(to, list) or not all(isinstance(t, str) for t in to)):
            raise MessageError("message 'to' must be a list of DIDs")
        body = obj.get("body", {})
        attachments = obj.get("attachments")
        if "attachments" in obj and not isinstance(attachments, list):
            raise MessageError("message 'attachments' must be a list")
        return cls(
            id=_string(obj, "id", where, required=True),
            type=_string(obj, "type", where, required=True),
            body=body,
            from_=_string(obj, "from", where),
            to=tuple(to) if isinstance(to, list) else None,
            created_time=_timestamp(obj, "created_time", where),
            expires_time=_timestamp(obj, "expires_time", where),
            thid=_string(obj, "thid", where),
            pthid=_string(obj, "pthid", where),
            from_prior=_string(obj, "from_prior", where),
            attachments=(
                tuple(Attachment.from_dict(a) for a in attachments)
                if isinstance(attachments, list)
                else None
            ),
            headers={k: v for k, v in obj.items() if k not in _DEFINED},
        )

    @classmethod
    def from_json(cls, data: bytes | str) -> Message:
        try:
            obj = load_object(data, "message")
        except MalformedEnvelopeError as exc:
            raise MessageError(str(exc)) from None
        return cls.from_dict(obj)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "typ": PLAINTEXT_TYP, "type": self.type}
        if self.from_ is not None:
            out["from"] = self.from_
        if self.to is not None:
            out["to"] = list(self.to)
        for name in ("created_time", "expires_time", "thid", "pthid", "from_prior"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        out["body"] = dict(self.body)
        if self.attachments is not None:
            out["attachments"] = [a.to_dict() for a in self.attachments]
        out.update(self.headers)
        return out

    def to_json(self) -> str:
        """Compact JSON (UTF-8 kept), the form packed into envelopes."""
        try:
            return dumps(self.to_dict())
        except (TypeError, ValueError) as exc:
            raise MessageError(f"message is not serialisable as JSON: {exc}") from None
