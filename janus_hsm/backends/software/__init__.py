"""The software backend: keys encrypted at rest in files, for cloud agents.

Software keys are not custody keys - they can be copied by whoever holds the file and
its secret - so they are refused by custody checks unless ``allow_extractable`` is
set.  See docs/software-keystore.md for the URI form, the file format and the threats.
"""

from janus_hsm.backends.software.handle import SoftwareKeyHandle
from janus_hsm.backends.software.provider import SoftwareProvider
from janus_hsm.backends.software.uri import SoftwareUri

__all__ = ["SoftwareKeyHandle", "SoftwareProvider", "SoftwareUri"]
