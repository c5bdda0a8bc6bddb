"""Why a key is not ready, or what a failure was: a value that decides behaviour.

Code compares causes, never the words shown for them: ``KeyState.reason`` and
``Verdict.reason`` are text for people (``stats()``, logs, error messages), written next to
the cause and never parsed back.  The Redis backend stores a cause by its ``value``.
"""

from __future__ import annotations

import enum

__all__ = ["Cause"]


class Cause(enum.Enum):
    """Why a key cools or is disabled, or what a call's failure was."""

    RATE_LIMITED = "rate_limited"
    """A 429 rate limit: the key's pool is cooled for the delay the server gave."""
    REQUESTS_SPENT = "requests_spent"
    """This process counted the pool's request budget spent (from the server's headers)."""
    TOKENS_SPENT = "tokens_spent"
    """This process counted the pool's token budget spent (from the server's headers)."""
    PACED = "paced"
    """Client-side pacing (``Key(rpm=..., tpm=...)``) holds the pool back."""
    NO_QUOTA = "no_quota"
    """429 insufficient_quota: waiting seconds does not help."""
    FORBIDDEN = "forbidden"
    """403: the key may not be used here (region, model access)."""
    REVOKED = "revoked"
    """401: the key is invalid or revoked."""
    SET_BY_USER = "set_by_user"
    """``KeyManager.set_ttl()``."""
    TOO_LARGE = "too_large"
    """429 "Request too large": no key of that project will take the request."""
    MODEL_NOT_FOUND = "model_not_found"
    """404 ``model_not_found``: the key's project cannot use the model (another's may)."""
    SERVER_ERROR = "server_error"
    """408, 409 or 5xx."""
    CONNECTION_ERROR = "connection_error"
    """No answer: a connection error or a timeout."""
    NOT_A_KEY_PROBLEM = "not_a_key_problem"
    """A failure that says nothing about the key (a bad request, the user's own exception)."""
    UNSPECIFIED = "unspecified"
    """Set by code that gave no cause."""

    @property
    def local_budget(self) -> bool:
        """A cooldown that is this process's own view of a budget (its counting or pacing),
        not something the server said: it is not shared with other processes."""
        return self in (Cause.REQUESTS_SPENT, Cause.TOKENS_SPENT, Cause.PACED)
