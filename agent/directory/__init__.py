"""The directory: a namespace authority's service that vends key packages and attestations.

Every binding change is appended to an RFC 9162 Merkle log whose signed tree heads let
clients and owners detect a directory that shows different histories to different people.
"""
