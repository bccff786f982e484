"""Bundle's dict form: the same bundle as its text, refused exactly where parse refuses."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from janus_hsm.algorithms import Algorithm
from janus_hsm.provider import KeyHandle
from policies import issue
from policies.abilities import Ability
from policies.capability import BUNDLE_TYP, MAX_BUNDLE_BYTES, Bundle
from policies.errors import ChainLimitError, FormatError, PolicyError
from policies.policy import IssuancePolicy
from tests.policies.keys import software_keys

NOW = 1_800_000_000
POLICY = IssuancePolicy.loads(
    """
version = 1
[[rule]]
name = "tests"
audiences = ["*"]
abilities = [{ can = "*", with = "*" }]
max_ttl = "1d"
max_uses = "unlimited"
max_depth = 9
require = []
"""
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyHandle]:
    directory: Path = tmp_path_factory.mktemp("bundle-dict")
    return software_keys(
        directory, {"root": Algorithm.ES256, "a": Algorithm.EdDSA, "b": Algorithm.EdDSA}
    )


@pytest.fixture(scope="module")
def bundle(keys: dict[str, KeyHandle]) -> Bundle:
    first = issue.grant(
        keys["root"],
        audience=keys["a"].did,
        abilities=[Ability("janus:payments/*", "sign/*", ({"field": "amount", "le": 9},))],
        ttl_seconds=600,
        uses=5,
        depth=1,
        now=NOW,
        policy=POLICY,
    )
    return issue.grant(
        keys["a"],
        audience=keys["b"].did,
        abilities=[Ability("janus:payments/eur", "sign/payment")],
        ttl_seconds=300,
        uses=2,
        proof=first,
        now=NOW,
        policy=POLICY,
    )


def test_dict_form_round_trips_like_the_text(bundle: Bundle) -> None:
    as_dict = bundle.to_dict()
    assert as_dict == json.loads(bundle.to_json())
    assert json.dumps(as_dict, indent=1) == bundle.to_json()
    again = Bundle.from_dict(as_dict)
    assert again == bundle == Bundle.parse(bundle.to_json())
    assert [c.id for c in again.chain] == [c.id for c in bundle.chain]
    # A dict that travelled through JSON (an HTTP body) is the same bundle too.
    assert Bundle.from_dict(json.loads(json.dumps({"b": as_dict}))["b"]) == bundle


def _outcome(fn: Any, arg: Any) -> tuple[str, str] | Bundle:
    try:
        return fn(arg)  # type: ignore[no-any-return]
    except PolicyError as exc:
        return type(exc).__name__, exc.code


def _malformed(bundle: Bundle) -> list[Any]:
    chain = [c.compact for c in bundle.chain]
    return [
        {},
        [],
        "text",
        None,
        {"typ": BUNDLE_TYP},
        {"chain": chain},
        {"typ": "janus-bundle/2", "chain": chain},
        {"typ": BUNDLE_TYP, "chain": chain, "extra": 1},
        {"typ": BUNDLE_TYP, "chain": "a.b.c"},
        {"typ": BUNDLE_TYP, "chain": [1]},
        {"typ": BUNDLE_TYP, "chain": [None]},
        {"typ": BUNDLE_TYP, "chain": []},
        {"typ": BUNDLE_TYP, "chain": ["a.b.c"]},
        {"typ": BUNDLE_TYP, "chain": [chain[0] + ".", chain[1]]},
        {"typ": BUNDLE_TYP, "chain": chain * 6},  # 12 links
        {"typ": BUNDLE_TYP, "chain": ["x" * (MAX_BUNDLE_BYTES + 1)]},
    ]


def test_dict_form_refuses_what_parse_refuses(bundle: Bundle) -> None:
    for obj in _malformed(bundle):
        from_dict = _outcome(Bundle.from_dict, obj)
        parsed = _outcome(Bundle.parse, json.dumps(obj))
        if not isinstance(obj, dict):
            # parse reads only objects from text; the dict form refuses the rest alike.
            assert from_dict == ("FormatError", FormatError.code), obj
            continue
        assert not isinstance(from_dict, Bundle), obj
        assert from_dict == parsed, obj


def test_dict_form_measures_the_size_of_its_rendering(bundle: Bundle) -> None:
    """A chain that fits in compact text but not as to_json renders it is refused."""
    short = {"typ": BUNDLE_TYP, "chain": ["x" * (MAX_BUNDLE_BYTES - 40)]}
    assert len(json.dumps(short, separators=(",", ":"))) <= MAX_BUNDLE_BYTES
    with pytest.raises(ChainLimitError):
        Bundle.from_dict(short)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    typ=st.sampled_from([BUNDLE_TYP, "janus-bundle/0", None]),
    chain=st.one_of(_json_values, st.lists(st.text(max_size=30), max_size=3)),
    extra=st.dictionaries(st.sampled_from(["x", "typ2"]), _json_values, max_size=1),
)
def test_dict_form_and_text_agree_on_any_object(typ: Any, chain: Any, extra: Any) -> None:
    obj: dict[str, Any] = {**extra, "chain": chain}
    if typ is not None:
        obj["typ"] = typ
    from_dict = _outcome(Bundle.from_dict, obj)
    assert not isinstance(from_dict, Bundle)  # none of these is a signed chain
    assert from_dict == _outcome(Bundle.parse, json.dumps(obj))
