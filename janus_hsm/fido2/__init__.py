"""FIDO2 security keys for Janus: discovery, registration, approvals and keystore unlock.

Needs python-fido2 (the ``fido2`` extra).  Modules: :mod:`.errors` (typed errors with
stable codes), :mod:`.devices` (USB HID, PC/SC and in-process discovery),
:mod:`.authenticator` (one key, driven through fido2's client), :mod:`.registry`
(registered keystore credentials), :mod:`.keystore` (hmac-secret keystore unlock).
"""
