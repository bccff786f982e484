"""Every error code of janus_hsm, policies and agent means one thing.

Scripts and HTTP clients act on ``code``; two unrelated errors answering the same code
would make them act wrongly.  A subclass may keep (inherit or restate) its parent's code:
it is a more precise case of the same meaning.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import defaultdict

from agent.cli.output import CommandError
from agent.didcomm.errors import DIDCommError
from agent.errors import AgentError
from janus_hsm.errors import JanusHSMError
from policies.errors import PolicyError

PACKAGES = ("janus_hsm", "policies", "agent")
BASES: tuple[type[Exception], ...] = (
    JanusHSMError,
    PolicyError,
    AgentError,
    DIDCommError,
    CommandError,
)


def import_everything() -> None:
    for name in PACKAGES:
        package = importlib.import_module(name)
        for info in pkgutil.walk_packages(package.__path__, f"{name}."):
            if not info.name.endswith(".__main__"):  # runs the CLI
                importlib.import_module(info.name)


def error_classes() -> set[type[Exception]]:
    found: set[type[Exception]] = set()
    todo: list[type[Exception]] = [Exception]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            if sub not in found:
                found.add(sub)
                todo.append(sub)
    return {c for c in found if c.__module__.split(".")[0] in PACKAGES}


def test_every_error_of_the_three_packages_has_a_code_of_its_hierarchy() -> None:
    import_everything()
    classes = error_classes()
    assert len(classes) > 60  # the walk found the hierarchies, not nothing
    for cls in classes:
        if issubclass(cls, BASES):
            code = cls.__dict__.get("code", getattr(cls, "code", None))
            assert isinstance(code, str) and code, cls


def test_error_codes_are_unique_per_meaning() -> None:
    import_everything()
    defining: dict[str, list[type[Exception]]] = defaultdict(list)
    for cls in error_classes():
        code = cls.__dict__.get("code")
        if isinstance(code, str):
            defining[code].append(cls)
    assert {"presence_timeout", "bad_signature", "bad_request"} <= set(defining)
    clashes = {}
    for code, classes in defining.items():
        # One class states the code; any other that states it is a subclass of that one.
        if not any(all(issubclass(c, root) for c in classes) for root in classes):
            clashes[code] = sorted(f"{c.__module__}.{c.__qualname__}" for c in classes)
    assert clashes == {}


def test_didcomm_errors_are_agent_errors_answered_4xx() -> None:
    """A request's content causes them all: never a 500 from an agent."""
    import_everything()
    didcomm = [c for c in error_classes() if issubclass(c, DIDCommError)]
    assert len(didcomm) > 10
    for cls in didcomm:
        assert issubclass(cls, AgentError), cls
        assert 400 <= cls.status < 500, cls
