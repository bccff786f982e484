"""Valid inputs for every parser, made once with real keys, for the fuzzer to damage.

The keys are software-keystore keys (real KeyHandles, files in a temporary directory):
the fuzzer verifies millions of signatures and must not need a token to do it.  The
same seeds serve the pytest version (tests/fuzz/test_fuzz.py) and the long run
(tests/fuzz/driver.py).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.didcomm import Message, pack_anoncrypt, pack_authcrypt, pack_signed
from janus_hsm.algorithms import Algorithm
from janus_hsm.backends.software import SoftwareProvider
from janus_hsm.provider import KeyHandle
from janus_hsm.public_keys import b64url_encode
from policies import issue
from policies.abilities import Ability
from policies.capability import Bundle
from policies.invocation import invoke
from policies.jws import canonical_json
from policies.policy import IssuancePolicy

ROOT_DIR = Path(__file__).resolve().parents[2]
PASSPHRASE = "fuzz seeds"
PAYMENTS = Ability(
    "janus:payments/eur",
    "sign/payment",
    ({"field": "amount", "le": 10000}, {"field": "currency", "eq": "EUR"}),
)
REQUEST: dict[str, Any] = {"amount": 1200, "currency": "EUR", "to": "alice"}
OPEN_POLICY = IssuancePolicy.loads(
    """
version = 1
[[rule]]
name = "fuzz"
audiences = ["*"]
abilities = [{ can = "*", with = "*" }]
max_ttl = "1d"
max_uses = "unlimited"
max_depth = 9
require = []
"""
)


@dataclass
class Seeds:
    """Keys and one valid instance of each signed format, all mutually consistent."""

    directory: Path
    keys: dict[str, KeyHandle]
    now: int
    bundle: Bundle
    invocation: str
    evidence: dict[str, Any]
    message: Message
    envelopes: dict[str, str]
    policy_text: str
    cache: dict[str, object] = field(default_factory=dict)  # e.g. a target's running agent

    @property
    def owner(self) -> KeyHandle:
        return self.keys["owner"]

    @property
    def bundle_text(self) -> str:
        return self.bundle.to_json()

    @property
    def compacts(self) -> frozenset[str]:
        return frozenset(c.compact for c in self.bundle.chain)


def software_keys(directory: Path) -> dict[str, KeyHandle]:
    provider = SoftwareProvider.open(
        f"soft:dir={directory}", passphrase_source=lambda: PASSPHRASE, allow_extractable=True
    )
    wanted = {
        "owner": Algorithm.ES256,
        "cloud": Algorithm.EdDSA,
        "worker": Algorithm.ES256,
        "x25519": Algorithm.X25519,
        "sender": Algorithm.X25519,
        "p256": Algorithm.ES256,
        "signer": Algorithm.EdDSA,
    }
    handles = {name: provider.generate(provider.key_uri(name), alg) for name, alg in wanted.items()}
    for handle in handles.values():
        handle.unlock()  # once: the fuzzer signs and decrypts with them many times
    keys: dict[str, KeyHandle] = dict(handles)
    return keys


def make_seeds(directory: Path) -> Seeds:
    keys = software_keys(directory)
    now = int(time.time())
    root = issue.grant(
        keys["owner"],
        audience=keys["cloud"].did,
        abilities=[Ability("janus:payments/*", "sign/*")],
        ttl_seconds=86_400,
        uses=1_000_000,
        depth=2,
        now=now - 60,
        policy=OPEN_POLICY,
    )
    bundle = issue.grant(
        keys["cloud"],
        audience=keys["worker"].did,
        abilities=[PAYMENTS],
        ttl_seconds=80_000,
        uses=1_000_000,
        proof=root,
        now=now - 30,
        policy=OPEN_POLICY,
    )
    invocation = invoke(
        keys["worker"],
        capability_id=bundle.leaf.id,
        action="sign/payment",
        resource="janus:payments/eur",
        request=REQUEST,
        now=now - 10,
        lifetime=300,
    )
    evidence = {
        "typ": "janus-evidence/1",
        "payload": dict(REQUEST),
        "signer": keys["worker"].did,
        "alg": keys["worker"].algorithm.value,
        "signature": b64url_encode(keys["worker"].sign(canonical_json(REQUEST))),
        "invocation": invocation,
        "bundle": json.loads(bundle.to_json()),
    }
    message = Message(
        id=str(uuid.uuid4()),
        type="https://janus.dev/messages/1.0/note",
        body={"text": "fuzz seed", "n": 1},
        to=(keys["x25519"].did,),
        from_=keys["sender"].did,
    )
    plain_to = Message(id=message.id, type=message.type, body=message.body, to=message.to)
    signed_message = Message(
        id=message.id,
        type=message.type,
        body=message.body,
        to=message.to,
        from_=keys["signer"].did,
    )
    envelopes = {
        "anoncrypt": pack_anoncrypt(plain_to, [keys["x25519"].did]),
        "authcrypt": pack_authcrypt(message, [keys["x25519"].did], keys["sender"]),
        "signed": pack_signed(signed_message, keys["signer"]),
        "plaintext": plain_to.to_json(),
    }
    policy_text = (ROOT_DIR / "docs" / "examples" / "policy.toml").read_text()
    return Seeds(
        directory, keys, now, bundle, invocation, evidence, message, envelopes, policy_text
    )
