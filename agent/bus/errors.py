"""The errors of the event bus: each has a stable ``code`` for logs, metrics and HTTP.

They are agent errors, so a command or a service reports them like any other: one
line, a code, never a traceback, and never a password from the bus URL.
"""

from __future__ import annotations

from agent.errors import AgentError


class BusError(AgentError):
    """Base class of event-bus errors."""

    code = "event_bus_error"
    status = 503


class EventFormatError(BusError):
    """An event (from the bus: untrusted) is malformed or its signature does not verify.

    The consumer that meets one logs it and skips it; it never stops the consumer.
    """

    code = "bad_event"
    status = 400


class BusUnavailableError(BusError):
    """The bus could not be reached, or did not answer in the time allowed."""

    code = "event_bus_unavailable"
    status = 503


class BusConfigError(BusError):
    """The bus URL or options name nothing usable: fail at start-up, not at first use."""

    code = "bad_event_bus_url"
    status = 500
