"""The edge agent collects a grant's approvals through the same library as `janus grant`
(policies.approval_collection), given explicit parameters rather than CLI arguments."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from hardware.softhsm import SoftHSMToken
from policies.abilities import Ability
from policies.approval_collection import ApprovalSources
from policies.approval_log import FILE_NAME as USED_APPROVALS
from policies.capability import Bundle
from policies.errors import PolicyViolationError
from tests.agent.test_cli_fido2 import Cli

POLICY = """
version = 1

[[rule]]
name = "approved-payments"
audiences = ["*"]
abilities = [{ can = "sign/payment", with = "janus:payments/*" }]
max_ttl = "1h"
max_uses = 10
require = ["pin", "approval"]
approvals = 2
"""
PAYMENTS = Ability("janus:payments/eur", "sign/payment")


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    return Cli(tmp_path, capsys, monkeypatch)


@pytest.fixture
def edge(cli_token: SoftHSMToken, tmp_path: Path, key_name: str) -> Iterator[EdgeAgent]:
    state = tmp_path / "edge"
    EdgeAgent.init(state, cli_token.uri(), name=key_name)
    (state / "policy.toml").write_text(POLICY)
    yield EdgeAgent.open(state)


def test_edge_grant_collects_approvals_with_explicit_sources(
    cli: Cli, edge: EdgeAgent, tmp_path: Path
) -> None:
    cli.register_approvers("alice", "bob")
    cloud = CloudProcess(tmp_path / "cloud", owner=edge.did)
    try:
        with pytest.raises(PolicyViolationError, match="requires approval before the key signs"):
            edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=2)
        prompts: list[str] = []
        sources = ApprovalSources(registry_dir=cli.registry, from_devices=True, say=prompts.append)
        cli.connect("alice")
        with pytest.raises(PolicyViolationError, match="1 valid approval"):
            edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=2, approvals=sources)
        cli.connect("alice", "bob")
        granted = edge.grant(cloud.url, [PAYMENTS], ttl_seconds=600, uses=2, approvals=sources)
    finally:
        cloud.stop()
    assert granted["status"] == "active"
    leaf = Bundle.parse(json.dumps(edge.granted(granted["grant_id"])["bundle"])).leaf
    approvals = leaf.evidence["approvals"]  # type: ignore[index]
    assert sorted(a["approver_id"] for a in approvals) == ["alice", "bob"]
    assert any("approve this grant" in p for p in prompts)
    assert (cli.registry / USED_APPROVALS).exists()  # each approval good for one grant


def test_a_grant_the_policy_refuses_leaves_no_key_at_the_cloud_agent(
    edge: EdgeAgent, tmp_path: Path
) -> None:
    cloud = CloudProcess(tmp_path / "cloud", owner=edge.did)
    try:
        for abilities, ttl, says in (
            ([PAYMENTS], 7200, "ttl"),  # longer than the rule allows
            ([Ability("janus:mailbox", "msg/receive")], 600, "no rule allows"),
        ):
            with pytest.raises(PolicyViolationError, match=says) as refused:
                edge.grant(cloud.url, abilities, ttl_seconds=ttl, uses=2)
            assert "policy.toml: edit it" in str(refused.value)
    finally:
        cloud.stop()
    with contextlib.closing(sqlite3.connect(tmp_path / "cloud" / "cloud.db")) as db:
        assert db.execute("SELECT count(*) FROM cloud_grants").fetchone() == (0,)
