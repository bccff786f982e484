"""The p11-kit RPC front: PKCS#11 applications reach the service's keys over a unix
socket with p11-kit's own client module, under the service's per-key policy."""

from __future__ import annotations

from agent.hsm_service.p11kit.server import P11KitServer, peer_uid, serve_unix

__all__ = ["P11KitServer", "peer_uid", "serve_unix"]
