"""Relationships: hardware-rooted sessions between two owners.

The crypto core (suite, prekeys, x3dh, ratchet, padding) starts a relationship with one
token ECDH per side and then runs a header-encrypted Double Ratchet in software; the
rest (vault, addresses, invitation, relationship, manager, delivery) stores it and
carries its messages.  docs/relationships-wire.md specifies the bytes.
"""
