"""The errors of the device fan-out: each has a stable ``code`` and an HTTP status.

Bundles, announcements and device-pair messages come from other devices (the owner's
and its peers'); every parser refuses bad input with one of these or with a device-list
error (device_errors.py: a wrong root, a removed or unknown device, a fork), never a
traceback, and a refused input changes no state.  Messages never echo key material.
"""

from __future__ import annotations

from agent.sync.device_errors import DeviceError


class DeviceBundleError(DeviceError):
    """A device bundle that is malformed, expired, not signed by its device key, or whose
    agreement key is not the one the owner's device list names for that device."""

    code = "device_bundle_invalid"


class MalformedFanoutError(DeviceError):
    """The plaintext of a device-pair message that is not of the documented layout."""

    code = "malformed_fanout_message"


class UnknownOwnerError(DeviceError):
    """A list or a message for an owner this device keeps no relationship with."""

    code = "device_owner_unknown"
    status = 404


class UnknownSessionError(DeviceError):
    """A message that opens under no device-pair session held here."""

    code = "device_session_unknown"
    status = 404
