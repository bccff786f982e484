"""The PKCS#11 backend (python-pkcs11): SoftHSM2, YubiHSM 2, Thales, CloudHSM, OpenSC…"""

from janus_hsm.backends.pkcs11.handle import Pkcs11KeyHandle
from janus_hsm.backends.pkcs11.provider import Pkcs11Provider

__all__ = ["Pkcs11KeyHandle", "Pkcs11Provider"]
