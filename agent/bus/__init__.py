"""The event bus: signed events between cloud-agent instances, over PostgreSQL or NATS.

See docs/event-bus.md.  ``open_bus(url)`` picks the backend from the URL.
"""

from agent.bus.base import EventBus, Handler, RequestHandler, open_bus
from agent.bus.errors import BusConfigError, BusError, BusUnavailableError, EventFormatError
from agent.bus.events import EVENT_TYP, KINDS, Event, sign_event

__all__ = [
    "EVENT_TYP",
    "KINDS",
    "BusConfigError",
    "BusError",
    "BusUnavailableError",
    "Event",
    "EventBus",
    "EventFormatError",
    "Handler",
    "RequestHandler",
    "open_bus",
    "sign_event",
]
