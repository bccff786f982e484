"""The issuance policy: what an edge agent may grant, to whom, and what must happen first.

The hardware key will sign whatever the edge agent hands it, so the edge agent needs a
rule book it cannot talk itself out of.  The policy is a TOML file (reference:
``docs/policy.md``) of rules; each says which audiences (holder keys, as did:key) may
receive which abilities, for at most how long, how many uses and how deep a
redelegation, and which steps (PIN, touch, operator approval, attested holder key) must
be satisfied before the hardware key signs.

Two properties matter more than convenience:

- **Loading is strict.**  An unknown key, a wrong type, a typo in a did:key or a
  duration, a duplicate rule name: each is a :class:`FormatError` naming the file, the
  rule and the key.  A misspelt ``max_use`` silently ignored would be a policy that
  allows more than its author wrote.  A policy object is immutable, and a file that
  does not load produces no object, so a bad edit never half-replaces a good policy.
- **Checking is predictable.**  The *first* rule, in file order, whose audiences match
  the request's audience and whose abilities cover every requested ability is the rule
  applied, as in a firewall.  If that rule's limits refuse the request, the request is
  refused; later, looser rules are not consulted.  Every refusal is a
  :class:`PolicyViolationError` whose message names the rule and the limit, so the
  operator knows which line of the file to read.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

from janus_hsm.algorithms import Algorithm
from janus_hsm.public_keys import PublicKeyFormatError, algorithm_of, from_did_key
from policies.abilities import Ability
from policies.durations import format_duration, parse_duration
from policies.errors import FormatError, PolicyViolationError

__all__ = [
    "ANY_AUDIENCE",
    "APPROVAL",
    "ATTESTED_HOLDER",
    "MAX_APPROVALS",
    "MAX_DEPTH",
    "MAX_USES",
    "PIN",
    "REQUIREMENTS",
    "TOUCH",
    "GrantRequest",
    "IssuancePolicy",
    "PolicyDecision",
    "Rule",
]

#: The token login (PKCS#11 C_Login, PIV VERIFY PIN) before the hardware key signs.
PIN = "pin"
#: User presence on the device (a YubiKey touch) for the signature itself.
TOUCH = "touch"
#: M-of-N operator approvals (FIDO2 assertions over the grant) before signing.
APPROVAL = "approval"
#: The holder key's attestation evidence must have been verified.
ATTESTED_HOLDER = "attested-holder"
REQUIREMENTS = frozenset({PIN, TOUCH, APPROVAL, ATTESTED_HOLDER})

#: The audience pattern that matches any holder key.
ANY_AUDIENCE = "*"
#: A chain holds at most 10 links (docs/capabilities.md), so a root grant can be
#: redelegated at most 9 more times; a larger max_depth could never be used.
MAX_DEPTH = 9
#: Use counts travel in JSON (the capability's ``lim.uses``); 2**53 - 1 is the largest
#: integer every JSON implementation reads exactly.
MAX_USES = 2**53 - 1
#: More approvals than this is a typo, not a quorum.
MAX_APPROVALS = 100
#: What a policy file may say when it does not say: ``require`` defaults to the PIN,
#: because every hardware signature starts with a token login anyway.
DEFAULT_REQUIRE = frozenset({PIN})

_UNLIMITED = "unlimited"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_TOP_KEYS = frozenset({"version", "defaults", "rule"})
_LIMIT_KEYS = frozenset({"max_ttl", "max_uses", "max_depth", "require", "approvals"})
_RULE_KEYS = _LIMIT_KEYS | {"name", "audiences", "abilities"}
_ABILITY_KEYS = frozenset({"can", "with"})


@dataclass(frozen=True)
class GrantRequest:
    """What an edge agent is asked to sign, reduced to what the policy judges.

    ``uses`` None asks for a capability without a use limit.  ``depth`` is how many
    more times the holder may redelegate.  ``holder_attested`` is true only once the
    caller has *verified* the holder key's attestation evidence; the policy cannot check
    evidence itself, it only refuses when a rule needs it and the caller has not.
    """

    audience: str
    abilities: tuple[Ability, ...]
    ttl_seconds: int
    uses: int | None
    depth: int
    holder_attested: bool = False

    def __post_init__(self) -> None:
        # A malformed request must never be mistaken for a small one (ttl 0 or uses -1
        # are "below every limit"), so it is refused before any rule sees it.
        if not isinstance(self.audience, str) or not self.audience:
            raise FormatError("grant request: audience must be a non-empty string")
        abilities = self.abilities
        if isinstance(abilities, list):
            abilities = tuple(abilities)
            object.__setattr__(self, "abilities", abilities)
        if not isinstance(abilities, tuple) or not abilities:
            raise FormatError("grant request: abilities must be a non-empty tuple")
        if not all(isinstance(a, Ability) for a in abilities):
            raise FormatError("grant request: every ability must be an Ability")
        if not _is_int(self.ttl_seconds) or self.ttl_seconds <= 0:
            raise FormatError("grant request: ttl_seconds must be a positive integer")
        if self.uses is not None and (not _is_int(self.uses) or self.uses <= 0):
            raise FormatError("grant request: uses must be a positive integer or None")
        if not _is_int(self.depth) or self.depth < 0:
            raise FormatError("grant request: depth must be a non-negative integer")
        if not isinstance(self.holder_attested, bool):
            raise FormatError("grant request: holder_attested must be a bool")


@dataclass(frozen=True)
class PolicyDecision:
    """A request the policy allows, and what must happen before the key signs it.

    ``requirements`` are the rule's ``require`` names; the edge agent must satisfy each
    (``attested-holder`` was already checked against ``GrantRequest.holder_attested``).
    ``approvals`` is the number of operator approvals needed, 0 without ``approval``.
    """

    rule: str
    requirements: frozenset[str]
    approvals: int


@dataclass(frozen=True)
class Rule:
    """One ``[[rule]]`` after defaults are applied: everything it allows, resolved.

    ``max_uses`` None means the rule allows grants without a use limit (the file said
    ``"unlimited"``).
    """

    name: str
    audiences: tuple[str, ...]
    abilities: tuple[Ability, ...]
    max_ttl: int
    max_uses: int | None
    max_depth: int
    require: frozenset[str]
    approvals: int

    def __post_init__(self) -> None:
        # Rules built in code get the invariants the loader guarantees for files.
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise FormatError(f"rule name {self.name!r} is not a valid name")
        if not self.audiences:
            raise FormatError(f"rule {self.name!r}: no audiences")
        if not self.abilities:
            raise FormatError(f"rule {self.name!r}: no abilities")
        if not self.require <= REQUIREMENTS:
            unknown = ", ".join(sorted(self.require - REQUIREMENTS))
            raise FormatError(f"rule {self.name!r}: unknown requirement(s) {unknown}")
        if (APPROVAL in self.require) != (self.approvals > 0):
            raise FormatError(
                f"rule {self.name!r}: approvals must be at least 1 with {APPROVAL!r}"
                " in require, and 0 without it"
            )

    def allows_audience(self, audience: str) -> bool:
        return ANY_AUDIENCE in self.audiences or audience in self.audiences

    def allows_ability(self, ability: Ability) -> bool:
        """Is ``ability`` covered by one of the rule's abilities?  Caveats are ignored:
        they only narrow a grant, and the policy bounds what a grant may reach."""
        return any(mine.covers(ability) for mine in self.abilities)

    def applies_to(self, request: GrantRequest) -> bool:
        return self.allows_audience(request.audience) and all(
            self.allows_ability(a) for a in request.abilities
        )

    def decide(self, request: GrantRequest) -> PolicyDecision:
        """Apply this rule's limits to ``request``; every violation is reported at once,
        so an operator fixes a refused grant in one attempt rather than several."""
        problems = []
        if request.ttl_seconds > self.max_ttl:
            problems.append(
                f"ttl {format_duration(request.ttl_seconds)} exceeds"
                f" max_ttl {format_duration(self.max_ttl)}"
            )
        if self.max_uses is not None:
            if request.uses is None:
                problems.append(f"unlimited uses requested, but max_uses is {self.max_uses}")
            elif request.uses > self.max_uses:
                problems.append(f"uses {request.uses} exceeds max_uses {self.max_uses}")
        if request.depth > self.max_depth:
            problems.append(f"depth {request.depth} exceeds max_depth {self.max_depth}")
        if ATTESTED_HOLDER in self.require and not request.holder_attested:
            problems.append(
                "requires an attested holder key ('attested-holder'),"
                " and the holder key's attestation has not been verified"
            )
        if problems:
            raise PolicyViolationError(
                f"rule {self.name!r}: " + "; ".join(problems), rule=self.name
            )
        return PolicyDecision(self.name, self.require, self.approvals)


@dataclass(frozen=True)
class IssuancePolicy:
    """An ordered, immutable list of rules; :meth:`check` judges grant requests.

    Build one with :meth:`load`, :meth:`loads`, :meth:`from_mapping` or
    :meth:`permissive`.  Replacing a policy means loading a new object; if the new file
    is malformed the loader raises and the caller keeps the old one.
    """

    rules: tuple[Rule, ...]
    source: str = "<policy>"

    def __post_init__(self) -> None:
        if not self.rules:
            raise FormatError(f"{self.source}: a policy needs at least one rule")
        seen: set[str] = set()
        for rule in self.rules:
            if rule.name in seen:
                raise FormatError(f"{self.source}: duplicate rule name {rule.name!r}")
            seen.add(rule.name)

    @classmethod
    def load(cls, path: str | PathLike[str]) -> IssuancePolicy:
        """Read a policy file.  Unreadable, non-UTF-8 or malformed → :class:`FormatError`
        naming the file, so the CLI reports every policy problem the same way."""
        source = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise FormatError(f"{source}: cannot read the policy: {exc.strerror}") from exc
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FormatError(f"{source}: not UTF-8 text: {exc.reason}") from exc
        return cls.loads(text, source=source)

    @classmethod
    def loads(cls, text: str, *, source: str = "<string>") -> IssuancePolicy:
        """Parse policy TOML; ``source`` names it in error messages."""
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise FormatError(f"{source}: not valid TOML: {exc}") from exc
        return cls.from_mapping(document, source=source)

    @classmethod
    def from_mapping(
        cls, document: Mapping[str, Any], *, source: str = "<mapping>"
    ) -> IssuancePolicy:
        """Build a policy from already parsed TOML (e.g. a table of a larger config)."""
        return _Loader(source).document(document)

    @classmethod
    def permissive(cls) -> IssuancePolicy:
        """The policy used when no file is given.

        Any audience and any ability, but still bounded: at most 24h, at most 1000 uses
        (a grant without a use limit is refused), one redelegation, and the PIN.  It lets
        an individual start without writing a policy, while keeping the worst case of a
        careless grant a day and a thousand uses rather than forever.
        """
        rule = Rule(
            name="permissive",
            audiences=(ANY_AUDIENCE,),
            abilities=(Ability("*", "*"),),
            max_ttl=24 * 3600,
            max_uses=1000,
            max_depth=1,
            require=DEFAULT_REQUIRE,
            approvals=0,
        )
        return cls((rule,), source="<permissive>")

    def check(self, request: GrantRequest) -> PolicyDecision:
        """Find the rule for ``request`` and apply it, or raise
        :class:`PolicyViolationError` naming the rule (or, with ``rule=None``, what no
        rule allows)."""
        if not isinstance(request, GrantRequest):
            raise TypeError(f"check() needs a GrantRequest, not {type(request).__name__}")
        for rule in self.rules:
            if rule.applies_to(request):
                return rule.decide(request)
        raise self._nothing_allows(request)

    def _nothing_allows(self, request: GrantRequest) -> PolicyViolationError:
        """Say as precisely as possible why no rule applied: the audience, the
        abilities, or only their combination."""
        audience = request.audience
        candidates = [rule for rule in self.rules if rule.allows_audience(audience)]
        if not candidates:
            return PolicyViolationError(f"no rule allows audience {audience!r}")
        uncovered = [
            ability
            for ability in request.abilities
            if not any(rule.allows_ability(ability) for rule in candidates)
        ]
        if uncovered:
            wanted = ", ".join(_show(a) for a in uncovered)
            return PolicyViolationError(f"no rule allows {wanted} for audience {audience!r}")
        wanted = ", ".join(_show(a) for a in request.abilities)
        return PolicyViolationError(
            f"no single rule allows all of {wanted} for audience {audience!r};"
            " request them in separate grants"
        )


def _show(ability: Ability) -> str:
    return f"{ability.action!r} on {ability.resource!r}"


def _is_int(value: object) -> bool:
    # TOML booleans arrive as Python bools, which are ints; ``true`` is not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _type_name(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string"}
    names |= {list: "an array", dict: "a table"}
    return names.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class _Limits:
    """The keys ``[defaults]`` and a rule share, as written (None = not written)."""

    max_ttl: int | None = None
    max_uses_set: bool = False
    max_uses: int | None = None  # with max_uses_set: None = "unlimited"
    max_depth: int | None = None
    require: frozenset[str] | None = None
    approvals: int | None = None


class _Loader:
    """Turns a parsed TOML document into an :class:`IssuancePolicy`, or raises
    :class:`FormatError` whose message starts with the source and the place in it."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, where: str, message: str) -> FormatError:
        return FormatError(f"{self.source}: {where}: {message}")

    def document(self, document: Mapping[str, Any]) -> IssuancePolicy:
        if not isinstance(document, Mapping):
            raise FormatError(f"{self.source}: a policy must be a table")
        self.unknown_keys("the top level", document, _TOP_KEYS)
        if "version" not in document:
            raise self.error("version", "missing; write version = 1")
        version = document["version"]
        if not _is_int(version) or version != 1:
            raise self.error("version", f"must be 1, not {version!r}")
        defaults = _Limits()
        if "defaults" in document:
            table = document["defaults"]
            if not isinstance(table, Mapping):
                raise self.error("defaults", f"must be a table, not {_type_name(table)}")
            self.unknown_keys("[defaults]", table, _LIMIT_KEYS)
            defaults = self.limits("[defaults]", table)
        if "rule" not in document:
            raise self.error("rule", "no rules; add at least one [[rule]]")
        entries = document["rule"]
        if not isinstance(entries, list):
            raise self.error("rule", "must be an array of tables: write [[rule]], not [rule]")
        if not entries:
            raise self.error("rule", "no rules; add at least one [[rule]]")
        rules: list[Rule] = []
        first_index: dict[str, int] = {}
        for index, entry in enumerate(entries, start=1):
            rule = self.rule(index, entry, defaults)
            if rule.name in first_index:
                raise self.error(
                    f"rule #{index} {rule.name!r}",
                    f"name: duplicate of rule #{first_index[rule.name]}",
                )
            first_index[rule.name] = index
            rules.append(rule)
        return IssuancePolicy(tuple(rules), source=self.source)

    def unknown_keys(self, where: str, table: Mapping[str, Any], allowed: frozenset[str]) -> None:
        unknown = sorted(set(table) - allowed)
        if unknown:
            raise self.error(
                where,
                f"unknown key(s) {', '.join(map(repr, unknown))};"
                f" allowed: {', '.join(sorted(allowed))}",
            )

    def rule(self, index: int, entry: object, defaults: _Limits) -> Rule:
        where = f"rule #{index}"
        if not isinstance(entry, Mapping):
            raise self.error(where, f"must be a table, not {_type_name(entry)}")
        name = entry.get("name")
        if name is None:
            raise self.error(where, "name: missing")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise self.error(
                where,
                f"name: {name!r} must be 1-64 letters, digits, '.', '_' or '-'"
                " (starting with a letter or digit)",
            )
        where = f"rule #{index} {name!r}"
        self.unknown_keys(where, entry, _RULE_KEYS)
        for key in ("audiences", "abilities"):
            if key not in entry:
                raise self.error(where, f"{key}: missing")
        audiences = self.audiences(where, entry["audiences"])
        abilities = self.abilities(where, entry["abilities"])
        own = self.limits(where, entry)

        max_ttl = own.max_ttl if own.max_ttl is not None else defaults.max_ttl
        if max_ttl is None:
            raise self.error(where, "max_ttl: not set, here or in [defaults]")
        if own.max_uses_set:
            max_uses = own.max_uses
        elif defaults.max_uses_set:
            max_uses = defaults.max_uses
        else:
            raise self.error(
                where,
                "max_uses: not set, here or in [defaults]"
                f" (write {_UNLIMITED!r} to allow grants without a use limit)",
            )
        max_depth = own.max_depth if own.max_depth is not None else defaults.max_depth
        require = own.require if own.require is not None else defaults.require
        if require is None:
            require = DEFAULT_REQUIRE
        if APPROVAL in require:
            approvals = own.approvals or defaults.approvals or 1
        elif own.approvals is not None:
            raise self.error(where, f"approvals: set, but require does not include {APPROVAL!r}")
        else:
            approvals = 0
        return Rule(
            name=name,
            audiences=audiences,
            abilities=abilities,
            max_ttl=max_ttl,
            max_uses=max_uses,
            max_depth=max_depth if max_depth is not None else 0,
            require=require,
            approvals=approvals,
        )

    def audiences(self, where: str, value: object) -> tuple[str, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(where, "audiences: must be a non-empty array of did:key or '*'")
        seen: list[str] = []
        for audience in value:
            if not isinstance(audience, str):
                raise self.error(where, f"audiences: {audience!r} is not a string")
            if audience in seen:
                raise self.error(where, f"audiences: {audience!r} is listed twice")
            if audience != ANY_AUDIENCE:
                self.check_did_key(where, audience)
            seen.append(audience)
        return tuple(seen)

    def check_did_key(self, where: str, did: str) -> None:
        """Decode the did:key, so a typo is caught here and not as a grant refused later."""
        shown = did if len(did) <= 60 else did[:60] + "…"
        if not did.startswith("did:key:z") or "#" in did:
            raise self.error(
                where, f"audiences: {shown!r} must be '*' or a did:key (did:key:z…, no fragment)"
            )
        try:
            algorithm = algorithm_of(from_did_key(did))
        except PublicKeyFormatError as exc:
            raise self.error(where, f"audiences: {shown!r}: {exc}") from exc
        if algorithm is Algorithm.X25519:
            raise self.error(
                where, f"audiences: {shown!r} is an X25519 key, which cannot sign invocations"
            )

    def abilities(self, where: str, value: object) -> tuple[Ability, ...]:
        if not isinstance(value, list) or not value:
            raise self.error(
                where, "abilities: must be a non-empty array of { can = …, with = … } tables"
            )
        abilities: list[Ability] = []
        for number, entry in enumerate(value, start=1):
            here = f"abilities #{number}"
            if not isinstance(entry, Mapping):
                raise self.error(where, f"{here}: must be a table, not {_type_name(entry)}")
            self.unknown_keys(f"{where}: {here}", entry, _ABILITY_KEYS)
            for key in ("can", "with"):
                if key not in entry:
                    raise self.error(where, f"{here}: {key}: missing")
                if not isinstance(entry[key], str):
                    raise self.error(where, f"{here}: {key}: must be a string")
            try:
                ability = Ability(resource=entry["with"], action=entry["can"])
            except FormatError as exc:
                raise self.error(where, f"{here}: {exc}") from exc
            if ability in abilities:
                raise self.error(where, f"{here}: listed twice")
            abilities.append(ability)
        return tuple(abilities)

    def limits(self, where: str, table: Mapping[str, Any]) -> _Limits:
        max_ttl: int | None = None
        max_uses: int | None = None
        max_depth: int | None = None
        approvals: int | None = None
        require: frozenset[str] | None = None
        max_uses_set = "max_uses" in table
        if "max_ttl" in table:
            value = table["max_ttl"]
            if not isinstance(value, str):
                raise self.error(
                    where, f'max_ttl: must be a duration string such as "10m", not {value!r}'
                )
            try:
                max_ttl = parse_duration(value)
            except FormatError as exc:
                raise self.error(where, f"max_ttl: {exc}") from exc
        if max_uses_set:
            value = table["max_uses"]
            if value != _UNLIMITED:
                max_uses = self.count(where, "max_uses", value, 1, MAX_USES, f" or {_UNLIMITED!r}")
        if "max_depth" in table:
            max_depth = self.count(where, "max_depth", table["max_depth"], 0, MAX_DEPTH)
        if "require" in table:
            require = self.require(where, table["require"])
        if "approvals" in table:
            approvals = self.count(where, "approvals", table["approvals"], 1, MAX_APPROVALS)
        return _Limits(max_ttl, max_uses_set, max_uses, max_depth, require, approvals)

    def count(
        self, where: str, key: str, value: object, low: int, high: int, extra: str = ""
    ) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
            return value
        raise self.error(
            where, f"{key}: must be an integer from {low} to {high}{extra}, not {value!r}"
        )

    def require(self, where: str, value: object) -> frozenset[str]:
        if not isinstance(value, list):
            raise self.error(where, f"require: must be an array, not {_type_name(value)}")
        names: set[str] = set()
        for item in value:
            if not isinstance(item, str) or item not in REQUIREMENTS:
                raise self.error(
                    where,
                    f"require: unknown requirement {item!r};"
                    f" known: {', '.join(sorted(REQUIREMENTS))}",
                )
            if item in names:
                raise self.error(where, f"require: {item!r} is listed twice")
            names.add(item)
        return frozenset(names)


def naming_policy_file(
    error: PolicyViolationError, policy_file: str | PathLike[str]
) -> PolicyViolationError:
    """``error`` saying which file to edit: whoever is refused a grant is told where the
    policy that refused it lives, not only which rule did."""
    return PolicyViolationError(
        f"{error} (issuance policy {os.path.abspath(policy_file)}: edit it to allow this "
        "grant, see docs/policy.md)",
        rule=error.rule,
    )
