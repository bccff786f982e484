"""policies: capabilities, the issuance policy, the use ledger, revocation and audit.

Depends on janus_hsm (signatures come from a KeyHandle; no private key passes through
here); knows nothing about HTTP.  The main entry points:

- ``policies.issue.grant`` — issue or redelegate a capability, under a policy;
- ``policies.verify.Verifier`` — verify bundles and invocations offline;
- ``policies.authorize.authorize`` — verify, then count the use in the ledger;
- ``policies.ledger.open_ledger`` — SQLite or PostgreSQL use accounting and audit;
- ``policies.revocation`` — signed revocation records.
"""
