"""What to do with a key and a call after a failure: a pure function of the exception.

``classify(exc, policy)`` reads the status code, the body's ``code``/``type``, the message and
the response headers of an ``openai`` exception and returns a :class:`Verdict`: what happens to
the key (keep, cool for N seconds, disable) and to the call (retry on another key at once, retry
after a backoff, raise).  No I/O, no clock except the wall clock needed for HTTP-date headers,
which is injectable.
"""

from __future__ import annotations

import dataclasses
import datetime
import email.utils
import enum
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import openai

from ._cause import Cause

__all__ = [
    "KEY_CAUSES",
    "Action",
    "Fate",
    "Policy",
    "Verdict",
    "classify",
    "headers_of",
    "parse_duration",
    "retry_delay",
]

#: Longest delay we accept from a server hint; anything longer is treated as this.
MAX_HINT_SECONDS = 24 * 3600.0
#: Shortest cooldown after a rate limit, so that a server saying "retry in 0s" cannot make a
#: call spin through its keys without ever waiting.
MIN_RATE_LIMIT_COOLDOWN = 0.01


class Fate(enum.Enum):
    """What happens to the key that failed."""

    KEEP = "keep"
    COOL = "cool"
    DISABLE = "disable"


class Action(enum.Enum):
    """What happens to the call that failed."""

    RETRY_ELSEWHERE = "retry elsewhere"
    OTHER_POOL = "other pool"
    """The request may suit another project's key: try it on a pool the call has not tried
    yet; raise when none is left."""
    BACKOFF = "backoff"
    RAISE = "raise"


@dataclass(frozen=True)
class Policy:
    """The durations a verdict may use; ``@stable(...)`` options fill it in."""

    cooldown: float = 20.0
    """Seconds to cool a rate-limited key when the server gives no delay."""
    quota_cooldown: float = 3600.0
    """Seconds to bench a key whose quota is empty (429 ``insufficient_quota``)."""
    forbidden_cooldown: float = 600.0
    """Seconds to bench a key that got 403."""
    revoked_cooldown: float = 3600.0
    """Seconds a key disabled by a 401 stays out before one call tries it again (``inf``:
    until it is given again)."""


@dataclass(frozen=True)
class Verdict:
    """The decision for one failure."""

    fate: Fate
    action: Action
    seconds: float = 0.0
    reason: str = ""
    """For people (logs, ``stats()``, error messages); ``cause`` is what code compares."""
    rate_limited: bool = False
    forbidden: bool = False
    pooled: bool = False
    """The failure belongs to the budget the key shares with its pool: cool the pool."""
    cause: Cause = Cause.UNSPECIFIED
    hinted: bool = True
    """The server said how long to wait: ``seconds`` is its delay.  A rate limit it did not
    say that of is backed off from its pool's pace instead, ``seconds`` at most
    (``_model.Budget.limited``)."""


RAISE_UNCHANGED = Verdict(
    Fate.KEEP, Action.RAISE, reason="not a key problem", cause=Cause.NOT_A_KEY_PROBLEM
)

_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_GO_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}
_TRY_AGAIN = re.compile(r"try again in\s+((?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)")


def parse_duration(text: str) -> float | None:
    """Parse a Go-style duration (``1s``, ``6m0s``, ``12ms``, ``1m30.5s``) into seconds.

    A bare number is taken as seconds.  Returns ``None`` for anything else, never raises.
    """
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    total = 0.0
    position = 0
    for match in _GO_PART.finditer(text):
        if match.start() != position:
            return None
        total += float(match.group(1)) * _GO_UNITS[match.group(2)]
        position = match.end()
    if position != len(text) or position == 0:
        return None
    return total


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if headers is None:
        return None
    try:
        value = headers.get(name)
    except Exception:  # a malformed header container must not break classification
        return None
    return value if isinstance(value, str) else None


def _seconds_from_retry_after(value: str, now_wall: Callable[[], float]) -> float | None:
    seconds = parse_duration(value)
    if seconds is not None:
        return seconds
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    if moment.tzinfo is None:  # every HTTP-date is UTC (RFC 9110 §5.6.7), whatever it spells
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, moment.timestamp() - now_wall())


def retry_delay(
    headers: Mapping[str, str] | None,
    message: str,
    now_wall: Callable[[], float] = time.time,
) -> float | None:
    """The server's own idea of when a rate-limited key may be used again, in seconds.

    In order: ``retry-after-ms``; ``retry-after`` (seconds or HTTP date); "try again in …"
    in the message (OpenAI's: when the request will be admitted); the ``x-ratelimit-reset-*``
    header of a budget whose remainder is 0 (when the budget is *whole* again: later than
    that, from a refilling bucket or a sliding window).  A ``retry-after`` of whole seconds is
    the finer hint rounded up (OpenAI sends ``retry-after: 1`` beside "try again in 530ms"): a
    finer hint less than a second below it is taken instead.  ``None`` when the server said
    nothing usable.
    """
    ms = _header(headers, "retry-after-ms")
    if ms is not None:
        value = parse_duration(ms)
        if value is not None:
            return min(value / 1000.0, MAX_HINT_SECONDS)
    finer = try_again_in(message)
    if finer is None:
        resets = []
        for budget in ("requests", "tokens"):
            if (_header(headers, f"x-ratelimit-remaining-{budget}") or "").strip() == "0":
                reset = parse_duration(_header(headers, f"x-ratelimit-reset-{budget}") or "")
                if reset is not None:
                    resets.append(reset)
        finer = max(resets) if resets else None
    after = _header(headers, "retry-after")
    if after is not None:
        value = _seconds_from_retry_after(after, now_wall)
        if value is not None:
            if finer is not None and value == math.floor(value) and value - 1.0 < finer <= value:
                value = finer  # (whole seconds: the finer hint, rounded up)
            return min(value, MAX_HINT_SECONDS)
    return None if finer is None else min(finer, MAX_HINT_SECONDS)


def try_again_in(message: str) -> float | None:
    """The seconds of a message's "try again in 644ms" (OpenAI's 429s), or ``None``."""
    match = _TRY_AGAIN.search(message)
    return parse_duration(match.group(1)) if match else None


def _error_fields(exc: openai.APIStatusError) -> tuple[str, str, str]:
    """(code, type, message) from the exception's parsed body, tolerant of odd bodies."""
    body: Any = getattr(exc, "body", None)  # (getattr: odd subclasses, older openai)
    if isinstance(body, Mapping) and isinstance(body.get("error"), Mapping):
        body = body["error"]
    code = getattr(exc, "code", None)
    kind = getattr(exc, "type", None)
    code = code if isinstance(code, str) else ""
    kind = kind if isinstance(kind, str) else ""
    message = ""
    if isinstance(body, Mapping):
        code = code or str(body.get("code") or "")
        kind = kind or str(body.get("type") or "")
        raw = body.get("message")
        message = raw if isinstance(raw, str) else ""
    return code, kind, message or str(exc.message or "")


def headers_of(exc: BaseException) -> Mapping[str, str] | None:
    """The headers of the response an error carries, if it carries one."""
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    return headers if headers is not None else None


#: Failures of the key (or its project), not of the request: a retry on *another* key may
#: cure them, whatever the server says of retrying the request, and a call does not count
#: them as its attempts (each takes its key out of the rotation for long).
KEY_CAUSES = frozenset({
    Cause.NO_QUOTA, Cause.REVOKED, Cause.FORBIDDEN, Cause.TOO_LARGE, Cause.MODEL_NOT_FOUND,
})


def classify(
    exc: BaseException,
    policy: Policy = Policy(),
    now_wall: Callable[[], float] = time.time,
) -> Verdict:
    """Decide what a failure means for the key that was used and for the call.

    A response with ``x-should-retry: false`` is not retried (as openai-python does not),
    unless the failure is the key's own (no quota, revoked, forbidden): the key still
    cools or is disabled as the failure says."""
    verdict = _classify(exc, policy, now_wall)
    if (
        verdict.action is not Action.RAISE
        and verdict.cause not in KEY_CAUSES
        and isinstance(exc, openai.APIStatusError)
        and (_header(headers_of(exc), "x-should-retry") or "").strip().lower() == "false"
    ):
        return dataclasses.replace(verdict, action=Action.RAISE)
    return verdict


def _classify(
    exc: BaseException, policy: Policy, now_wall: Callable[[], float]
) -> Verdict:
    if isinstance(exc, openai.APIConnectionError):  # includes APITimeoutError
        return Verdict(
            Fate.KEEP, Action.BACKOFF, reason="connection error", cause=Cause.CONNECTION_ERROR
        )
    if not isinstance(exc, openai.APIStatusError):
        return RAISE_UNCHANGED
    status = exc.status_code
    code, kind, message = _error_fields(exc)
    if status == 429:
        if code == "insufficient_quota" or kind == "insufficient_quota":
            return Verdict(
                Fate.COOL, Action.RETRY_ELSEWHERE, policy.quota_cooldown,
                "no quota (429 insufficient_quota)", pooled=True, cause=Cause.NO_QUOTA,
            )
        if "request too large" in message.lower():  # for this project's limit: another's?
            return Verdict(
                Fate.KEEP, Action.OTHER_POOL, reason="request too large (429)",
                cause=Cause.TOO_LARGE,
            )
        delay = retry_delay(headers_of(exc), message, now_wall)
        return Verdict(
            Fate.COOL, Action.RETRY_ELSEWHERE,
            policy.cooldown if delay is None else max(delay, MIN_RATE_LIMIT_COOLDOWN),
            "rate limited (429)", rate_limited=True, pooled=True, cause=Cause.RATE_LIMITED,
            hinted=delay is not None,
        )
    if status == 401:
        return Verdict(
            Fate.DISABLE, Action.RETRY_ELSEWHERE, policy.revoked_cooldown,
            f"revoked (401 {code or 'unauthorized'})", cause=Cause.REVOKED,
        )
    if status == 403:
        return Verdict(
            Fate.COOL, Action.RETRY_ELSEWHERE, policy.forbidden_cooldown,
            f"forbidden (403 {code or kind or 'forbidden'})", forbidden=True,
            cause=Cause.FORBIDDEN,
        )
    if status == 404 and code == "model_not_found":  # model access is per project
        return Verdict(
            Fate.KEEP, Action.OTHER_POOL, reason="model not found (404)",
            cause=Cause.MODEL_NOT_FOUND,
        )
    if status in (408, 409) or status >= 500:
        return Verdict(
            Fate.KEEP, Action.BACKOFF, reason=f"server error ({status})", cause=Cause.SERVER_ERROR
        )
    return RAISE_UNCHANGED
