"""``msg/send``: pack a message on the owner's behalf and deliver it over HTTP.

The message is anoncrypted to the recipient: the grant key is an Ed25519 signing key,
and the owner's own key-agreement key stays in hardware, offline.  The capability
(``msg/send`` with caveats on ``to`` and ``endpoint``) is what limits what the agent
may send and where.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Mapping
from typing import Any

import httpx

from agent.didcomm import Message, pack_anoncrypt
from agent.errors import BadRequestError, DeliveryError
from janus_hsm.provider import KeyHandle

SEND_TIMEOUT = 10.0  # for the whole delivery: connecting, sending, the answer's status


def send_message(handle: KeyHandle, request: Mapping[str, Any]) -> dict[str, Any]:
    to, endpoint, body = request.get("to"), request.get("endpoint"), request.get("body", {})
    msg_type = request.get("type", "https://janus.dev/messages/1.0/note")
    if not isinstance(to, str) or not isinstance(endpoint, str) or not isinstance(body, dict):
        raise BadRequestError("msg/send needs {'to': DID, 'endpoint': URL, 'body': object}")
    if not endpoint.startswith(("http://", "https://")):
        raise BadRequestError("msg/send endpoint must be an http(s) URL")
    message = Message(
        id=str(uuid.uuid4()),
        type=str(msg_type),
        body=body,
        to=(to,),
        created_time=int(time.time()),
    )
    envelope = pack_anoncrypt(message, [to])
    try:
        # httpx's timeout bounds each step, not the whole exchange: a receiver that
        # trickles its answer could hold this thread as long as it liked.  wait_for
        # bounds all of it, and the answer's body is never read (only its status).
        status = asyncio.run(asyncio.wait_for(_deliver(endpoint, envelope), SEND_TIMEOUT))
    except (httpx.HTTPError, TimeoutError) as exc:
        raise DeliveryError(f"could not deliver to {endpoint}: {type(exc).__name__}") from None
    if status >= 300:
        raise DeliveryError(f"{endpoint} answered {status}")
    return {"sent": message.id, "status": status}


async def _deliver(endpoint: str, envelope: str) -> int:
    async with (
        httpx.AsyncClient(timeout=SEND_TIMEOUT, follow_redirects=False) as client,
        client.stream(
            "POST",
            endpoint,
            content=envelope.encode(),
            headers={"content-type": "application/didcomm-encrypted+json"},
        ) as response,
    ):
        return response.status_code
