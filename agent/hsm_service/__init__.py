"""The HSM service: policy, quorum and forced audit in front of shared PKCS#11 tokens.

The engine (:mod:`agent.hsm_service.engine`) decides and acts; the HTTP front, the
p11-kit RPC front and the ``hsm+…`` key provider are built on it.  The operator's guide
is docs/hsm-service.md.
"""
