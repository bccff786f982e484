"""The errors of an owner's device list: each has a stable ``code`` and an HTTP status.

Device lists and join requests come from other devices and from peers; every parser
and verifier refuses bad input with one of these (never a traceback), and a refused
input changes no state.  Messages name what was wrong, never a PIN or a key's secret.
"""

from __future__ import annotations

from agent.sync.errors import SyncError


class DeviceError(SyncError):
    """Base class of device-list errors."""

    code = "device_error"
    status = 400


class MalformedDeviceListError(DeviceError):
    """Bytes that are not a device list of the documented format and bounds."""

    code = "malformed_device_list"


class MissingApprovalError(MalformedDeviceListError):
    """A device entry without the approving device and its signature."""

    code = "device_approval_missing"


class MalformedJoinRequestError(DeviceError):
    """Bytes that are not a join request of the documented format."""

    code = "malformed_device_request"


class DeviceSignatureError(DeviceError):
    """A signature (root, device or approver) that does not verify under its did:key."""

    code = "device_bad_signature"


class WrongRootError(DeviceError):
    """A list signed by a key other than the owner's root this device or peer knows."""

    code = "device_list_wrong_root"
    status = 403


class NotNewerError(DeviceError):
    """A list whose version is not higher than the last one seen (a replay or rollback)."""

    code = "device_list_not_newer"
    status = 409


class ForkedListError(DeviceError):
    """A list that does not extend the last one seen: its previous hash or its history
    differs (a fork, or a list rewritten by whoever holds the root)."""

    code = "device_list_fork"
    status = 409


class UnknownApproverError(DeviceError):
    """An entry approved by a key that was not a current device when it was added."""

    code = "device_approver_unknown"
    status = 403


class RemovedDeviceError(DeviceError):
    """A device that the list removed: nothing from it or for it is accepted."""

    code = "device_removed"
    status = 403


class CodeMismatchError(DeviceError):
    """The code typed in is not the one the joining device shows for its request."""

    code = "device_code_mismatch"
    status = 403


class ExpiredJoinRequestError(DeviceError):
    """A join request older than its lifetime (or dated in the future)."""

    code = "device_request_expired"


class StaleApprovalError(DeviceError):
    """An approval made for another version of the list than the one the root extends."""

    code = "device_approval_stale"
    status = 409


class DeviceExistsError(DeviceError):
    """A device, name or key already in the list (or a list that already exists)."""

    code = "device_exists"
    status = 409


class UnknownDeviceError(DeviceError):
    """No current device of that name or did:key."""

    code = "unknown_device"
    status = 404


class NoDeviceListError(DeviceError):
    """This state directory holds no device list yet."""

    code = "no_device_list"
    status = 404


class NotRootError(DeviceError):
    """The key offered to sign a list is not the owner's root."""

    code = "device_not_root"
    status = 403


class RootDeviceError(DeviceError):
    """The device whose key is the owner's root cannot be removed from the list."""

    code = "device_holds_root"
    status = 409


class NotInListError(DeviceError):
    """A first list offered to a joining device that does not contain its request."""

    code = "device_not_in_list"
    status = 403


class DeviceListFullError(DeviceError):
    """The list would exceed its documented bounds (devices, removed devices, bytes)."""

    code = "device_list_full"
    status = 409


class DeviceStateError(DeviceError):
    """The device files in the state directory are damaged or not this agent's."""

    code = "device_state_error"
    status = 500
