"""Group send to 10 members, side by side with the same relationship messages sent 1:1.

Usage::

    python benchmarks/groups.py [--members 10] [--messages 50] [--repeat 3] [--json OUT]

One SoftHSM token made for the run holds the identities of 1 + ``--members`` owners
(each its own edge state directory) and each owner has its own cloud agent as
receiving service (``janus cloud serve --receiving``).  The sender has a relationship
with every member and a group of all of them.  Side by side, in the sender's process:

- *group*: ``Groups.send`` of ``--messages`` texts: each is a sync message (signed
  with the software sync key, stored durably), pushed in a batch to every member over
  its relationship (one Double Ratchet encryption and one delivery per member);
- *1:1*: the same number of rounds of ``Relationships.send`` of the same text to every
  member, one by one: as many relationship messages as the group sends.

Deliveries go straight to each member's receiving service (no sending service: its
store-and-forward hop is measured by benchmarks/delivery.py, and is the same on both
sides).  Members do not run ``receive`` meanwhile (nothing acknowledges): what is
measured is the sender's cost.  Messages per second are group messages (or rounds of
1:1 sends); the ratio group / 1:1 is what the sync layer adds per message.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import harness

SOFTHSM_LABEL = "janus-bench-groups"


@contextlib.contextmanager
def owners(workdir: Path, members: int) -> Iterator[dict[str, Any]]:
    from hardware.softhsm import ensure_token

    token = ensure_token(workdir / "token", SOFTHSM_LABEL)
    token.activate()

    from agent.cloud.process import CloudProcess
    from agent.edge.agent import EdgeAgent
    from agent.relationships.invitation import Invitation
    from agent.relationships.manager import Relationships

    clouds: list[CloudProcess] = []
    try:
        states = []
        for n in range(members + 1):
            state = workdir / f"owner-{n}"
            edge, _ = EdgeAgent.init(state, token.uri(), name=f"bench-groups-{n}")
            cloud = CloudProcess(
                workdir / f"cloud-{n}",
                owner=edge.did,
                extra_args=["--receiving", "--receiving-quota", "10000"],
            )
            clouds.append(cloud)
            with Relationships.open(state) as rels:
                rels.add_service(cloud.url, "receiving")
            states.append(state)
        sender, others = states[0], states[1:]
        labels = [f"member-{n}" for n in range(1, members + 1)]
        for label, other in zip(labels, others, strict=True):
            harness.progress(f"  relationship with {label}")
            with Relationships.open(sender) as rels:
                text = rels.invite(label).to_file()
            with Relationships.open(other) as rels:
                rels.accept(Invitation.parse(text), "sender")
            for state in (sender, other, sender):
                with Relationships.open(state) as rels:
                    rels.receive()
        yield {"sender": sender, "labels": labels}
    finally:
        for cloud in clouds:
            cloud.stop()


def group_run(env: dict[str, Any], messages: int) -> float:
    from agent.relationships.manager import Relationships
    from agent.sync.groups import Groups

    with Relationships.open(env["sender"]) as rels, Groups(rels) as groups:
        if "bench" not in {r.name for r in groups.records.values()}:
            groups.create("bench", env["labels"])
        start = time.perf_counter()
        for n in range(messages):
            sent = groups.send("bench", text=f"message {n}")
            assert not sent["errors"], sent["errors"]
        return messages / (time.perf_counter() - start)


def direct_run(env: dict[str, Any], messages: int) -> float:
    from agent.relationships.manager import Relationships

    with Relationships.open(env["sender"]) as rels:
        start = time.perf_counter()
        for n in range(messages):
            for label in env["labels"]:
                rels.send(label, text=f"message {n}")
        return messages / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=harness.positive_int, default=3)
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write results as JSON")
    parser.add_argument("--members", type=harness.positive_int, default=10)
    parser.add_argument("--messages", type=harness.positive_int, default=50)
    args = parser.parse_args(argv)
    if args.messages * args.repeat * 2 > 900:
        parser.error("--messages x --repeat: at most 450 (a member address holds 1,000)")
    result: dict[str, Any] = {
        "benchmark": "groups",
        **harness.machine(),
        "parameters": {"members": args.members, "messages": args.messages, "repeat": args.repeat},
    }
    with tempfile.TemporaryDirectory(prefix="janus-bench-groups-") as tmp:
        harness.progress(f"setting up: {args.members + 1} owners, cloud agents, relationships")
        with owners(Path(tmp), args.members) as env:
            group, direct = [], []
            for n in range(args.repeat):
                harness.progress(f"run {n + 1}/{args.repeat}: group send")
                group.append(group_run(env, args.messages))
                harness.progress(f"  {group[-1]:.1f} group messages/s")
                harness.progress(f"run {n + 1}/{args.repeat}: 1:1 sends to every member")
                direct.append(direct_run(env, args.messages))
                harness.progress(f"  {direct[-1]:.1f} rounds/s")
    result["loadavg_end"] = list(os.getloadavg())
    group_median, direct_median = harness.median(group), harness.median(direct)
    result["results"] = {
        "group_messages_per_s": {"runs": group, "median": group_median},
        "one_to_one_rounds_per_s": {"runs": direct, "median": direct_median},
        "relationship_messages_per_s_group": group_median * args.members,
        "relationship_messages_per_s_one_to_one": direct_median * args.members,
        "ratio_group_over_one_to_one": group_median / direct_median,
    }
    print(f"{'path (' + str(args.members) + ' members)':<44} {'messages/s':>12}")
    print(f"{'group send (one sync message, N batches)':<44} {group_median:>12.1f}")
    print(f"{'1:1 sends (N relationship messages)':<44} {direct_median:>12.1f}")
    print(f"ratio group / 1:1: {group_median / direct_median:.2f}")
    if args.json:
        harness.write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
