"""How the simulator counts one limit: three meters, pure and clock-free (``now`` is passed in).

A meter holds one limit of one pool: ``limit`` units (requests or tokens) per ``period`` seconds
(the configured window for RPM/TPM, 1440 windows for RPD/TPD). Three kinds, as
``SimulatorConfig.limiter`` chooses:

``bucket`` (OpenAI's behaviour, the default)
    A bucket of size L that drains continuously at L/period. A request of cost c is admitted if
    level + c <= L. ``reset_in`` is the time until the bucket is empty again (OpenAI's "time
    until the rate limit resets to its initial state"), level·period/L; the wait before a
    request fits is (level + c - L)·period/L, the "Please try again in" of a 429.
``fixed``
    Windows [start + k·period, start + (k+1)·period); usage returns to 0 at each boundary. The
    wait and the reset are both the time to the end of the current window.
``sliding``
    What was admitted in the last ``period`` seconds; a request waits until enough of the
    oldest admissions have aged out.

``charge_rejected`` is how a rejected request counts against the limit ("unsuccessful requests
contribute to your per-minute limit"): it uses what the limit had left, up to its own cost,
never more than the whole limit. A client that keeps retrying into a 429 therefore keeps the
meter full and its next admission away.

Every method is O(1) except ``SlidingMeter.wait``, which walks the admissions still in the
window (at most ``limit`` of them).
"""

from __future__ import annotations

import math
from collections import deque

LIMITERS = ("bucket", "fixed", "sliding")
EPSILON = 1e-9
"""Slack for float comparisons, so that a wait computed from a level is never off by a hair."""


class Meter:
    """One limit: ``limit`` units per ``period`` seconds."""

    __slots__ = ("limit", "period")

    def __init__(self, limit: int, period: float) -> None:
        if limit < 1 or period <= 0:
            raise ValueError("a meter needs limit >= 1 and period > 0")
        self.limit = limit
        self.period = period

    def used(self, now: float) -> float:
        """Units counted against the limit at ``now``."""
        raise NotImplementedError

    def wait(self, cost: int, now: float) -> float:
        """Seconds from ``now`` until a request of ``cost`` fits (0: it fits now).

        ``math.inf`` if it never fits (``cost > limit``).
        """
        raise NotImplementedError

    def reset_in(self, now: float) -> float:
        """Seconds from ``now`` until nothing is counted against the limit any more."""
        raise NotImplementedError

    def _add(self, amount: float, now: float) -> None:
        raise NotImplementedError

    def charge(self, cost: int, now: float) -> None:
        """Count an admitted request."""
        self._add(cost, now)

    def charge_rejected(self, cost: int, now: float) -> None:
        """Count a rejected request: what is left of the limit, up to ``cost``."""
        amount = min(float(cost), self.limit - self.used(now))
        if amount > EPSILON:
            self._add(amount, now)

    def remaining(self, now: float) -> int:
        """Whole units left (``x-ratelimit-remaining-*``)."""
        return max(0, math.floor(self.limit - self.used(now) + EPSILON))


class BucketMeter(Meter):
    """A continuously draining bucket (OpenAI)."""

    __slots__ = ("_at", "_level")

    def __init__(self, limit: int, period: float) -> None:
        super().__init__(limit, period)
        self._level = 0.0
        self._at = -math.inf

    def used(self, now: float) -> float:
        if now > self._at:
            drained = (now - self._at) * self.limit / self.period if self._level else 0.0
            self._level = max(0.0, self._level - drained)
            self._at = now
        return self._level

    def wait(self, cost: int, now: float) -> float:
        if cost > self.limit:
            return math.inf
        excess = self.used(now) + cost - self.limit
        return excess * self.period / self.limit if excess > EPSILON else 0.0

    def reset_in(self, now: float) -> float:
        return self.used(now) * self.period / self.limit

    def _add(self, amount: float, now: float) -> None:
        self._level = self.used(now) + amount


class FixedMeter(Meter):
    """Fixed windows counted from ``origin``."""

    __slots__ = ("_index", "_origin", "_used")

    def __init__(self, limit: int, period: float, origin: float) -> None:
        super().__init__(limit, period)
        self._origin = origin
        self._index = -1
        self._used = 0.0

    def _roll(self, now: float) -> None:
        index = math.floor((now - self._origin) / self.period)
        if index != self._index:
            self._index = index
            self._used = 0.0

    def _to_end(self, now: float) -> float:
        return max(0.0, self._origin + (self._index + 1) * self.period - now)

    def used(self, now: float) -> float:
        self._roll(now)
        return self._used

    def wait(self, cost: int, now: float) -> float:
        if cost > self.limit:
            return math.inf
        if self.used(now) + cost <= self.limit + EPSILON:
            return 0.0
        return self._to_end(now)

    def reset_in(self, now: float) -> float:
        return self._to_end(now) if self.used(now) else 0.0

    def _add(self, amount: float, now: float) -> None:
        self._roll(now)
        self._used += amount


class SlidingMeter(Meter):
    """What was admitted in the last ``period`` seconds (a log of admissions)."""

    __slots__ = ("_log", "_total")

    def __init__(self, limit: int, period: float) -> None:
        super().__init__(limit, period)
        self._log: deque[tuple[float, float]] = deque()
        self._total = 0.0

    def used(self, now: float) -> float:
        log = self._log
        while log and log[0][0] + self.period <= now:
            self._total -= log.popleft()[1]
        if not log:
            self._total = 0.0
        return self._total

    def wait(self, cost: int, now: float) -> float:
        if cost > self.limit:
            return math.inf
        excess = self.used(now) + cost - self.limit
        if excess <= EPSILON:
            return 0.0
        freed = 0.0
        for at, amount in self._log:
            freed += amount
            if freed >= excess - EPSILON:
                return max(0.0, at + self.period - now)
        raise AssertionError("unreachable: the log holds more than the excess")

    def reset_in(self, now: float) -> float:
        self.used(now)
        return max(0.0, self._log[-1][0] + self.period - now) if self._log else 0.0

    def _add(self, amount: float, now: float) -> None:
        self.used(now)
        self._log.append((now, amount))
        self._total += amount


def make_meter(kind: str, limit: int, period: float, origin: float) -> Meter:
    """A meter of ``kind`` (one of ``LIMITERS``); ``origin`` is where fixed windows start."""
    if kind == "bucket":
        return BucketMeter(limit, period)
    if kind == "fixed":
        return FixedMeter(limit, period, origin)
    if kind == "sliding":
        return SlidingMeter(limit, period)
    raise ValueError(f"limiter: must be one of {', '.join(LIMITERS)}; got {kind!r}")
