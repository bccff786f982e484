"""What every parser of outside input promises, checked on each fuzz case.

An input is either accepted or refused with an error of the project's hierarchy that
carries a stable ``code``; any other exception (a KeyError, a RecursionError, a
UnicodeError, a library's own exception) is a defect, and so is acceptance of an input
whose signed bytes were changed.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TypeVar

from agent.didcomm.errors import DIDCommError
from agent.errors import AgentError
from janus_hsm.errors import JanusHSMError
from policies.errors import PolicyError

T = TypeVar("T")

PROJECT_ERRORS: tuple[type[Exception], ...] = (JanusHSMError, PolicyError, AgentError, DIDCommError)
_CODE = re.compile(r"[a-z][a-z0-9_]*")


class Refused(Exception):
    """The input was refused as the contract allows; ``error`` is the typed error."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


def typed(
    call: Callable[[], T], allowed: tuple[type[Exception], ...] = PROJECT_ERRORS
) -> T | Refused:
    """Run ``call``: its result, or Refused for an allowed typed error; any other raises.

    The returned Refused is checked to carry a stable code, so a new error class that
    forgot its ``code`` is caught here too.
    """
    try:
        return call()
    except allowed as exc:
        code = getattr(exc, "code", None)
        assert isinstance(code, str) and _CODE.fullmatch(code), (
            f"{type(exc).__name__} has no stable code: {code!r}"
        )
        return Refused(exc)


def refused(result: object, what: str) -> Refused:
    """The Refused of a call that must not have been accepted (a tampered signed part)."""
    assert isinstance(result, Refused), f"{what}: a tampered signed part was accepted"
    return result
