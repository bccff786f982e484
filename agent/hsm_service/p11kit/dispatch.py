"""One client connection's PKCS#11 state and the calls it answers.

A connection is one PKCS#11 application: it sees one slot holding one token named after
the service, whose objects are the keys the engine lets this client use. Sessions, find
and sign operations live here, per connection; keys, policy, limits and the audit log live
in the engine, and every signature is made by ``engine.perform`` as this client, so the
per-key policy, use counts, rates, quorum and forced audit apply to every call.

Calls the front does not implement answer CKR_FUNCTION_NOT_SUPPORTED without reading
their arguments; calls it does implement read every argument and refuse trailing bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.hsm_service.engine import HsmEngine, OperationRequest
from agent.hsm_service.errors import (
    AuditUnavailable,
    HsmServiceError,
    InvalidRequest,
    Refused,
    TokenUnavailable,
)
from agent.hsm_service.p11kit import constants as ck
from agent.hsm_service.p11kit.codec import HANDSHAKE, Attribute, AttributeValue, Reader, Writer
from agent.hsm_service.p11kit.objects import (
    JANUS_DEFAULT_MECHANISM,
    KEY_BITS,
    MULTIPART_MECHANISMS,
    SENSITIVE_ATTRIBUTES,
    SIGN_MECHANISMS,
    KeyObjects,
    key_objects,
    signature_length,
)

log = logging.getLogger(__name__)

SLOT_ID = 1
# The largest message a client may ask to be signed in one piece or in parts.
MAX_SIGN_INPUT = 512 * 1024

# How an engine refusal reads to a PKCS#11 caller (documented in docs/hsm-service.md).
REFUSAL_CKR = {
    "unknown_key": ck.CKR_KEY_HANDLE_INVALID,
    "client_not_allowed": ck.CKR_KEY_HANDLE_INVALID,
    "operation_not_allowed": ck.CKR_KEY_FUNCTION_NOT_PERMITTED,
    "key_state": ck.CKR_KEY_FUNCTION_NOT_PERMITTED,
    "max_uses": ck.CKR_FUNCTION_REJECTED,
    "rate_limited": ck.CKR_FUNCTION_REJECTED,
    "quorum_required": ck.CKR_FUNCTION_REJECTED,
    "quorum_invalid": ck.CKR_FUNCTION_REJECTED,
    "approval_reused": ck.CKR_FUNCTION_REJECTED,
}


def ckr_for(error: Exception) -> int:
    """The CKR_ code for an error raised by the engine."""
    if isinstance(error, Refused):
        return REFUSAL_CKR.get(error.reason, ck.CKR_FUNCTION_REJECTED)
    if isinstance(error, AuditUnavailable | TokenUnavailable):
        return ck.CKR_DEVICE_ERROR
    if isinstance(error, InvalidRequest):
        return ck.CKR_MECHANISM_INVALID
    return ck.CKR_GENERAL_ERROR


@dataclass
class _SignOperation:
    key: KeyObjects
    mechanism: int
    parts: bytearray = field(default_factory=bytearray)
    updated: bool = False


@dataclass
class _Session:
    rw: bool
    found: list[int] | None = None
    sign: _SignOperation | None = None


class _Answer(Exception):
    """Ends a call early with a CKR_ code (the response is then the error message)."""

    def __init__(self, rv: int) -> None:
        super().__init__(rv)
        self.rv = rv


class Connection:
    """The state of one client connection; :meth:`handle` answers one message."""

    def __init__(
        self,
        engine: HsmEngine,
        client: str | None,
        *,
        service_name: str = "janus-hsm",
    ) -> None:
        self._engine = engine
        self._client = client
        self._service_name = service_name
        self._initialized = False
        self._sessions: dict[int, _Session] = {}
        self._next_session = 1
        self._keys: dict[str, KeyObjects] = {}
        self._handles: dict[tuple[str, bool], int] = {}
        self._objects: dict[int, tuple[str, bool]] = {}

    # ------------------------------------------------------------------ dispatch

    def handle(self, message: bytes) -> bytes:
        """Answer one request message (MalformedMessage: drop the connection)."""
        reader = Reader(message)
        name = reader.name
        method = getattr(self, f"_{name}", None)
        if method is None:
            return Writer.error(ck.CKR_FUNCTION_NOT_SUPPORTED)
        if name != "C_Initialize" and not self._initialized:
            return Writer.error(ck.CKR_CRYPTOKI_NOT_INITIALIZED)
        writer = Writer(reader.call_id)
        try:
            method(reader, writer)
        except _Answer as answer:
            return Writer.error(answer.rv)
        return writer.getvalue()

    def close(self) -> None:
        self._sessions.clear()

    # ------------------------------------------------------------------ helpers

    def _session(self, handle: int) -> _Session:
        session = self._sessions.get(handle)
        if session is None:
            raise _Answer(ck.CKR_SESSION_HANDLE_INVALID)
        return session

    def _slot(self, slot: int) -> None:
        if slot != SLOT_ID or self._client is None:
            raise _Answer(ck.CKR_SLOT_ID_INVALID)

    def _refresh(self) -> None:
        """Re-read the keys this client may use (the policy may have changed)."""
        if self._client is None:
            self._keys = {}
            return
        try:
            views = self._engine.keys(self._client)
        except HsmServiceError as error:
            raise _Answer(ckr_for(error)) from None
        keys = {}
        for view in views:
            if view.algorithm is None or not view.public_key_der:
                continue  # not on the token (yet, or any more): nothing to show
            keys[view.label] = key_objects(
                view.label, view.algorithm, view.public_key_der, view.operations
            )
            for private in (True, False):
                if (view.label, private) not in self._handles:
                    handle = len(self._objects) + 1
                    self._handles[(view.label, private)] = handle
                    self._objects[handle] = (view.label, private)
        self._keys = keys

    def _object(self, handle: int) -> tuple[KeyObjects, bool]:
        if not self._keys:
            self._refresh()
        entry = self._objects.get(handle)
        if entry is None or entry[0] not in self._keys:
            raise _Answer(ck.CKR_OBJECT_HANDLE_INVALID)
        label, private = entry
        return self._keys[label], private

    def _mechanisms(self) -> list[int]:
        if not self._keys:
            self._refresh()
        found = {
            mechanism
            for key in self._keys.values()
            if key.private.get(ck.CKA_SIGN)
            for mechanism in SIGN_MECHANISMS.get(key.algorithm, ())
        }
        return sorted(found)

    # ------------------------------------------------------------------ general

    def _C_Initialize(self, reader: Reader, writer: Writer) -> None:
        handshake = reader.bytes_argument()
        reader.byte()  # whether pReserved was given
        reader.bytes_argument()  # pReserved (p11-kit's own options; nothing for us)
        reader.end()
        if handshake != HANDSHAKE:
            raise _Answer(ck.CKR_GENERAL_ERROR)
        if self._initialized:
            raise _Answer(ck.CKR_CRYPTOKI_ALREADY_INITIALIZED)
        self._initialized = True

    def _C_Finalize(self, reader: Reader, writer: Writer) -> None:
        reader.end()
        self._sessions.clear()
        self._initialized = False

    def _C_GetInfo(self, reader: Reader, writer: Writer) -> None:
        reader.end()
        writer.version(2, 40)
        writer.space_string("Janus", 32)
        writer.ulong(0)
        writer.space_string("Janus HSM service (p11-kit RPC)", 32)
        writer.version(1, 0)

    def _C_GetSlotList(self, reader: Reader, writer: Writer) -> None:
        reader.byte()  # token present: the one slot always has its token
        room = reader.output_size()
        reader.end()
        slots = [] if self._client is None else [SLOT_ID]
        writer.ulongs_result(slots, room=room)

    def _C_GetSlotInfo(self, reader: Reader, writer: Writer) -> None:
        slot = reader.ulong()
        reader.end()
        self._slot(slot)
        writer.space_string(f"{self._service_name} (policy-enforced)", 64)
        writer.space_string("Janus", 32)
        writer.ulong(ck.CKF_TOKEN_PRESENT)
        writer.version(1, 0)
        writer.version(1, 0)

    def _C_GetTokenInfo(self, reader: Reader, writer: Writer) -> None:
        slot = reader.ulong()
        reader.end()
        self._slot(slot)
        writer.space_string(self._service_name, 32)
        writer.space_string("Janus", 32)
        writer.space_string("HSM service", 16)
        writer.space_string("p11kit", 16)
        # No CKF_LOGIN_REQUIRED: the socket peer is already identified. Protected
        # authentication path: tools that log in anyway send no PIN.
        writer.ulong(
            ck.CKF_TOKEN_INITIALIZED
            | ck.CKF_USER_PIN_INITIALIZED
            | ck.CKF_PROTECTED_AUTHENTICATION_PATH
        )
        writer.ulong(0)  # max sessions: effectively infinite
        writer.ulong(len(self._sessions))
        writer.ulong(0)
        writer.ulong(sum(1 for s in self._sessions.values() if s.rw))
        writer.ulong(0)  # max PIN length: there is no PIN here
        writer.ulong(0)
        for _ in range(4):  # total/free public/private memory
            writer.ulong(ck.CK_UNAVAILABLE_INFORMATION)
        writer.version(1, 0)
        writer.version(1, 0)
        writer.space_string("", 16)

    def _C_GetMechanismList(self, reader: Reader, writer: Writer) -> None:
        slot = reader.ulong()
        room = reader.output_size()
        reader.end()
        self._slot(slot)
        writer.ulongs_result(self._mechanisms(), room=room)

    def _C_GetMechanismInfo(self, reader: Reader, writer: Writer) -> None:
        slot = reader.ulong()
        mechanism = reader.ulong()
        reader.end()
        self._slot(slot)
        if mechanism not in self._mechanisms():
            raise _Answer(ck.CKR_MECHANISM_INVALID)
        bits = [
            KEY_BITS[key.algorithm]
            for key in self._keys.values()
            if mechanism in SIGN_MECHANISMS.get(key.algorithm, ())
        ]
        flags = ck.CKF_SIGN
        if mechanism != ck.CKM_EDDSA:
            flags |= ck.CKF_EC_F_P | ck.CKF_EC_NAMEDCURVE | ck.CKF_EC_UNCOMPRESS
        writer.ulong(min(bits))
        writer.ulong(max(bits))
        writer.ulong(flags)

    # ------------------------------------------------------------------ sessions

    def _C_OpenSession(self, reader: Reader, writer: Writer) -> None:
        slot = reader.ulong()
        flags = reader.ulong()
        reader.end()
        self._slot(slot)
        if not flags & ck.CKF_SERIAL_SESSION:
            raise _Answer(ck.CKR_SESSION_PARALLEL_NOT_SUPPORTED)
        handle = self._next_session
        self._next_session += 1
        self._sessions[handle] = _Session(rw=bool(flags & ck.CKF_RW_SESSION))
        writer.ulong(handle)

    def _C_CloseSession(self, reader: Reader, writer: Writer) -> None:
        handle = reader.ulong()
        reader.end()
        self._session(handle)
        del self._sessions[handle]

    def _C_CloseAllSessions(self, reader: Reader, writer: Writer) -> None:
        slot = reader.ulong()
        reader.end()
        self._slot(slot)
        self._sessions.clear()

    def _C_GetSessionInfo(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        reader.end()
        writer.ulong(SLOT_ID)
        writer.ulong(ck.CKS_RW_USER_FUNCTIONS if session.rw else ck.CKS_RO_USER_FUNCTIONS)
        writer.ulong(ck.CKF_SERIAL_SESSION | (ck.CKF_RW_SESSION if session.rw else 0))
        writer.ulong(0)

    def _C_Login(self, reader: Reader, writer: Writer) -> None:
        """A no-op for the user: the peer's uid already named the client, and the token's
        PIN stays in the service. Whatever PIN the caller sends is dropped unread."""
        handle = reader.ulong()
        user_type = reader.ulong()
        reader.bytes_argument()
        reader.end()
        self._session(handle)
        if user_type == ck.CKU_SO:
            raise _Answer(ck.CKR_FUNCTION_NOT_SUPPORTED)
        if user_type not in (ck.CKU_USER, ck.CKU_CONTEXT_SPECIFIC):
            raise _Answer(ck.CKR_USER_TYPE_INVALID)

    def _C_Logout(self, reader: Reader, writer: Writer) -> None:
        handle = reader.ulong()
        reader.end()
        self._session(handle)

    # ------------------------------------------------------------------ objects

    def _C_FindObjectsInit(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        template = reader.attributes()
        reader.end()
        if session.found is not None:
            raise _Answer(ck.CKR_OPERATION_ACTIVE)
        self._refresh()
        found = []
        for handle, (label, private) in sorted(self._objects.items()):
            key = self._keys.get(label)
            if key is None:
                continue
            attributes = key.private if private else key.public
            if all(_matches(attributes, wanted) for wanted in template):
                found.append(handle)
        session.found = found

    def _C_FindObjects(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        room = reader.output_size()
        reader.end()
        if session.found is None:
            raise _Answer(ck.CKR_OPERATION_NOT_INITIALIZED)
        if room is None:
            raise _Answer(ck.CKR_ARGUMENTS_BAD)
        batch, session.found = session.found[:room], session.found[room:]
        writer.ulongs_result(batch, room=room)

    def _C_FindObjectsFinal(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        reader.end()
        if session.found is None:
            raise _Answer(ck.CKR_OPERATION_NOT_INITIALIZED)
        session.found = None

    def _C_GetAttributeValue(self, reader: Reader, writer: Writer) -> None:
        self._session(reader.ulong())
        handle = reader.ulong()
        template = reader.attribute_template()
        reader.end()
        key, private = self._object(handle)
        attributes = key.private if private else key.public
        answers: list[Attribute] = []
        sensitive = invalid = too_small = False
        for kind, room in template:
            value = attributes.get(kind)
            if private and kind in SENSITIVE_ATTRIBUTES:
                sensitive = True
                answers.append(Attribute(kind, None))
            elif value is None:
                invalid = True
                answers.append(Attribute(kind, None))
            elif room and room < _encoded_length(value):
                too_small = True
                answers.append(Attribute(kind, None))
            else:
                answers.append(Attribute(kind, value))
        rv = ck.CKR_OK
        if sensitive:
            rv = ck.CKR_ATTRIBUTE_SENSITIVE
        elif invalid:
            rv = ck.CKR_ATTRIBUTE_TYPE_INVALID
        elif too_small:
            rv = ck.CKR_BUFFER_TOO_SMALL
        writer.attributes(answers)
        writer.ulong(rv)

    # ------------------------------------------------------------------ signing

    def _C_SignInit(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        mechanism = reader.mechanism_type()
        if mechanism == ck.CKM_NULL_MARKER:  # a NULL mechanism cancels the operation
            reader.ulong()
            reader.end()
            session.sign = None
            return
        known = {m for mechs in SIGN_MECHANISMS.values() for m in mechs}
        if mechanism not in known:
            # Its parameters' encoding depends on the mechanism: stop reading here.
            raise _Answer(ck.CKR_MECHANISM_INVALID)
        parameters = reader.byte_array()
        handle = reader.ulong()
        reader.end()
        if session.sign is not None:
            raise _Answer(ck.CKR_OPERATION_ACTIVE)
        if parameters:
            raise _Answer(ck.CKR_MECHANISM_PARAM_INVALID)
        key, private = self._object(handle)
        if not private:
            raise _Answer(ck.CKR_KEY_TYPE_INCONSISTENT)
        if mechanism not in SIGN_MECHANISMS.get(key.algorithm, ()):
            raise _Answer(ck.CKR_KEY_TYPE_INCONSISTENT)
        # Whether this client may sign with this key now is the engine's decision, made
        # (and audited) when the data arrives.
        session.sign = _SignOperation(key, mechanism)

    def _C_Sign(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        data = reader.bytes_argument()
        room = reader.output_size()
        reader.end()
        operation = session.sign
        if operation is None:
            raise _Answer(ck.CKR_OPERATION_NOT_INITIALIZED)
        if operation.updated:
            session.sign = None
            raise _Answer(ck.CKR_OPERATION_ACTIVE)
        self._finish(session, operation, data, room, writer)

    def _C_SignUpdate(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        data = reader.bytes_argument()
        reader.end()
        operation = session.sign
        if operation is None:
            raise _Answer(ck.CKR_OPERATION_NOT_INITIALIZED)
        if operation.mechanism not in MULTIPART_MECHANISMS:
            session.sign = None
            raise _Answer(ck.CKR_FUNCTION_NOT_SUPPORTED)
        if len(operation.parts) + len(data) > MAX_SIGN_INPUT:
            session.sign = None
            raise _Answer(ck.CKR_DATA_LEN_RANGE)
        operation.parts += data
        operation.updated = True

    def _C_SignFinal(self, reader: Reader, writer: Writer) -> None:
        session = self._session(reader.ulong())
        room = reader.output_size()
        reader.end()
        operation = session.sign
        if operation is None:
            raise _Answer(ck.CKR_OPERATION_NOT_INITIALIZED)
        self._finish(session, operation, bytes(operation.parts), room, writer)

    def _finish(
        self,
        session: _Session,
        operation: _SignOperation,
        data: bytes,
        room: int | None,
        writer: Writer,
    ) -> None:
        """Sign when the caller has room for the signature; a size query or a short
        buffer answers the length without using the key (nor a use of its quota)."""
        length = signature_length(operation.key.algorithm)
        if room is None or room < length:
            writer.bytes_result(None, length)
            return
        session.sign = None
        if len(data) > MAX_SIGN_INPUT:
            raise _Answer(ck.CKR_DATA_LEN_RANGE)
        request = OperationRequest(
            client=self._client or "",
            operation="sign",
            key=operation.key.label,
            payload=data,
            mechanism=None
            if JANUS_DEFAULT_MECHANISM.get(operation.key.algorithm) == operation.mechanism
            else operation.mechanism,
        )
        try:
            signature = self._engine.perform(request)
        except HsmServiceError as error:
            log.info(
                "p11-kit client %s: sign with %s refused (%s)",
                self._client,
                operation.key.label,
                getattr(error, "reason", error.code),
            )
            raise _Answer(ckr_for(error)) from None
        writer.bytes_result(signature, len(signature))


def _matches(attributes: Mapping[int, AttributeValue], wanted: Attribute) -> bool:
    if wanted.value is None or wanted.type in SENSITIVE_ATTRIBUTES:
        return False
    have = attributes.get(wanted.type)
    if isinstance(have, bool) or isinstance(wanted.value, bool):
        return have is not None and bool(have) == bool(wanted.value)
    return have == wanted.value


def _encoded_length(value: AttributeValue) -> int:
    """The ulValueLen a 64-bit client needs for a value."""
    if isinstance(value, bool):
        return 1
    if isinstance(value, int):
        return 8
    if isinstance(value, bytes):
        return len(value)
    return 8 * len(value)
