"""Sends forged group records to a relationship, as a misbehaving member would.

Run as ``python -m tests.agent.sync.group_forge STATE_DIR LABEL GROUP_ID`` with the
owner's token environment: it writes, in group GROUP_ID, a membership change signed by
this owner's own (certified) sync key although it is not the creator, a message signed
by a sync key no root certified, and a record of a content type groups do not carry,
and sends them in one batch over the relationship LABEL; then a batch naming a new
group (this owner as its creator) that holds no record of it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from agent.didcomm.message import Message as DIDCommMessage
from agent.relationships.manager import SYNC_TYPE
from agent.sync.group_log import Op, op_message
from agent.sync.groups import Groups
from agent.sync.ids import new_conversation_id
from agent.sync.messages import Message
from agent.sync.records import MessageRecord, RecordType, ids_records, pack_batch
from agent.sync.sync_key import SyncKey
from agent.sync.transport import Envelope


def main(argv: list[str]) -> int:
    state, label, gid = Path(argv[0]), argv[1], argv[2]
    with Groups.open(state) as groups:
        own = groups.key()
        heads = groups.store.heads(gid)
        stranger = SyncKey.generate()
        target = next(d for d, name in groups.labels.items() if name == label)
        forged = [
            Message.create(own, conversation=gid, parents=heads, content_type=ct, body=body,
                           timestamp=int(time.time() * 1000))
            for ct, body in (op_message(Op("remove", (target,))),
                             ("application/x-unknown", b"?"))
        ] + [
            Message.create(stranger, conversation=gid, parents=heads, content_type="text/plain",
                           body=b"who am I", timestamp=int(time.time() * 1000))
        ]  # fmt: skip
        batch = pack_batch([MessageRecord(m) for m in forged])
        envelope = Envelope(batch, (groups._compacts[own.did],), ())
        groups.rels.send(label, DIDCommMessage.new(SYNC_TYPE, envelope.to_body()))
        # A group this owner "creates" by naming it, with no record of it: not joined.
        ghost = new_conversation_id()
        offer = ids_records(RecordType.OFFER, ghost, [heads[0]])
        named = Envelope(pack_batch(offer), (), ((ghost, groups.me),))
        groups.rels.send(label, DIDCommMessage.new(SYNC_TYPE, named.to_body()))
        print(" ".join(m.id for m in forged))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
