"""Fixtures shared by the cloud-agent tests: an owner's edge agent on the session token."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.cloud.process import CloudProcess
from agent.edge.agent import EdgeAgent
from hardware.softhsm import SoftHSMToken


@pytest.fixture(scope="module")
def edge(softhsm_token: SoftHSMToken, tmp_path_factory: pytest.TempPathFactory) -> EdgeAgent:
    """An edge agent whose root is a fresh key on the session's SoftHSM token (per module)."""
    agent, _ = EdgeAgent.init(tmp_path_factory.mktemp("edge"), softhsm_token.uri())
    return agent


def receiving_process(
    edge: EdgeAgent, tmp_path_factory: pytest.TempPathFactory, name: str, *extra: str
) -> Iterator[CloudProcess]:
    """A real ``janus cloud serve --receiving`` process for ``edge``, stopped afterwards."""
    process = CloudProcess(
        tmp_path_factory.mktemp(name), owner=edge.did, extra_args=["--receiving", *extra]
    )
    try:
        yield process
    finally:
        process.stop()
