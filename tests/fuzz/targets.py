"""The fuzz targets: one per parser of outside input, each a strategy and a check.

Every target draws inputs two ways: structured generators that know the format's
vocabulary (attribute names, JSON members, caveat operators), and byte-level mutation
of a valid seed (tests/fuzz/mutate.py).  Signed formats get a third kind: a valid
seed whose signed bytes were changed, which must always be refused.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from agent.didcomm import unpack
from agent.evidence import verify_evidence
from janus_hsm.backends.piv.uri import PivUri
from janus_hsm.backends.software.uri import SoftwareUri
from janus_hsm.errors import UriError
from janus_hsm.public_keys import from_did_key, from_jwk
from janus_hsm.uri import Pkcs11Uri
from policies.capability import Bundle
from policies.caveats import evaluate, load_request, parse_caveats
from policies.errors import PolicyError
from policies.invocation import Invocation
from policies.policy import IssuancePolicy
from policies.revocation import Revocation, sign_revocation
from policies.verify import Verifier
from tests.fuzz.contract import Refused, refused, typed
from tests.fuzz.mutate import mutated_bytes, mutated_text, tampered_compact
from tests.fuzz.seeds import REQUEST, Seeds

# --------------------------------------------------------------------------- JSON


def json_values(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**64), 2**64)
        | st.floats(allow_nan=False, allow_infinity=False)
        | st.text(max_size=20)
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
        max_leaves=max_leaves,
    )


def dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------- URIs

CANARY = "Qx7canary"  # planted in attribute values: no error may repeat it
URI_SCHEMES = ("pkcs11", "PKCS11", "soft", "SOFT", "piv", "Piv", "fido2", "", "pkcs11 ")
URI_NAMES = (
    "token",
    "object",
    "type",
    "id",
    "serial",
    "model",
    "manufacturer",
    "library-manufacturer",
    "library-description",
    "library-version",
    "slot-description",
    "slot-manufacturer",
    "slot-id",
    "module-path",
    "module-name",
    "pin-source",
    "pin-value",
    "PIN-VALUE",
    "Pin-Value",
    "pin%2Dvalue",
    "pin%2dvalue",
    "%70in-value",
    "dir",
    "slot",
    "reader",
    "management-key-source",
    "x-unknown",
)
URI_SEEDS = (
    "pkcs11:token=janus;object=edge-root;type=private",
    "pkcs11:token=janus;id=%01%02?pin-source=file:/run/pin&module-path=/usr/lib/softhsm.so",
    "pkcs11:serial=abc;slot-id=3;library-version=2.1",
    "soft:dir=/var/lib/janus/keys;object=agent-1?pin-source=file:///run/pass",
    "soft:object=x",
    "piv:serial=123456;slot=9c?pin-source=env:JANUS_PIN",
    "piv:reader=Yubico%20YubiKey;slot=82",
)
PARSERS: dict[str, Callable[[str], object]] = {
    "pkcs11": Pkcs11Uri.parse,
    "soft": SoftwareUri.parse,
    "piv": PivUri.parse,
}


@st.composite
def uri_value(draw: st.DrawFn) -> str:
    text = draw(st.text(max_size=12))
    raw = draw(st.sampled_from(["", "9c", "0x01", "%01", "file:/x", "env:X"])) + text + CANARY
    encoded = draw(st.sampled_from(["plain", "quoted", "all"]))
    if encoded == "quoted":
        return urllib.parse.quote(raw, safe="")
    if encoded == "all":
        return "".join(f"%{b:02X}" for b in raw.encode())
    return raw


@st.composite
def structured_uri(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(URI_SCHEMES))
    names = st.sampled_from(URI_NAMES) | st.text(min_size=1, max_size=10)
    path = draw(st.lists(st.tuples(names, uri_value()), max_size=4))
    query = draw(st.lists(st.tuples(names, uri_value()), max_size=3))
    text = f"{scheme}:" + ";".join(f"{n}={v}" for n, v in path)
    with_query: bool = draw(st.booleans())
    if query or with_query:
        text += "?" + "&".join(f"{n}={v}" for n, v in query)
    return text


def uri_inputs() -> st.SearchStrategy[tuple[str, bool]]:
    """(text, whether the canary is certainly inside an attribute value)."""
    return (
        structured_uri().map(lambda t: (t, True))
        | st.sampled_from(URI_SEEDS).flatmap(mutated_text).map(lambda t: (t, False))
        | st.text(max_size=60).map(lambda t: (t, False))
    )


def check_uri(seeds: Seeds, case: tuple[str, bool]) -> None:
    text, canary_in_value = case
    for scheme, parse in PARSERS.items():
        result = typed(lambda parse=parse: parse(text), (UriError,))  # type: ignore[misc]
        if isinstance(result, Refused):
            message = str(result.error).lower()
            assert not canary_in_value or CANARY.lower() not in message, (
                f"{scheme}: URI error echoes an attribute value: {result.error}"
            )
            continue
        again = typed(lambda parse=parse, r=result: parse(str(r)), (UriError,))  # type: ignore[misc]
        assert not isinstance(again, Refused), (
            f"{scheme}: {text!r} parsed, but its rendering {str(result)!r} does not: {again}"
        )
        assert again == result, f"{scheme}: {text!r} does not round-trip: {result} != {again}"


# --------------------------------------------------------------------------- capabilities


def bundle_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[bytes, bool]]:
    text = seeds.bundle_text
    chain = [c.compact for c in seeds.bundle.chain]

    @st.composite
    def tampered(draw: st.DrawFn) -> bytes:
        index = draw(st.integers(0, len(chain) - 1))
        links = list(chain)
        links[index] = draw(tampered_compact(links[index]))
        return dumps({"typ": "janus-bundle/1", "chain": links})

    structured = st.fixed_dictionaries(
        {"typ": st.sampled_from(["janus-bundle/1", "x"]) | json_values(1)},
        optional={"chain": st.lists(st.sampled_from(chain) | json_values(2), max_size=4)},
    ).map(dumps)
    return (
        mutated_bytes(text.encode()).map(lambda b: (b, False))
        | tampered().map(lambda b: (b, True))
        | structured.map(lambda b: (b, False))
    )


def check_bundle(seeds: Seeds, case: tuple[bytes, bool]) -> None:
    data, tampered_signed = case
    verifier = Verifier()
    result = typed(lambda: verifier.verify_chain(Bundle.parse(data), now=seeds.now))
    if tampered_signed:
        refused(result, "bundle")
        return
    if not isinstance(result, Refused):
        accepted = {c.compact for c in result.bundle.chain}
        assert accepted <= seeds.compacts, "a bundle with changed links verified"


def invocation_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[str, bool]]:
    return (
        tampered_compact(seeds.invocation).map(lambda c: (c, True))
        | mutated_text(seeds.invocation).map(lambda c: (c, c.strip() != seeds.invocation))
        | st.text(max_size=80).map(lambda c: (c, True))
    )


def check_invocation(seeds: Seeds, case: tuple[str, bool]) -> None:
    compact, changed = case
    verifier = Verifier()

    def run() -> object:
        invocation = Invocation.parse(compact)
        return verifier.verify(seeds.bundle, invocation, REQUEST, now=seeds.now)

    result = typed(run)
    if changed:
        refused(result, "invocation")


def revocation_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[str, bool]]:
    record = sign_revocation(seeds.owner, revoked_id=seeds.bundle.root.id, now=seeds.now)
    return tampered_compact(record).map(lambda c: (c, True)) | mutated_text(record).map(
        lambda c: (c, c.strip() != record)
    )


def check_revocation(seeds: Seeds, case: tuple[str, bool]) -> None:
    compact, changed = case
    result = typed(lambda: Revocation.parse(compact).verify(seeds.bundle))
    if changed:
        refused(result, "revocation")


def evidence_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[Any, bool]]:
    evidence = seeds.evidence
    text = dumps(evidence)

    @st.composite
    def tampered(draw: st.DrawFn) -> tuple[Any, bool]:
        copy = json.loads(text)
        where = draw(st.sampled_from(["payload", "signature", "invocation", "bundle", "signer"]))
        if where == "payload":
            key = draw(st.sampled_from(sorted(copy["payload"])))
            value = draw(json_values(3).filter(lambda v: v != copy["payload"][key]))
            copy["payload"][key] = value
        elif where in ("signature",):
            copy["signature"] = draw(tampered_compact(copy["signature"]))
        elif where == "invocation":
            copy["invocation"] = draw(tampered_compact(copy["invocation"]))
        elif where == "bundle":
            chain = copy["bundle"]["chain"]
            index = draw(st.integers(0, len(chain) - 1))
            chain[index] = draw(tampered_compact(chain[index]))
        else:
            copy["signer"] = seeds.keys["cloud"].did  # a key in the chain, not the signer
        return copy, True

    def loaded(data: bytes) -> tuple[Any, bool]:
        try:
            return json.loads(data), False
        except (ValueError, RecursionError):
            return data.decode("utf-8", "replace"), False

    members = st.dictionaries(
        st.sampled_from(sorted(evidence)), json_values(3) | st.sampled_from(list(evidence.values()))
    )
    return (
        tampered()
        | mutated_bytes(text).map(loaded)
        | members.map(lambda m: ({**evidence, **m}, False))
    )


def check_evidence(seeds: Seeds, case: tuple[Any, bool]) -> None:
    evidence, tampered_signed = case
    result = typed(lambda: verify_evidence(evidence, root=seeds.owner.did))
    if tampered_signed:
        refused(result, "evidence")
    elif not isinstance(result, Refused):
        assert result.payload == REQUEST, "evidence verified for another payload"


# --------------------------------------------------------------------------- DIDComm

ENVELOPE_PARTS = ("protected", "iv", "ciphertext", "tag", "encrypted_key", "payload", "signature")


def envelope_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[bytes, bool]]:
    protected = {k: v for k, v in seeds.envelopes.items() if k != "plaintext"}

    @st.composite
    def tampered(draw: st.DrawFn) -> tuple[bytes, bool]:
        obj = json.loads(seeds.envelopes[draw(st.sampled_from(sorted(protected)))])
        holders = [obj, *obj.get("recipients", []), *obj.get("signatures", [])]
        fields = [(h, k) for h in holders for k in ENVELOPE_PARTS if isinstance(h.get(k), str)]
        holder, key = draw(st.sampled_from(fields))
        holder[key] = draw(tampered_compact(holder[key]))
        return dumps(obj), True

    seeds_bytes = [e.encode() for e in seeds.envelopes.values()]
    return (
        tampered()
        | st.sampled_from(seeds_bytes).flatmap(mutated_bytes).map(lambda b: (b, False))
        | json_values(8).map(lambda v: (dumps(v), False))
    )


def check_envelope(seeds: Seeds, case: tuple[bytes, bool]) -> None:
    data, tampered_signed = case
    result = typed(lambda: unpack(data, [seeds.keys["x25519"]]))
    if tampered_signed:
        refused(result, "envelope")
    elif not isinstance(result, Refused):
        message = result.message
        mode = result.metadata.mode
        if mode != "plaintext":  # plaintext is unprotected: anything goes
            assert message.body == seeds.message.body and message.id == seeds.message.id, (
                f"a changed {mode} envelope was accepted"
            )


# --------------------------------------------------------------------------- policy


POLICY_KEYS = (
    "version",
    "defaults",
    "rule",
    "name",
    "audiences",
    "abilities",
    "max_ttl",
    "max_uses",
    "max_depth",
    "require",
    "approvals",
    "can",
    "with",
    "nb",
    "rate",
)


def toml_scalars() -> st.SearchStrategy[str]:
    return st.sampled_from(
        ['"1h"', '"15m"', "1", "0", "-1", "1e9", '"unlimited"', "[]", '["pin"]', "true", "{}"]
    ) | st.text(max_size=10).map(json.dumps)


@st.composite
def structured_policy(draw: st.DrawFn) -> str:
    lines = [draw(st.sampled_from(["version = 1", "version = 2", 'version = "1"', ""]))]
    for _ in range(draw(st.integers(0, 3))):
        lines.append(draw(st.sampled_from(["[[rule]]", "[defaults]", "[rule]", "[x]"])))
        for _ in range(draw(st.integers(0, 6))):
            key = draw(st.sampled_from(POLICY_KEYS))
            lines.append(f"{key} = {draw(toml_scalars())}")
    return "\n".join(lines)


def policy_inputs(seeds: Seeds) -> st.SearchStrategy[str]:
    return mutated_text(seeds.policy_text, max_steps=4) | structured_policy()


def check_policy(seeds: Seeds, text: str) -> None:
    typed(lambda: IssuancePolicy.loads(text, source="fuzz.toml"), (PolicyError,))


# --------------------------------------------------------------------------- caveats

CAVEAT_KEYS: tuple[str, ...] = ("field", "eq", "ne", "in", "not_in", "le", "lt", "ge", "gt")
CAVEAT_KEYS += ("prefix", "time", "after", "before", "daily", "from", "until", "tz", "days")


def caveat_objects() -> st.SearchStrategy[Any]:
    member = st.sampled_from(CAVEAT_KEYS)
    value = json_values(3) | st.sampled_from(["amount", "to", "a.b", "Europe/Paris", "09:00"])
    return st.dictionaries(member, value, max_size=4) | json_values(3)


def check_caveats(seeds: Seeds, case: tuple[list[Any], bytes]) -> None:
    items, request_bytes = case

    def run() -> object:
        caveats = parse_caveats(items)
        request = load_request(request_bytes)
        return evaluate(caveats, request, now=seeds.now)

    result = typed(run, (PolicyError,))
    assert isinstance(result, Refused | str) or result is None


def caveat_inputs(seeds: Seeds) -> st.SearchStrategy[tuple[list[Any], bytes]]:
    requests = mutated_bytes(dumps(REQUEST)) | json_values(6).map(dumps)
    return st.tuples(st.lists(caveat_objects(), max_size=3), requests)


# --------------------------------------------------------------------------- keys


def key_inputs(seeds: Seeds) -> st.SearchStrategy[Any]:
    did = seeds.owner.did
    jwk = dumps(seeds.owner.jwk())
    return (
        mutated_text(did).map(lambda d: ("did", d))
        | mutated_bytes(jwk).map(lambda j: ("jwk", j.decode("utf-8", "replace")))
        | st.dictionaries(
            st.sampled_from(["kty", "crv", "x", "y", "d", "kid"]), json_values(2)
        ).map(lambda j: ("jwk", j))
    )


def check_keys(seeds: Seeds, case: tuple[str, Any]) -> None:
    kind, value = case
    typed(lambda: from_did_key(value) if kind == "did" else from_jwk(value))


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Target:
    name: str
    inputs: Callable[[Seeds], st.SearchStrategy[Any]]
    check: Callable[[Seeds, Any], None]
    weight: int  # its share of the cases of a run


TARGETS: tuple[Target, ...] = (
    Target("uri", lambda seeds: uri_inputs(), check_uri, 16),
    Target("bundle", bundle_inputs, check_bundle, 12),
    Target("invocation", invocation_inputs, check_invocation, 8),
    Target("revocation", revocation_inputs, check_revocation, 5),
    Target("evidence", evidence_inputs, check_evidence, 10),
    Target("didcomm", envelope_inputs, check_envelope, 12),
    Target("policy", policy_inputs, check_policy, 10),
    Target("caveats", caveat_inputs, check_caveats, 10),
    Target("keys", key_inputs, check_keys, 7),
)
