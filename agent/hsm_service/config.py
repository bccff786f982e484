"""The HSM service's configuration file (TOML): a public contract, read strictly.

Every section and field is known here; anything else is refused at start-up with the
file and the field named, as are rules that cannot be met (a quorum of 0 or of more
approvers than it names, an approver nobody registered, a key on a token the file
does not declare).  A typo in a policy file must never silently widen a policy:
``max_use = 1`` (for ``max-uses``) would otherwise mean "unlimited".

The complete example and the meaning of each field are in docs/hsm-service.md.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from agent.hsm_service.errors import ConfigError
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import UriError
from janus_hsm.public_keys import PublicKeyFormatError, from_did_key
from janus_hsm.uri import Pkcs11Uri
from policies.approvals import ApproverSet
from policies.errors import FormatError

OPERATIONS: Final = ("sign", "ecdh", "generate", "destroy")
STATES: Final = ("pre-active", "active", "deactivated", "compromised", "destroyed")
# [service] audit-sync: how far a decision is written before the token acts.
AUDIT_SYNC: Final = ("full", "os")
DEFAULT_APPROVAL_RP_ID: Final = "approvals.janus.invalid"  # as `janus fido2 register`
MAX_CONFIG_BYTES: Final = 1 << 20
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}", re.ASCII)
_MAX_COUNT = 2**62


@dataclass(frozen=True)
class RateLimit:
    """At most ``count`` operations per fixed window of ``per_seconds``."""

    count: int
    per_seconds: int


@dataclass(frozen=True)
class Quorum:
    """``m`` distinct approvals out of ``approvers`` (ids in the approver registry),
    for ``operations`` (all of a key's operations when empty)."""

    m: int
    approvers: tuple[str, ...]
    operations: frozenset[str] = frozenset()

    def applies_to(self, operation: str) -> bool:
        return not self.operations or operation in self.operations

    def to_json(self) -> dict[str, Any]:
        return {
            "m": self.m,
            "approvers": list(self.approvers),
            "operations": sorted(self.operations),
        }


@dataclass(frozen=True)
class TokenConfig:
    """One ``[[token]]``: a PKCS#11 module, the token's label, where its PIN is read."""

    name: str
    module: str
    token: str
    pin_source: str  # "env:NAME" or "file:/absolute/path" (or an absolute path)


@dataclass(frozen=True)
class KeyPolicy:
    """One ``[key.LABEL]``: where the key is and who may do what with it."""

    label: str
    uri: str  # the PKCS#11 URI without any query (no PIN, no module)
    token: str  # the TokenConfig.name the key lives on
    operations: frozenset[str]
    clients: frozenset[str]
    state: str = "active"
    activation_date: int | None = None  # unix seconds: pre-active becomes active
    deactivation_date: int | None = None  # unix seconds: active becomes deactivated
    max_uses: int | None = None
    rate: RateLimit | None = None
    quorum: Quorum | None = None
    algorithm: Algorithm | None = None  # what `generate` creates

    @property
    def object_label(self) -> str:
        label = Pkcs11Uri.parse(self.uri).object
        return label or self.label

    def to_json(self) -> dict[str, Any]:
        """The policy as the audit log records it (no secrets: none are in it)."""
        return {
            "label": self.label,
            "uri": self.uri,
            "token": self.token,
            "operations": sorted(self.operations),
            "clients": sorted(self.clients),
            "state": self.state,
            "activation-date": self.activation_date,
            "deactivation-date": self.deactivation_date,
            "max-uses": self.max_uses,
            "rate": None
            if self.rate is None
            else {"count": self.rate.count, "per-seconds": self.rate.per_seconds},
            "quorum": None if self.quorum is None else self.quorum.to_json(),
            "algorithm": None if self.algorithm is None else self.algorithm.value,
        }


@dataclass(frozen=True)
class P11KitClient:
    """A unix socket peer (by uid) and the client did:key it acts as."""

    uid: int
    client: str


@dataclass(frozen=True)
class ServiceSettings:
    """``[service]``: where the state is kept, who administers, how heads are signed."""

    state_dir: Path
    name: str = "janus-hsm"
    administrators: frozenset[str] = frozenset()
    approvers_file: Path | None = None
    approval_rp_id: str = DEFAULT_APPROVAL_RP_ID
    approval_max_ttl: int = 3600
    audit_head_key: str | None = None  # a PKCS#11 URI (no query) on a declared token
    audit_head_token: str | None = None
    audit_head_interval: float = 300.0
    audit_timeout: float = 5.0
    # "full": a decision is fsynced before the token acts (survives a power loss);
    # "os": written to the operating system only (survives the service crashing, not
    # the machine losing power).  See docs/hsm-service.md, "Audit durability".
    audit_sync: str = "full"

    @property
    def approval_origin(self) -> str:
        return f"https://{self.approval_rp_id}"


@dataclass(frozen=True)
class ServiceConfig:
    """The whole file, checked."""

    source: str
    service: ServiceSettings
    tokens: tuple[TokenConfig, ...]
    keys: Mapping[str, KeyPolicy]
    policy_quorum: Quorum | None = None
    p11kit_clients: tuple[P11KitClient, ...] = ()
    approvers: ApproverSet = field(default_factory=ApproverSet)

    def token(self, name: str) -> TokenConfig:
        return next(t for t in self.tokens if t.name == name)

    def with_keys(self, keys: Mapping[str, KeyPolicy]) -> ServiceConfig:
        return replace(self, keys=dict(keys))


# --------------------------------------------------------------------------- parsing


def load_config(path: str | os.PathLike[str]) -> ServiceConfig:
    """Read and check the configuration file at ``path`` (ConfigError otherwise)."""
    source = str(path)
    try:
        with Path(path).open("rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration: {exc.strerror}", source=source) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"larger than {MAX_CONFIG_BYTES} bytes", source=source)
    return parse_config(data, source=source, base=Path(path).resolve().parent)


def parse_config(
    data: bytes | str, *, source: str = "<config>", base: Path | None = None
) -> ServiceConfig:
    """Check a configuration's text; relative paths are taken from ``base``."""
    try:
        text = data.decode("utf-8") if isinstance(data, bytes) else data
        doc = tomllib.loads(text)
    except UnicodeDecodeError:
        raise ConfigError("not UTF-8 text", source=source) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from None
    return _Parser(source, base or Path.cwd()).config(doc)


def parse_key(
    config: ServiceConfig, label: str, spec: Mapping[str, Any], *, source: str
) -> KeyPolicy:
    """One ``[key.LABEL]`` table (e.g. from a policy change), checked as the file's are,
    against ``config``'s tokens and approvers."""
    parser = _Parser(source, config.service.state_dir)
    return parser.key(label, dict(spec), list(config.tokens), config.approvers)


def parse_did(value: Any, *, source: str, field: str) -> str:
    """A client's did:key, or ConfigError naming ``field``."""
    return _Parser(source, Path.cwd()).did(value, field)


class _Parser:
    def __init__(self, source: str, base: Path) -> None:
        self.source = source
        self.base = base

    def fail(self, where: str, message: str) -> ConfigError:
        return ConfigError(message, source=self.source, field=where)

    # -- primitives

    def table(
        self, value: Any, where: str, allowed: set[str], required: set[str]
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, "must be a table")
        unknown = sorted(set(value) - allowed)
        if unknown:
            prefix = f"{where}." if where else ""
            raise self.fail(
                f"{prefix}{unknown[0]}",
                f"unknown field (known here: {', '.join(sorted(allowed))})",
            )
        missing = sorted(required - set(value))
        if missing:
            prefix = f"{where}." if where else ""
            raise self.fail(f"{prefix}{missing[0]}", "is required")
        return value

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value or not value.isprintable():
            raise self.fail(where, "must be a non-empty string of printable characters")
        return value

    def integer(self, value: Any, where: str, *, minimum: int) -> int:
        if type(value) is not int:
            raise self.fail(where, "must be an integer")
        if not minimum <= value <= _MAX_COUNT:
            raise self.fail(where, f"must be at least {minimum}")
        return value

    def number(self, value: Any, where: str, *, minimum: float) -> float:
        if type(value) not in (int, float) or not math.isfinite(value) or value < minimum:
            raise self.fail(where, f"must be a number, at least {minimum}")
        return float(value)

    def strings(self, value: Any, where: str) -> list[str]:
        if not isinstance(value, list):
            raise self.fail(where, "must be an array of strings")
        items = [self.string(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if len(set(items)) != len(items):
            raise self.fail(where, "names the same entry twice")
        return items

    def did(self, value: Any, where: str) -> str:
        text = self.string(value, where)
        try:
            from_did_key(text)
        except (PublicKeyFormatError, ValueError):
            raise self.fail(where, "is not a did:key") from None
        return text

    def path(self, value: Any, where: str) -> Path:
        text = self.string(value, where)
        path = Path(text)
        return path if path.is_absolute() else self.base / path

    def date(self, value: Any, where: str) -> int:
        if isinstance(value, dt.datetime):
            if value.tzinfo is None:
                raise self.fail(where, "needs a UTC offset (e.g. 2027-01-01T00:00:00Z)")
            return math.floor(value.timestamp())
        if isinstance(value, dt.date):
            raise self.fail(where, "must be a date and time with a UTC offset")
        raise self.fail(where, "must be a TOML date-time (e.g. 2027-01-01T00:00:00Z)")

    def uri(self, value: Any, where: str) -> Pkcs11Uri:
        text = self.string(value, where)
        try:
            uri = Pkcs11Uri.parse(text)
        except UriError:
            # The URI is not repeated: a pin-value in it must not reach a log.
            raise self.fail(where, "is not a valid PKCS#11 URI (RFC 7512)") from None
        if uri.query:
            raise self.fail(
                where,
                "must not carry query attributes (pin-source, module-path…): the PIN and "
                "module are given once, in [[token]]",
            )
        if not uri.object:
            raise self.fail(where, "must name the key with object=<label>")
        if uri.type not in (None, "private"):
            raise self.fail(where, "must name a private key (type=private or no type)")
        return uri

    # -- sections

    def config(self, doc: dict[str, Any]) -> ServiceConfig:
        self.table(doc, "", {"service", "token", "key", "policy-changes", "p11kit"}, {"service"})
        tokens = self.tokens(doc.get("token", []))
        service, head_uri = self.service(doc["service"])
        approvers = ApproverSet()
        if service.approvers_file is not None:
            try:
                approvers = ApproverSet.load(service.approvers_file)
            except FormatError as exc:
                raise self.fail("service.approvers", str(exc)) from None
        if head_uri is not None:
            token = self.token_of(head_uri, tokens, "service.audit-head-key")
            service = replace(service, audit_head_key=str(head_uri), audit_head_token=token.name)
        keys_doc = doc.get("key", {})
        if not isinstance(keys_doc, dict):
            raise self.fail("key", "must be a table of [key.LABEL] tables")
        keys: dict[str, KeyPolicy] = {}
        objects: dict[tuple[str, str], str] = {}
        for label, spec in keys_doc.items():
            policy = self.key(label, spec, tokens, approvers)
            where = (policy.token, policy.object_label)
            if where in objects:
                raise self.fail(
                    f"key.{label}.uri", f"names the same token object as key.{objects[where]}"
                )
            objects[where] = label
            keys[label] = policy
        policy_quorum = None
        if "policy-changes" in doc:
            section = self.table(doc["policy-changes"], "policy-changes", {"quorum"}, {"quorum"})
            policy_quorum = self.quorum(section["quorum"], "policy-changes.quorum", approvers)
            if policy_quorum.operations:
                raise self.fail("policy-changes.quorum.operations", "is not used here")
        p11kit: tuple[P11KitClient, ...] = ()
        if "p11kit" in doc:
            p11kit = self.p11kit(doc["p11kit"])
        return ServiceConfig(
            source=self.source,
            service=service,
            tokens=tuple(tokens),
            keys=keys,
            policy_quorum=policy_quorum,
            p11kit_clients=p11kit,
            approvers=approvers,
        )

    def service(self, value: Any) -> tuple[ServiceSettings, Pkcs11Uri | None]:
        allowed = {
            "state-dir",
            "name",
            "administrators",
            "approvers",
            "approval-rp-id",
            "approval-max-ttl",
            "audit-head-key",
            "audit-head-interval",
            "audit-timeout",
            "audit-sync",
        }
        s = self.table(value, "service", allowed, {"state-dir"})
        audit_sync = self.string(s.get("audit-sync", "full"), "service.audit-sync")
        if audit_sync not in AUDIT_SYNC:
            raise self.fail("service.audit-sync", 'must be "full" (the default) or "os"')
        name = self.string(s.get("name", "janus-hsm"), "service.name")
        admins = [
            self.did(d, f"service.administrators[{i}]")
            for i, d in enumerate(
                self.strings(s.get("administrators", []), "service.administrators")
            )
        ]
        head_uri = (
            self.uri(s["audit-head-key"], "service.audit-head-key")
            if "audit-head-key" in s
            else None
        )
        settings = ServiceSettings(
            state_dir=self.path(s["state-dir"], "service.state-dir"),
            name=name,
            administrators=frozenset(admins),
            approvers_file=self.path(s["approvers"], "service.approvers")
            if "approvers" in s
            else None,
            approval_rp_id=self.string(
                s.get("approval-rp-id", DEFAULT_APPROVAL_RP_ID), "service.approval-rp-id"
            ),
            approval_max_ttl=self.integer(
                s.get("approval-max-ttl", 3600), "service.approval-max-ttl", minimum=1
            ),
            audit_head_interval=self.number(
                s.get("audit-head-interval", 300), "service.audit-head-interval", minimum=1
            ),
            audit_timeout=self.number(
                s.get("audit-timeout", 5), "service.audit-timeout", minimum=0.01
            ),
            audit_sync=audit_sync,
        )
        return settings, head_uri

    def tokens(self, value: Any) -> list[TokenConfig]:
        if not isinstance(value, list):
            raise self.fail("token", "must be an array of [[token]] tables")
        tokens: list[TokenConfig] = []
        for i, entry in enumerate(value):
            where = f"token[{i}]"
            t = self.table(
                entry,
                where,
                {"name", "module", "token", "pin-source"},
                {"module", "token", "pin-source"},
            )
            label = self.string(t["token"], f"{where}.token")
            name = self.string(t.get("name", label), f"{where}.name")
            module = str(self.path(t["module"], f"{where}.module"))
            pin = self.pin_source(t["pin-source"], f"{where}.pin-source")
            if any(other.name == name for other in tokens):
                raise self.fail(f"{where}.name", f"a token named {name!r} is declared twice")
            tokens.append(TokenConfig(name, module, label, pin))
        return tokens

    def pin_source(self, value: Any, where: str) -> str:
        # The value is never echoed: a PIN typed here by mistake must not reach a log.
        if not isinstance(value, str):
            raise self.fail(where, "must be a string: env:NAME or file:/absolute/path")
        if value.startswith("env:"):
            if not _ENV_NAME.fullmatch(value[4:]):
                raise self.fail(where, "env: must be followed by an environment variable name")
            return value
        from janus_hsm.pin import pin_source_path

        try:
            path = pin_source_path(value)
        except UriError:
            raise self.fail(where, "must be env:NAME or file:/absolute/path") from None
        return f"file:{path}"

    def token_of(self, uri: Pkcs11Uri, tokens: list[TokenConfig], where: str) -> TokenConfig:
        label = uri.token
        if not label and len(tokens) != 1:
            raise self.fail(where, "must name its token with token=<label>")
        matches = [t for t in tokens if t.token == label] if label else tokens
        if not matches:
            raise self.fail(where, f"names token {label!r}, which no [[token]] declares")
        if len(matches) > 1:
            raise self.fail(where, f"token {label!r} is declared by several [[token]] entries")
        return matches[0]

    def key(
        self, label: Any, value: Any, tokens: list[TokenConfig], approvers: ApproverSet
    ) -> KeyPolicy:
        where = f"key.{label}"
        if not isinstance(label, str) or not _LABEL.fullmatch(label):
            raise self.fail(where, "a key label is 1-64 letters, digits, '.', '_' or '-'")
        allowed = {
            "uri",
            "operations",
            "clients",
            "state",
            "activation-date",
            "deactivation-date",
            "max-uses",
            "rate",
            "quorum",
            "algorithm",
        }
        k = self.table(value, where, allowed, {"uri", "operations"})
        uri = self.uri(k["uri"], f"{where}.uri")
        token = self.token_of(uri, tokens, f"{where}.uri")
        operations = self.strings(k["operations"], f"{where}.operations")
        for i, op in enumerate(operations):
            if op not in OPERATIONS:
                raise self.fail(
                    f"{where}.operations[{i}]", f"unknown operation; one of {', '.join(OPERATIONS)}"
                )
        clients = [
            self.did(c, f"{where}.clients[{i}]")
            for i, c in enumerate(self.strings(k.get("clients", []), f"{where}.clients"))
        ]
        state = k.get("state", "active")
        if state not in STATES:
            raise self.fail(f"{where}.state", f"must be one of {', '.join(STATES)}")
        activation = (
            self.date(k["activation-date"], f"{where}.activation-date")
            if "activation-date" in k
            else None
        )
        deactivation = (
            self.date(k["deactivation-date"], f"{where}.deactivation-date")
            if "deactivation-date" in k
            else None
        )
        if activation is not None and deactivation is not None and deactivation <= activation:
            raise self.fail(f"{where}.deactivation-date", "must be after the activation-date")
        max_uses = (
            self.integer(k["max-uses"], f"{where}.max-uses", minimum=0) if "max-uses" in k else None
        )
        rate = self.rate(k["rate"], f"{where}.rate") if "rate" in k else None
        quorum = self.quorum(k["quorum"], f"{where}.quorum", approvers) if "quorum" in k else None
        if quorum is not None:
            for op in sorted(quorum.operations - set(operations)):
                raise self.fail(f"{where}.quorum.operations", f"{op!r} is not in operations")
        algorithm = None
        if "algorithm" in k:
            try:
                algorithm = Algorithm.parse(self.string(k["algorithm"], f"{where}.algorithm"))
            except ValueError as exc:
                raise self.fail(f"{where}.algorithm", str(exc)) from None
        elif "generate" in operations:
            raise self.fail(f"{where}.algorithm", "is required when operations has 'generate'")
        return KeyPolicy(
            label=label,
            uri=str(uri.with_path(type="private")),
            token=token.name,
            operations=frozenset(operations),
            clients=frozenset(clients),
            state=state,
            activation_date=activation,
            deactivation_date=deactivation,
            max_uses=max_uses,
            rate=rate,
            quorum=quorum,
            algorithm=algorithm,
        )

    def rate(self, value: Any, where: str) -> RateLimit:
        r = self.table(value, where, {"count", "per-seconds"}, {"count", "per-seconds"})
        return RateLimit(
            count=self.integer(r["count"], f"{where}.count", minimum=1),
            per_seconds=self.integer(r["per-seconds"], f"{where}.per-seconds", minimum=1),
        )

    def quorum(self, value: Any, where: str, approvers: ApproverSet) -> Quorum:
        q = self.table(value, where, {"m", "approvers", "operations"}, {"m", "approvers"})
        m = q["m"]
        if type(m) is not int:
            raise self.fail(f"{where}.m", "must be an integer")
        if m < 1:
            # An "M = 0" quorum would let requests through with no approval at all.
            raise self.fail(f"{where}.m", "must be at least 1 (leave quorum out for none)")
        names = self.strings(q["approvers"], f"{where}.approvers")
        if m > len(names):
            raise self.fail(f"{where}.m", f"{m} approvals out of {len(names)} approvers")
        for i, name in enumerate(names):
            if approvers.get(name) is None:
                raise self.fail(
                    f"{where}.approvers[{i}]",
                    f"{name!r} is not in the approver registry (service.approvers)",
                )
        operations = frozenset(self.strings(q.get("operations", []), f"{where}.operations"))
        for op in sorted(operations - set(OPERATIONS)):
            raise self.fail(f"{where}.operations", f"unknown operation {op!r}")
        return Quorum(m=m, approvers=tuple(names), operations=operations)

    def p11kit(self, value: Any) -> tuple[P11KitClient, ...]:
        section = self.table(value, "p11kit", {"clients"}, set())
        entries = section.get("clients", [])
        if not isinstance(entries, list):
            raise self.fail("p11kit.clients", "must be an array of { uid, client } tables")
        clients: list[P11KitClient] = []
        for i, entry in enumerate(entries):
            where = f"p11kit.clients[{i}]"
            e = self.table(entry, where, {"uid", "client"}, {"uid", "client"})
            uid = self.integer(e["uid"], f"{where}.uid", minimum=0)
            if any(c.uid == uid for c in clients):
                raise self.fail(f"{where}.uid", f"uid {uid} is mapped twice")
            clients.append(P11KitClient(uid, self.did(e["client"], f"{where}.client")))
        return tuple(clients)
