"""One reading of a database URL: the ledger and the cloud agent's store share a file."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.cloud.store import CloudStore
from agent.errors import ConfigurationError
from janus_hsm.database_url import DatabaseURLError, parse_database_url, sqlite_url
from policies.errors import FormatError
from policies.ledger import open_ledger


def tables(path: Path) -> set[str]:
    conn = sqlite3.connect(path)
    try:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        conn.close()


@pytest.mark.parametrize("spelling", ["sqlite://{}", "sqlite:///{}", "{}"])
def test_ledger_and_store_open_the_same_file(tmp_path: Path, spelling: str) -> None:
    path = tmp_path / "a b.db"
    url = spelling.format(str(path).replace(" ", "%20") if "sqlite" in spelling else path)
    store = CloudStore(url)
    store.add_grant("g1", "soft:object=k", "did:key:z6Mk")
    with open_ledger(url) as ledger:
        ledger.record_grant("cap", {})
    assert {"cloud_grants", "janus_audit"} <= tables(path)
    assert not (tmp_path / "a%20b.db").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".db") == ["a b.db"]


@pytest.mark.parametrize(
    ("url", "kind", "target"),
    [
        ("sqlite:///var/x%20y.db", "sqlite", "/var/x y.db"),
        ("sqlite:////var/x.db", "sqlite", "/var/x.db"),
        ("ledger.db", "sqlite", "ledger.db"),
        ("postgresql://u@h/db", "postgresql", "postgresql://u@h/db"),
        ("postgres://u@h/db?sslmode=require", "postgresql", "postgres://u@h/db?sslmode=require"),
    ],
)
def test_forms(url: str, kind: str, target: str) -> None:
    parsed = parse_database_url(url)
    assert (parsed.kind, parsed.target) == (kind, target)


@pytest.mark.parametrize(
    "url",
    ["", "sqlite://host/x.db", "sqlite:x.db", "sqlite:///", "sqlite:///x.db?mode=ro",
     ":memory:", "mysql://u@h/db", "postgresql:u:s3cret@h", "sqlite://[::1/x"],
)  # fmt: skip
def test_refusals_are_typed_in_every_store(url: str) -> None:
    with pytest.raises(DatabaseURLError) as refused:
        parse_database_url(url)
    assert "s3cret" not in str(refused.value)
    with pytest.raises(FormatError):
        open_ledger(url)
    with pytest.raises(ConfigurationError):
        CloudStore(url)


@pytest.mark.parametrize("name", ["plain", "a b", "a%20b", "x#y", "q?z", "pct%"])
def test_a_state_dir_of_any_name_gives_one_database(tmp_path: Path, name: str) -> None:
    """The cloud agent's default URL is built from its state directory: it must read
    back as that directory's file, in the ledger and in the store alike."""
    from agent.cloud.service import CloudConfig

    state = tmp_path / name
    state.mkdir()
    url = CloudConfig(state_dir=state, passphrase_source=lambda: "x").database_url
    assert parse_database_url(url).target == str(state.resolve() / "cloud.db")
    store = CloudStore(url)
    store.add_grant("g1", "soft:object=k", "did:key:z6Mk")
    with open_ledger(url) as ledger:
        ledger.record_grant("cap", {})
    assert {"cloud_grants", "janus_audit"} <= tables(state / "cloud.db")
    assert [p.name for p in tmp_path.rglob("*.db")] == ["cloud.db"]


def test_sqlite_url_needs_an_absolute_path() -> None:
    with pytest.raises(DatabaseURLError):
        sqlite_url("relative.db")
