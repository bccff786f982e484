"""Watching a directory's log for bindings of one's own name that one never made.

Inclusion proofs show a client that what it was given is in the log; only the owner
knows which entries for their name are genuine.  The monitor replays the whole log
against a signed tree head that is consistent with every head this state directory
saw before, and compares every entry naming the owner's name with the owner's own
record of what it published.  A directory that bound the name to another key must
either put that entry in the log (and the monitor sees it) or leave it out (and then
no client accepts it: lookups demand an inclusion proof).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx

from agent.directory.errors import (
    BindingNotPublishedError,
    DirectoryError,
    DirectoryUnreachableError,
    PackageError,
    ProofError,
)
from agent.directory.merkle import (
    HASH_SIZE,
    b64,
    hashes_from_json,
    hashes_to_json,
    leaf_hash,
    root_from_leaf_hashes,
    unb64,
    verify_consistency,
)
from agent.directory.treehead import SeenHeads, TreeHead, verify_tree_head
from janus_hsm.atomic_file import replace_file
from janus_hsm.file_lock import locked_file
from janus_hsm.strictjson import StrictJSONError, canonical_text, loads_object

PAGE = 1000
MAX_AGE_MS = 24 * 3600 * 1000  # a directory signs a fresh head on every request
MAX_FUTURE_MS = 5 * 60 * 1000  # clock skew between the directory and its clients


@dataclass(frozen=True)
class ConsistencyAnswer:
    first: int
    second: int
    first_root: bytes
    second_root: bytes
    proof: list[bytes]


class LogSource(Protocol):
    """What the monitor needs from a directory (HTTP in use, a test double in tests)."""

    def tree_head(self) -> TreeHead: ...

    def entries(self, start: int, end: int) -> list[bytes]: ...

    def consistency(self, first: int, second: int) -> ConsistencyAnswer: ...


# --------------------------------------------------------------------------- over HTTP


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DirectoryUnreachableError(f"the directory's {what} is not a non-negative integer")
    return value


class HttpLogSource:
    """The transparency routes of a directory (docs/directory-formats.md)."""

    def __init__(self, url: str, *, timeout: float = 10) -> None:
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise DirectoryError("the directory URL must be an http(s) URL")
        self.url = url.rstrip("/")
        self._http = httpx.Client(timeout=timeout, follow_redirects=False)

    def close(self) -> None:
        self._http.close()

    def _get(self, path: str, params: dict[str, int] | None = None) -> dict[str, Any]:
        try:
            response = self._http.get(f"{self.url}{path}", params=params)
        except httpx.HTTPError as exc:
            raise DirectoryUnreachableError(
                f"the directory could not be reached: {type(exc).__name__}"
            ) from None
        try:
            body = loads_object(response.content, "the directory's answer")
        except StrictJSONError:
            raise DirectoryUnreachableError(
                f"the directory answered {response.status_code} without a JSON object"
            ) from None
        if response.status_code != 200:
            error = body.get("error")
            error = error if isinstance(error, dict) else {}
            code = str(error.get("code", "error"))[:64]
            message = str(error.get("message", ""))[:300]
            raise DirectoryUnreachableError(f"the directory refused: {code}: {message}")
        return body

    def tree_head(self) -> TreeHead:
        return TreeHead.from_dict(self._get("/v1/dir/tree-head"))

    def entries(self, start: int, end: int) -> list[bytes]:
        body = self._get("/v1/dir/log/entries", {"start": start, "end": end})
        entries, size = body.get("entries"), body.get("tree_size")
        if body.get("start") != start or not isinstance(entries, list) or not isinstance(size, int):
            raise DirectoryUnreachableError("the directory's log entries are malformed")
        if len(entries) != max(0, min(end, size) - start):
            # A short or long page would shift every later index: refuse it rather than
            # check leaves against the wrong positions.
            raise DirectoryUnreachableError(
                "the directory's log entries do not match the range asked for"
            )
        return [
            unb64(leaf, f"log entry {start + i}", error=DirectoryUnreachableError)
            for i, leaf in enumerate(entries)
        ]

    def consistency(self, first: int, second: int) -> ConsistencyAnswer:
        body = self._get("/v1/dir/log/consistency", {"first": first, "second": second})
        return ConsistencyAnswer(
            first=_int(body.get("first"), "first size"),
            second=_int(body.get("second"), "second size"),
            first_root=unb64(body.get("first_root"), "first_root", size=HASH_SIZE),
            second_root=unb64(body.get("second_root"), "second_root", size=HASH_SIZE),
            proof=hashes_from_json(body.get("proof"), "the consistency proof"),
        )


# --------------------------------------------------------------------------- state files


def seen_heads(state_dir: Path) -> SeenHeads:
    """The tree heads every directory command of this agent has accepted."""
    return SeenHeads(Path(state_dir) / "directory" / "seen-heads.json")


def _published_path(state_dir: Path) -> Path:
    return Path(state_dir) / "directory" / "published.json"


def _load_published(path: Path) -> list[dict[str, Any]]:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    try:
        data = loads_object(raw, str(path))
    except StrictJSONError as exc:
        raise DirectoryError(f"the record of published bindings is damaged: {exc}") from None
    entries = data.get("published")
    if data.get("version") != 1 or not isinstance(entries, list):
        raise DirectoryError(f"{path} is not a record of published bindings")
    return [e for e in entries if isinstance(e, dict)]


def record_published(
    state_dir: Path, directory_key: str, name: str, leaf: bytes, leaf_index: int
) -> None:
    """Remember a log entry this owner made (after the directory answered a publish)."""
    path = _published_path(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked_file(path.with_name(path.name + ".lock")):
        entries = _load_published(path)
        entry = {
            "directory": directory_key,
            "name": name,
            "leaf": b64(leaf),
            "leaf_index": leaf_index,
        }
        if entry not in entries:
            entries.append(entry)
        data = {"version": 1, "published": entries}
        replace_file(path, canonical_text(data).encode("utf-8") + b"\n")


def published(state_dir: Path, directory_key: str, name: str) -> dict[int, bytes]:
    """The entries this owner made for ``name`` at this directory, by log index."""
    found: dict[int, bytes] = {}
    for entry in _load_published(_published_path(state_dir)):
        if entry.get("directory") != directory_key or entry.get("name") != name:
            continue
        index = entry.get("leaf_index")
        if isinstance(index, int) and not isinstance(index, bool) and index >= 0:
            found[index] = unb64(entry.get("leaf"), "a published leaf", error=DirectoryError)
    return found


# --------------------------------------------------------------------------- checks


def verified_head(
    source: LogSource,
    seen: SeenHeads,
    *,
    expected_key: str | None = None,
    now_ms: int | None = None,
    max_age_ms: int = MAX_AGE_MS,
    max_future_ms: int = MAX_FUTURE_MS,
) -> TreeHead:
    """The directory's current head: signed, fresh, and one history with all seen before."""
    head = source.tree_head()
    verify_tree_head(
        head,
        expected_key=expected_key,
        now_ms=now_ms,
        max_age_ms=max_age_ms,
        max_future_ms=max_future_ms,
    )

    def fetch(first: int, second: int) -> list[bytes]:
        answer = source.consistency(first, second)
        if (answer.first, answer.second) != (first, second):
            raise ProofError("the directory answered a consistency proof for other sizes")
        return answer.proof

    seen.accept(head.key, head, fetch)
    return head


def consistency_report(
    source: LogSource, first: int, second: int, *, seen: SeenHeads | None = None
) -> dict[str, Any]:
    """What ``janus dir consistency --json`` prints, verified before it is shown.

    The proof is checked against the roots the directory gives (RFC 9162 §2.1.4.2), and
    the second root against its signed head when the sizes match; with ``seen``, that
    head must also be consistent with every head accepted before.
    """
    for value, what in ((first, "--from"), (second, "--to")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ProofError(f"{what} must be a non-negative tree size")
    if first > second:
        raise ProofError("--from must not be larger than --to")
    head = verified_head(source, seen) if seen is not None else source.tree_head()
    if second > head.tree_size:
        raise ProofError(f"the directory's log has only {head.tree_size} entries")
    answer = source.consistency(first, second)
    if (answer.first, answer.second) != (first, second):
        raise ProofError("the directory answered a consistency proof for other sizes")
    verify_consistency(first, second, answer.first_root, answer.second_root, answer.proof)
    if second == head.tree_size and answer.second_root != head.root_hash:
        raise ProofError("the directory's root for that size is not the one it signed")
    return {
        "from": first,
        "to": second,
        "first_root": b64(answer.first_root),
        "second_root": b64(answer.second_root),
        "proof": hashes_to_json(answer.proof),
        "tree_head": head.to_dict(),
    }


def _entry(leaf: bytes) -> tuple[str, str] | None:
    """(name, root did) of a binding entry; None for bytes that are not one."""
    from agent.directory.keypackage import BindingLeaf

    try:
        parsed = BindingLeaf.parse(leaf)
    except PackageError:
        return None
    return parsed.name, parsed.root


@dataclass
class MonitorReport:
    name: str
    directory: str
    tree_head: TreeHead
    entries: int
    bindings: list[int] = field(default_factory=list)
    unreadable: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "directory": self.directory,
            "tree_head": self.tree_head.to_dict(),
            "entries_checked": self.entries,
            "bindings": self.bindings,
            "unreadable_entries": self.unreadable,
            "ok": True,
        }


def read_log(source: LogSource, head: TreeHead, *, page: int = PAGE) -> list[bytes]:
    """Every entry of the log up to ``head``, checked to hash to its signed root."""
    leaves: list[bytes] = []
    while len(leaves) < head.tree_size:
        start = len(leaves)
        end = min(start + page, head.tree_size)
        got = source.entries(start, end)
        if not got or len(got) > end - start:
            raise ProofError(f"the directory served a wrong number of entries from {start}")
        leaves.extend(got)
    if root_from_leaf_hashes([leaf_hash(leaf) for leaf in leaves]) != head.root_hash:
        raise ProofError("the directory's log entries do not hash to the root it signed")
    return leaves


def monitor(
    source: LogSource,
    name: str,
    state_dir: Path,
    *,
    expected_key: str | None = None,
    now_ms: int | None = None,
    max_age_ms: int = MAX_AGE_MS,
    max_future_ms: int = MAX_FUTURE_MS,
    page: int = PAGE,
    owner_roots: frozenset[str] = frozenset(),
) -> MonitorReport:
    """Check that every entry for ``name`` in the directory's log is one this owner made.

    An entry is the owner's when the owner recorded publishing exactly it
    (:func:`record_published`) or, for entries made before that record existed, when
    its root is one of ``owner_roots`` (packages are signed by that root, so nobody
    else can have made a package for it).
    Raises BindingNotPublishedError listing the foreign entries (and the owner's own
    entries the log lost), EquivocationError if the head contradicts one seen before,
    ProofError if the entries do not hash to the signed root.
    """
    head = verified_head(
        source,
        seen_heads(state_dir),
        expected_key=expected_key,
        now_ms=now_ms,
        max_age_ms=max_age_ms,
        max_future_ms=max_future_ms,
    )
    leaves = read_log(source, head, page=page)
    mine = published(state_dir, head.key, name)
    report = MonitorReport(name=name, directory=head.key, tree_head=head, entries=len(leaves))
    problems: list[dict[str, object]] = []
    for index, leaf in enumerate(leaves):
        entry = _entry(leaf)
        if entry is None:
            report.unreadable.append(index)
        elif entry[0] == name:
            report.bindings.append(index)
            if mine.get(index) != leaf and entry[1] not in owner_roots:
                problems.append(
                    {"problem": "not_published", "leaf_index": index, "leaf": b64(leaf)}
                )
    for index, leaf in sorted(mine.items()):
        if index >= len(leaves) or leaves[index] != leaf:
            problems.append({"problem": "missing", "leaf_index": index, "leaf": b64(leaf)})
    if problems:
        foreign = sum(1 for p in problems if p["problem"] == "not_published")
        lost = len(problems) - foreign
        raise BindingNotPublishedError(
            f"the directory's log has {foreign} entr{'y' if foreign == 1 else 'ies'} for "
            f"{name} that this owner did not publish and lost {lost} that it did",
            entries=problems,
        )
    return report
