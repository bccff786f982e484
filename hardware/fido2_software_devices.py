"""Hands janus_hsm's FIDO2 discovery the software authenticator (tests and demos only).

janus_hsm never imports ``hardware``: production installs need not ship it.  This
function is registered from outside instead, under the entry-point group
``janus.fido2_software_authenticators`` (pyproject.toml), and discovery calls it only in
a fenced test run (JANUS_FIDO2_SOFTWARE_AUTHENTICATOR with JANUS_INSECURE_TESTING=1).
"""

from __future__ import annotations

from fido2.ctap import CtapDevice

from hardware.fido2_authenticator import Presence, ScriptedPresence, SoftwareAuthenticator


def software_authenticator(state_path: str, presence: str) -> CtapDevice:
    """A software authenticator kept in ``state_path`` whose "person" always answers
    ``presence`` (approve, deny or timeout)."""
    return SoftwareAuthenticator(
        presence=ScriptedPresence(default=Presence(presence)),
        presence_timeout=0.2,
        state_path=state_path,
    )
