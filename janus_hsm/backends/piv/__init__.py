"""The PIV backend (yubikey-manager's yubikit): YubiKey and other PIV card slots."""

from janus_hsm.backends.piv.handle import PivKeyHandle
from janus_hsm.backends.piv.provider import PivProvider
from janus_hsm.backends.piv.uri import PivUri

__all__ = ["PivKeyHandle", "PivProvider", "PivUri"]
