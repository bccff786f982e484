"""The cloud agent's own OpenAPI description, turned against it by Schemathesis.

A real ``janus cloud serve`` process on 127.0.0.1 publishes /openapi.json; Schemathesis
reads it and sends each operation bodies, paths and headers generated from the schemas
(both conforming and not).  No answer may be a 5xx, and the agent must still be healthy
and serving afterwards.  Bounded by ``max_examples`` per operation and mode
(SCHEMATHESIS_EXAMPLES, default 60).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.generation.modes import GenerationMode

from agent.cloud.process import CloudProcess
from tests.fuzz.seeds import software_keys

EXAMPLES = int(os.environ.get("SCHEMATHESIS_EXAMPLES", "60"))


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CloudProcess]:
    keys: Path = tmp_path_factory.mktemp("openapi-owner")
    owner = software_keys(keys)["owner"]
    process = CloudProcess(
        tmp_path_factory.mktemp("openapi-cloud"),
        owner=owner.did,
        extra_args=["--receiving", "--sending"],  # their routes are fuzzed too
    )
    yield process
    # Healthy afterwards: still answering, and still able to do real work.
    health = httpx.get(f"{process.url}/healthz", timeout=10)
    did = httpx.get(f"{process.url}/v1/did", timeout=10)
    process.stop()
    log = process.log_path.read_text(errors="replace")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert did.status_code == 200 and did.json()["owner"] == owner.did
    assert "Traceback" not in log, log[-3000:]


@pytest.mark.timeout(300)
def test_no_operation_answers_5xx(cloud: CloudProcess) -> None:
    """Each operation, with data that fits its schema and data that does not."""
    schema = schemathesis.openapi.from_url(f"{cloud.url}/openapi.json")
    results = list(schema.get_all_operations())
    operations = [result.ok() for result in results if isinstance(result, Ok)]
    assert len(operations) == len(results), "the agent's OpenAPI description is invalid"
    assert len(operations) >= 10, "the agent describes fewer operations than it serves"
    calls = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            @given(operation.as_strategy(generation_mode=mode))
            def call(case: schemathesis.Case[Any]) -> None:
                nonlocal calls
                calls += 1
                case.call_and_validate(base_url=cloud.url, checks=[not_a_server_error], timeout=30)

            try:
                call()
            except Unsatisfiable:
                # No way to break the schema of an operation without parameters or body.
                assert mode is GenerationMode.NEGATIVE, operation.label
    assert calls >= len(operations)
