"""The errors of groups: each has a stable ``code`` (and an HTTP status, unused here).

Refusals of a group message by the ``admit`` rule are :class:`NotAdmittedError`\\ s, so
the sync node acknowledges them (the peer stops offering) and reports their own code;
the others are refusals of a command or of a sync envelope that came over a
relationship.  Messages name what was wrong, never a message body.
"""

from __future__ import annotations

from agent.sync.errors import NotAdmittedError, SyncError


class GroupError(SyncError):
    """Base class of the errors of a group command or a group envelope."""

    code = "group_error"


class UnknownGroupError(GroupError):
    code = "unknown_group"
    status = 404


class GroupExistsError(GroupError):
    code = "group_exists"
    status = 409


class BadGroupNameError(GroupError):
    code = "bad_group_name"


class GroupMemberError(GroupError):
    """A command naming a member wrongly: not a relationship, already in, not in."""

    code = "group_member_error"


class MixedDevicesError(GroupMemberError):
    """A member whose owner has no device list known here, on a device with one: its
    batches would travel by relationship and this device's by device-pair sessions, so
    the two would never sync.  Refused up front rather than a group that stays silent."""

    code = "group_mixed_devices"


class NotGroupCreatorError(GroupError):
    """Only the group's creator changes its membership."""

    code = "not_group_creator"
    status = 403


class NotAGroupMemberError(GroupError):
    """This owner was removed from the group (or never in it): it sends nothing there."""

    code = "not_a_group_member"
    status = 403


class MalformedEnvelopeError(GroupError):
    """A sync envelope (the body of a relationship message of the sync type) of a wrong shape."""

    code = "malformed_sync_envelope"


class BadSyncKeyCertificateError(GroupError):
    """A sync-key certificate that does not verify or is not of the documented form."""

    code = "bad_sync_key_certificate"


class GroupStateError(GroupError):
    """A damaged group record in the vault."""

    code = "group_state_error"
    status = 500


# --- refusals of the admit rule ---------------------------------------------------------


class UnknownGroupMessageError(NotAdmittedError):
    """A message of a conversation this owner holds no group for."""

    code = "group_unknown_conversation"


class UncertifiedAuthorError(NotAdmittedError):
    """A message whose author key no known certificate binds to an owner's root."""

    code = "sync_key_uncertified"


class MalformedGroupRecordError(NotAdmittedError):
    """A membership record whose body is not of the documented form."""

    code = "malformed_group_record"


class GroupChangeRefusedError(NotAdmittedError):
    """A membership change by someone other than the creator, or removing the creator."""

    code = "group_change_refused"


class NotMemberAuthorError(NotAdmittedError):
    """A message by an owner no membership record of the group ever named."""

    code = "group_not_member"


class UnsupportedGroupContentError(NotAdmittedError):
    """A content type a group does not carry."""

    code = "group_bad_content_type"
