"""The errors of the agents: each has a stable ``code`` and an HTTP status."""

from __future__ import annotations


class AgentError(Exception):
    """Base class of agent errors."""

    code = "agent_error"
    status = 500


class BadRequestError(AgentError):
    code = "bad_request"
    status = 400


class RequestTimeoutError(AgentError):
    """A client did not send the request body it announced in the time allowed."""

    code = "request_timeout"
    status = 408


class NotFoundError(AgentError):
    code = "not_found"
    status = 404


class ConflictError(AgentError):
    code = "conflict"
    status = 409


class GrantInactiveError(AgentError):
    """The grant's key was destroyed: it expired, was used up, or was revoked."""

    code = "grant_inactive"
    status = 410


class UnauthorizedError(AgentError):
    code = "unauthorized"
    status = 401


class BadCloudAnswerError(AgentError):
    """A cloud agent answered with something the edge agent will not sign for or store."""

    code = "bad_cloud_answer"
    status = 502


class DeliveryError(AgentError):
    """Sending a message to another agent's endpoint failed."""

    code = "delivery_failed"
    status = 502


class NoUsableGrantError(GrantInactiveError):
    """Every grant that could serve the request has ended (expired, used up, revoked)."""

    code = "no_usable_grant"


class ConfigurationError(AgentError):
    """A service was started with a configuration it cannot work with."""

    code = "bad_configuration"


class AddressInUseError(ConfigurationError):
    """The address a service was asked to listen on is taken by another process."""

    code = "address_in_use"
