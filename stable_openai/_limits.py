"""What a 429 says about the limit it broke, read from its message.

OpenAI's rate-limit 429s (and those of servers that copy them: Groq, many proxies) name the
limit and give its numbers::

    Rate limit reached for gpt-4o in organization org-XXX on tokens per min (TPM):
    Limit 30000, Used 29937, Requested 385. Please try again in 644ms. ...

:func:`read_rate_limit` turns that into a :class:`RateLimit`.  Its :attr:`RateLimit.refill`
is the server's own rate, derived from its numbers and never from the words "per min": the
limit is a bucket of ``Limit`` that refills continuously, and the request is admitted when
``Used + Requested − Limit`` units have refilled, which takes "try again in" — so one unit
refills in ``try_again / (Used + Requested − Limit)`` seconds (``../shared/RATE_LIMITS.md``
§1; it holds for every published example, and for servers that quantize a limit into
sub-windows or compress time, as the simulator does).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal, NamedTuple

from ._budget import ServerBudget
from ._model import MAX_PERIOD
from ._policy import try_again_in

__all__ = ["Lesson", "RateLimit", "pace_of", "read_rate_limit"]

_SUBJECT = re.compile(
    r"(?:Rate limit reached|Request too large) for (?:model )?`?(?P<model>[^`\s]+)`?"
    r"(?: in (?:organization|project) `?[^`\s]+`?)*"  # the pool: see _budget.organization_in
    r"(?: service tier `?[^`\s]+`?)?"
    r" on (?P<kind>requests|tokens) per (?P<per>min|minute|day)",
    re.IGNORECASE,
)
_NUMBER = r"(\d[\d,]*)"
_LIMIT = re.compile(r"\bLimit:?\s*" + _NUMBER, re.IGNORECASE)
_USED = re.compile(r"\bUsed:?\s*" + _NUMBER, re.IGNORECASE)
_REQUESTED = re.compile(r"\bRequested:?\s*" + _NUMBER, re.IGNORECASE)


@dataclass(frozen=True)
class RateLimit:
    """One limit a 429 names: which, its numbers, and when the request will be admitted."""

    kind: Literal["requests", "tokens"]
    daily: bool
    """A per-day limit (RPD, TPD) rather than a per-minute one."""
    model: str | None = None
    limit: int | None = None
    used: int | None = None
    requested: int | None = None
    try_again: float | None = None
    """Seconds until the request would be admitted, as the message says."""

    @property
    def refill(self) -> float | None:
        """Seconds for one unit (a request, or a token) of the limit to refill: the
        server's rate, from its own numbers.  ``None`` when the message lacks one of them."""
        if None in (self.limit, self.used, self.requested, self.try_again):
            return None
        over = self.used + self.requested - self.limit  # type: ignore[operator]
        if over <= 0 or not self.try_again:
            return None
        return self.try_again / over

    @property
    def window(self) -> float | None:
        """Seconds for the whole limit to refill from empty (``Limit`` units)."""
        refill = self.refill
        return None if refill is None or self.limit is None else refill * self.limit


def _count(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.search(text)
    return int(match.group(1).replace(",", "")) if match else None


def read_rate_limit(message: str) -> RateLimit | None:
    """The limit a rate-limit 429's message names, or ``None`` when it names none (quota,
    a body without numbers, another server's words)."""
    if not isinstance(message, str):
        return None
    subject = _SUBJECT.search(message)
    if subject is None:
        return None
    kind: Literal["requests", "tokens"] = (
        "requests" if subject.group("kind").lower() == "requests" else "tokens"
    )
    return RateLimit(
        kind=kind,
        daily=subject.group("per").lower() == "day",
        model=subject.group("model"),
        limit=_count(_LIMIT, message),
        used=_count(_USED, message),
        requested=_count(_REQUESTED, message),
        try_again=try_again_in(message),
    )


#: A 429's numbers are a bucket's when its reset is within these shares of ``Limit`` refills.
_BUCKET_RESET = (0.5, 2.0)
#: A fixed window's 429 says the request is admitted, and the whole limit back, at the same
#: moment (its end): within this many seconds (or this share of the wait), the two are one.
_SAME_END = 0.1


class Lesson(NamedTuple):
    """What a rate-limit 429 teaches the pace of its pool (:func:`pace_of`)."""

    paces: bool
    """Whether it teaches it at all."""
    told: float | None = None
    """The rate of requests a second its numbers give, when they can be trusted."""
    model: str | None = None
    """The model whose limit it names, if it names one."""
    daily: bool = False
    """Whether that limit is a per-day one (RPD, TPD)."""
    limit: int | None = None
    """The requests its window admits, when its numbers say when a window ends (``told`` is
    then ``None``) and name a request limit's size; or when its headers name it."""
    reset: float | None = None
    """The seconds until its headers say the request limit is back in full, when they name it
    (in a sliding window, when its last admission ages out; "try again in" is its first)."""
    sliding: bool = False
    """Whether its numbers are a sliding window's."""


def _sliding(limit: int, reset: float, model: str | None) -> Lesson:
    """A sliding window's 429: ``limit`` admitted, the last aging out in ``reset`` seconds."""
    return Lesson(True, limit / reset, model, limit=limit, reset=reset, sliding=True)


def pace_of(message: str, budget: ServerBudget | None = None) -> Lesson:
    """What a rate-limit 429 teaches the pace of its pool: whether it does at all (not a 429
    of a per-day limit, which the cooldown until the server's time covers, nor one whose
    headers show budget left), the model it names, and the rate of requests a second its
    message's numbers give, when they can be trusted.  Headers whose limit is not the one the
    message names are of another limit (a server may show a day's budget on a minute's 429):
    they say nothing of this one.

    They are OpenAI's refilling bucket's: exact there, but from a server that counts in
    windows they say when *its window* ends, or when its oldest admission ages out, not its
    rate.  ``budget``, the 429's own ``x-ratelimit-*`` headers, tells them apart: a bucket that
    just refused a request is full, so it is empty again (its reset) after about ``Limit``
    refills; a fixed window is over as soon as the request is admitted (much sooner), and a
    sliding window once its last admission ages out (much later, or, after a burst, sooner
    but still later than the request is admitted)."""
    limit = read_rate_limit(message)
    if budget is not None and limit is not None and limit.limit is not None:
        headers_limit = budget.requests_limit if limit.kind == "requests" else budget.tokens_limit
        if headers_limit is not None and headers_limit != limit.limit:
            budget = None  # the headers tell another limit (a day's, beside a minute's 429)
    if (
        budget is not None
        and budget.requests_left
        and (budget.tokens_left is None or budget.tokens_left > 0)
    ):
        return Lesson(False)  # its own headers show budget left: no limit was reached
    if limit is None:
        return Lesson(True)
    if limit.daily:
        return Lesson(False, None, limit.model, daily=True)
    refill = limit.refill if limit.kind == "requests" else None
    if not refill:
        return Lesson(True, None, limit.model)
    if (
        budget is not None and budget.requests_reset is not None and budget.requests_limit
        and budget.requests_reset <= MAX_PERIOD  # (longer: a day's limit's, not a minute's)
    ):
        bucket = budget.requests_limit * refill  # the reset of a bucket that refused one
        if budget.requests_reset < _BUCKET_RESET[0] * bucket:
            wait = limit.try_again or 0.0
            if budget.requests_reset - wait <= max(_SAME_END, _SAME_END * wait):
                return Lesson(True, None, limit.model, limit=limit.limit)  # a window's end
            # A sliding window after a burst: its oldest admission ages out soon, its last
            # much later (a fixed window's reset and wait are both its end): ``Limit`` in
            # at least as long as the last takes.
            return _sliding(budget.requests_limit, budget.requests_reset, limit.model)
        if budget.requests_reset > _BUCKET_RESET[1] * bucket:
            # A sliding window, whose last admission (just before this 429) ages out at the
            # reset: ``Limit`` in about that long.
            return _sliding(budget.requests_limit, budget.requests_reset, limit.model)
        return Lesson(True, 1.0 / refill, limit.model, limit=budget.requests_limit,
                      reset=budget.requests_reset)
    return Lesson(True, 1.0 / refill, limit.model)
