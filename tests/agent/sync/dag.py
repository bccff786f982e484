"""Random conversations for sync tests: messages by several devices over a random DAG."""

from __future__ import annotations

import random

from agent.sync.messages import Message

from .keys import DeviceKey


def random_dag(
    conversation: str, count: int, rng: random.Random, keys: list[DeviceKey] | None = None
) -> list[Message]:
    """``count`` messages, each naming 0-3 earlier ones as parents (causal order)."""
    keys = keys or [DeviceKey.ed25519() for _ in range(3)]
    out: list[Message] = []
    for i in range(count):
        parents = rng.sample([m.id for m in out], min(len(out), rng.randint(0, 3)))
        out.append(
            Message.create(
                rng.choice(keys),
                conversation=conversation,
                parents=parents,
                content_type="text/plain",
                body=f"message {i}".encode(),
                timestamp=rng.randint(0, 5),  # ties on purpose: the id breaks them
            )
        )
    return out
