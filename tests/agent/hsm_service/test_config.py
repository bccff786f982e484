"""The configuration file: the documented example loads, every mistake is refused at
start-up with the file and the field named, and no PIN is ever echoed."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from agent.hsm_service.config import load_config, parse_config
from agent.hsm_service.engine import HsmEngine
from agent.hsm_service.errors import ConfigError
from hardware.softhsm import SoftHSMToken
from tests.agent.hsm_service.conftest import ConfigWriter

ROOT = Path(__file__).resolve().parents[3]


def test_a_valid_configuration_reads_as_written(
    write_config: ConfigWriter, clients: dict[str, str], tmp_path: Path
) -> None:
    path = write_config(
        {
            "hsm-sign": {
                "operations": ["sign", "destroy"],
                "clients": [clients["alice-app"], clients["bob-app"]],
                "max-uses": 10,
                "rate": {"count": 5, "per-seconds": 60},
                "quorum": {"m": 2, "approvers": ["alice", "bob", "carol"]},
                "state": "pre-active",
            }
        },
        extra={
            "policy-changes": {"quorum": {"m": 2, "approvers": ["alice", "bob", "carol"]}},
            "p11kit": {"clients": [{"uid": 0, "client": clients["alice-app"]}]},
        },
    )
    config = load_config(path)
    key = config.keys["hsm-sign"]
    assert key.operations == {"sign", "destroy"} and key.max_uses == 10
    assert key.rate is not None and (key.rate.count, key.rate.per_seconds) == (5, 60)
    assert key.quorum is not None and key.quorum.m == 2 and len(key.quorum.approvers) == 3
    assert key.state == "pre-active" and key.token == "main"
    assert config.policy_quorum is not None and config.policy_quorum.m == 2
    assert config.p11kit_clients[0].uid == 0
    assert config.service.state_dir == tmp_path / "state"
    assert {a.id for a in config.approvers} == {"alice", "bob", "carol"}


def _example(doc: str) -> str:
    """The complete example in docs/hsm-service.md."""
    match = re.search(r"<!-- config-example -->\n```toml\n(.*?)```", doc, re.S)
    assert match is not None, "docs/hsm-service.md lost its complete config example"
    return match.group(1)


def test_the_documented_example_is_a_valid_configuration(tmp_path: Path) -> None:
    from policies.approvals import Approver, ApproverSet
    from tests.agent.hsm_service.conftest import make_operator

    text = _example((ROOT / "docs" / "hsm-service.md").read_text())
    approvers = ApproverSet(
        tuple(
            Approver(n, o.approver.credential_id, o.approver.key, o.approver.rp_id)
            for n, o in ((n, make_operator(n)) for n in ("alice", "bob", "carol"))
        )
    )
    approvers_path = re.search(r'approvers = "([^"]+)"', text)
    assert approvers_path is not None
    # The example's paths, moved under tmp_path.
    text = text.replace("/etc/janus-hsm/", f"{tmp_path}/").replace(
        "/var/lib/janus-hsm", f"{tmp_path}/state"
    )
    approvers.save(tmp_path / Path(approvers_path.group(1)).name)
    config = parse_config(text, source="docs/hsm-service.md")
    assert config.keys and config.policy_quorum is not None and config.tokens


BAD: list[tuple[str, dict[str, Any], str, str]] = [
    # (id, write_config arguments, the field named, words of the message)
    ("unknown-section", {"extra": {"keys": {"a": 1}}}, "keys", "unknown field"),
    ("unknown-service-field", {"service": {"state_dir": "/x"}}, "service.state_dir", "unknown"),
    (
        "unknown-key-field",
        {"keys": {"hsm-sign": {"max_use": 1}}},
        "key.hsm-sign.max_use",
        "unknown",
    ),
    (
        "unknown-quorum-field",
        {"keys": {"hsm-sign": {"quorum": {"m": 1, "approvers": ["alice"], "n": 3}}}},
        "key.hsm-sign.quorum.n",
        "unknown",
    ),
    (
        "quorum-m-zero",
        {"keys": {"hsm-sign": {"quorum": {"m": 0, "approvers": ["alice"]}}}},
        "key.hsm-sign.quorum.m",
        "at least 1",
    ),
    (
        "quorum-m-negative",
        {"extra": {"policy-changes": {"quorum": {"m": -1, "approvers": ["alice"]}}}},
        "policy-changes.quorum.m",
        "at least 1",
    ),
    (
        "quorum-m-above-n",
        {"keys": {"hsm-sign": {"quorum": {"m": 3, "approvers": ["alice", "bob"]}}}},
        "key.hsm-sign.quorum.m",
        "3 approvals out of 2",
    ),
    (
        "unknown-approver",
        {"keys": {"hsm-sign": {"quorum": {"m": 1, "approvers": ["mallory"]}}}},
        "key.hsm-sign.quorum.approvers[0]",
        "not in the approver registry",
    ),
    (
        "same-approver-twice",
        {"keys": {"hsm-sign": {"quorum": {"m": 2, "approvers": ["alice", "alice"]}}}},
        "key.hsm-sign.quorum.approvers",
        "twice",
    ),
    (
        "unknown-token",
        {"keys": {"hsm-sign": {"uri": "pkcs11:token=elsewhere;object=hsm-sign"}}},
        "key.hsm-sign.uri",
        "no [[token]] declares",
    ),
    (
        "pin-in-key-uri",
        {"keys": {"hsm-sign": {"uri": "pkcs11:object=hsm-sign?pin-source=file:/p"}}},
        "key.hsm-sign.uri",
        "query attributes",
    ),
    ("bad-state", {"keys": {"hsm-sign": {"state": "retired"}}}, "key.hsm-sign.state", "one of"),
    (
        "bad-operation",
        {"keys": {"hsm-sign": {"operations": ["sign", "export"]}}},
        "key.hsm-sign.operations[1]",
        "unknown operation",
    ),
    (
        "bad-client",
        {"keys": {"hsm-sign": {"clients": ["alice"]}}},
        "key.hsm-sign.clients[0]",
        "not a did:key",
    ),
    (
        "negative-max-uses",
        {"keys": {"hsm-sign": {"max-uses": -1}}},
        "key.hsm-sign.max-uses",
        "at least 0",
    ),
    (
        "zero-rate-window",
        {"keys": {"hsm-sign": {"rate": {"count": 1, "per-seconds": 0}}}},
        "key.hsm-sign.rate.per-seconds",
        "at least 1",
    ),
    (
        "generate-without-algorithm",
        {"keys": {"hsm-sign": {"operations": ["generate"]}}},
        "key.hsm-sign.algorithm",
        "required",
    ),
    (
        "local-date",
        {"keys": {"hsm-sign": {"activation-date": "2027-01-01T00:00:00"}}},
        "key.hsm-sign.activation-date",
        "needs a UTC offset",
    ),
    (
        "bad-pin-source",
        {"extra": {}, "pin_source": "1234"},
        "token[0].pin-source",
        "env:NAME or file:",
    ),
    (
        "bad-audit-sync",
        {"service": {"audit-sync": "normal"}},
        "service.audit-sync",
        '"full" (the default) or "os"',
    ),
    (
        "bad-administrator",
        {"service": {"administrators": ["root"]}},
        "service.administrators[0]",
        "did:key",
    ),
    (
        "duplicate-p11kit-uid",
        {
            "extra": {
                "p11kit": {
                    "clients": [
                        {"uid": 5, "client": "ALICE"},
                        {"uid": 5, "client": "ALICE"},
                    ]
                }
            }
        },
        "p11kit.clients[1].uid",
        "mapped twice",
    ),
]


@pytest.mark.parametrize(
    ("arguments", "field", "words"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_each_configuration_error_is_named(
    write_config: ConfigWriter,
    clients: dict[str, str],
    arguments: dict[str, Any],
    field: str,
    words: str,
) -> None:
    arguments = dict(arguments)
    pin_source = arguments.pop("pin_source", None)
    keys = arguments.pop("keys", {"hsm-sign": {}})
    path = write_config(keys, **arguments)
    text = path.read_text().replace('"ALICE"', f'"{clients["alice-app"]}"')
    if pin_source is not None:
        text = re.sub(r'pin-source = "[^"]*"', f'pin-source = "{pin_source}"', text)
    if "local-date" in field or "activation-date" in field:
        text = text.replace('"2027-01-01T00:00:00"', "2027-01-01T00:00:00")
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.field == field, str(caught.value)
    assert caught.value.source == str(path)
    assert words in str(caught.value)
    assert caught.value.code == "bad_hsm_config"
    assert "1234" not in str(caught.value)  # a PIN typed in the wrong place is not echoed


def test_structure_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not UTF-8"):
        parse_config(b"[service]\nname = '\xff'\n", source="t.toml")
    missing = tmp_path / "absent.toml"
    with pytest.raises(ConfigError, match="cannot read") as unreadable:
        load_config(missing)
    assert unreadable.value.source == str(missing)
    for text, field, words in (
        ("[service\n", "", "not valid TOML"),
        ("[token]\nmodule = 1\n", "service", "required"),
        ('[service]\nname = "x"\n', "service.state-dir", "required"),
        ('[service]\nstate-dir = "s"\n[key]\nx = 1\n', "key.x", "must be a table"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(text, source="t.toml", base=tmp_path)
        assert caught.value.field == field and words in str(caught.value), str(caught.value)


def test_a_key_missing_from_its_token_is_refused_at_start(
    write_config: ConfigWriter, hsm_token: SoftHSMToken
) -> None:
    config = load_config(write_config({"hsm-gone": {}}))
    with pytest.raises(ConfigError) as caught:
        HsmEngine.open(config, sign_heads=False)
    assert caught.value.field == "key.hsm-gone.uri" and "no such key" in str(caught.value)
    # …and the state directory is free again for the next start.
    config = load_config(write_config({"hsm-sign": {}}))
    HsmEngine.open(config, sign_heads=False).close()


def test_an_audit_head_key_missing_from_its_token_is_refused(
    write_config: ConfigWriter, hsm_token: SoftHSMToken
) -> None:
    path = write_config(
        {"hsm-sign": {}},
        service={"audit-head-key": f"pkcs11:token={hsm_token.label};object=nowhere"},
    )
    with pytest.raises(ConfigError) as caught:
        HsmEngine.open(load_config(path), sign_heads=False)
    assert caught.value.field == "service.audit-head-key"


def test_one_service_per_state_directory(write_config: ConfigWriter) -> None:
    config = load_config(write_config({"hsm-sign": {}}))
    with HsmEngine.open(config, sign_heads=False):
        with pytest.raises(ConfigError) as caught:
            HsmEngine.open(config, sign_heads=False)
        assert caught.value.field == "service.state-dir"
