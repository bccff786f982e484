"""Starting the cloud agent: check its configuration before it listens (agent.serving).

A cloud agent that announced itself and then could not serve (a busy port), or that
served with a configuration it would only later trip on (a wrong keystore passphrase,
an owner that is no did:key), misleads whoever started it.  So everything that can be
checked is checked before the announcement, and the announcement is made once the
socket listens and the application has started, by uvicorn's own started state.
"""

from __future__ import annotations

from agent.cloud.service import CloudAgent
from agent.errors import ConfigurationError
from janus_hsm.algorithms import Algorithm
from janus_hsm.errors import KeystoreError
from janus_hsm.public_keys import PublicKeyFormatError, algorithm_of, from_did_key


def check_owner(owner: str) -> None:
    """The owner must be a did:key whose key can sign capabilities."""
    try:
        key = from_did_key(owner)
    except PublicKeyFormatError as exc:
        raise ConfigurationError(f"--owner {owner!r:.120} is not a valid did:key: {exc}") from None
    if algorithm_of(key) is Algorithm.X25519:
        raise ConfigurationError(
            f"--owner {owner!r:.120} is a key-agreement key: the owner is the did:key of the "
            "hardware root key that signs capabilities"
        )


def check_keystore(agent: CloudAgent) -> None:
    """Open the agent's own key with the passphrase given, before any key is made.

    Finding a key reads only its public part; a wrong passphrase would otherwise show
    only at the first action, as a 500, with grant keys made meanwhile under it.
    """
    try:
        agent.identity.sign(b"janus cloud agent start-up check")
    except KeystoreError:
        raise ConfigurationError(
            f"the keystore passphrase does not open the keys in {agent.config.state_dir}: "
            "wrong passphrase (or a damaged key file)"
        ) from None
