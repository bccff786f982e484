"""The owner's intro addresses published at directories, as the state directory keeps them.

``janus dir publish`` makes one intro address per (directory, name) at a receiving
service, an address that takes first messages only with that directory's contact
capability, and records it here; ``janus rel receive`` picks up from every one and
takes a first message there as a relationship request.  One 0600 JSON file each in
``<state-dir>/directory/``: ``{"version": 1, "directory": did:key, "name": NAME,
"held": HeldAddress}`` (a file holding a bare HeldAddress, as earlier versions wrote
it, is still read, its directory and name unknown).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from agent.relationships.delivery import HeldAddress
from agent.relationships.errors import BadStateError, RelationshipError
from janus_hsm.atomic_file import replace_file

INTRO_DIR = "directory"


@dataclass(frozen=True)
class IntroRecord:
    directory: str | None
    name: str | None
    held: HeldAddress


def intro_path(state_dir: Path, directory: str, name: str) -> Path:
    digest = hashlib.sha256(f"{directory}|{name}".encode()).hexdigest()[:16]
    return state_dir / INTRO_DIR / f"intro-{digest}.json"


def save_intro(state_dir: Path, directory: str, name: str, held: HeldAddress) -> Path:
    path = intro_path(state_dir, directory, name)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    record = {"version": 1, "directory": directory, "name": name, "held": held.to_dict()}
    replace_file(path, json.dumps(record).encode(), mode=0o600)
    return path


def read_intro(path: Path) -> IntroRecord:
    """One record; BadStateError if it is damaged."""
    try:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("version") == 1:
            directory, name = data["directory"], data["name"]
            if not isinstance(directory, str) or not isinstance(name, str):
                raise BadStateError(f"{path.name}: directory and name must be strings")
            return IntroRecord(directory, name, HeldAddress.from_dict(data["held"]))
        return IntroRecord(None, None, HeldAddress.from_dict(data))
    except (OSError, ValueError, KeyError, RelationshipError) as exc:
        raise BadStateError(f"the intro address record {path.name} is damaged: {exc}") from None


def load_intros(state_dir: Path) -> list[IntroRecord]:
    """Every intro address this owner published (none when it never published)."""
    return [read_intro(p) for p in sorted((state_dir / INTRO_DIR).glob("intro-*.json"))]
