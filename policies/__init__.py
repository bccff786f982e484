"""policies: capabilities, the issuance policy, the use ledger, revocation and audit.

Depends on janus_hsm (signatures come from a KeyHandle); knows nothing about HTTP.
"""
