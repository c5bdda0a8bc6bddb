"""What is decided about a pool's budget, apart from where the pool's keys and state live.

A :class:`Budget` is what one pool knows of its budget on the server — learned from the
``x-ratelimit-*`` headers, spent by the calls it starts — and its methods are the rules: the
budget refills at the server's reset (or as a refilling bucket refills, once answers show
one: ``_bucket_told``), a call spends one request, an answer tells what is left.  They are
pure: they read and write the budget's own fields only, take the time and the pool's calls
in flight as arguments, and *return* what must happen to the pool's keys (a
:class:`Spent`: cool them until a deadline; or ``FREED``: keys held for a spent request
budget may go) instead of doing it.  The key ring applies those decisions to its keys.

The Redis scripts run the same rules on the same fields, for atomicity across processes
(``backends/lua/common.lua``: ``refresh``, ``window_bound``; ``choose.lua``: spending a
request; ``report.lua``: learning from an answer), with the constants below generated into
them.  ``tests/test_store_scenarios.py`` drives both stores step by step and requires the same
answers.
"""

from __future__ import annotations

import bisect
import math
from typing import Final, NamedTuple, cast

from ._budget import ServerBudget
from ._cause import Cause

__all__ = [
    "ALLOWANCE_PROBES",
    "BLIND_FIRST",
    "FREED",
    "KNOWN_PERIODS",
    "MAX_PERIOD",
    "MAX_RESET",
    "MIXED",
    "NEW_WINDOW",
    "ORDER_SLACK",
    "PACE_BACKOFF",
    "PACE_DROP",
    "PACE_GAIN",
    "PERIOD_GAIN",
    "PERIOD_SLACK",
    "PER_DAY",
    "PROBE_CALLS",
    "PROBE_FOR",
    "PROBE_WAIT",
    "RESET_SLACK",
    "SAME_DEADLINE",
    "SLIDE_MOST",
    "SLIDE_SLACK",
    "SLIDE_STRETCH",
    "UNANSWERED_FOR",
    "Budget",
    "Spent",
    "model_paced_by",
]

#: A learned budget is trusted for at most this long without a fresh response.
MAX_RESET = 3600.0
#: An answer whose reset is this much later than the one known is from a new window.
NEW_WINDOW = 0.1
#: Within a window, the server took an answer's request after another's when its reset is
#: later by more than this (a refilling bucket's reset moves out 1 / rate a request), before
#: when it is earlier by more: requests overtake each other on the way, so the order they
#: left in is not the order they were counted in.  (Resets are compared as stamped from when
#: each request left: the server counts a request when it arrives, and a long one's answer
#: comes back seconds later.)
ORDER_SLACK = 0.005
#: Requests that left less than this apart may have been counted in either order (a
#: sliding window's resets do not tell): an answer taken in as the freshest, of the window
#: of the one before it (its reset, stamped from when its request left, no more than
#: NEW_WINDOW later), whose request left less than this after that one's (or before it),
#: counts no more left than that one shows now.
OVERTAKE = 0.05
#: How long a pool whose budget is spent waits when it does not know the reset yet: about
#: the time an answer needs to come back and tell.
PROBE_WAIT = 0.05
#: Calls per key a pool sends before an answer has told its budget.
PROBE_CALLS = 2
#: Headers give a reset to the millisecond: how far off the true one may be (see
#: ``Budget._bucket_told``).
RESET_SLACK = 0.001
#: Once a pool's allowance (see ``Budget.limited``) is spent, it sends one call per
#: ``PROBE_WAIT`` for a 429 to tell where the limit stands — this many at most: a limit far
#: above that rate meets none, and the pool goes unheld again.
ALLOWANCE_PROBES = 20
#: For this long after a 429 named a model, a pool that has not learned that model's limit
#: sends one call of it per ``PROBE_WAIT`` (``ALLOWANCE_PROBES`` at most: see
#: ``KeyRing.lane_pass``): keys of one provider often share a limit's size, and a call at a
#: time meets one 429 where a burst meets a volley.
PROBE_FOR = 5.0
#: A server that counts in fixed windows (Azure's RPM, in windows of 1 or 10 s) says, in a 429
#: that gives no rate, when its window ends.  The next such end, told while the pool spends
#: the allowance the first gave it, after it was admitted calls there, in the first half of the
#: span and at most ``MAX_PERIOD`` later, measures its period (``KNOWN_PERIODS`` when within
#: this share of one); a later end a whole number of periods after the last (at most this share
#: of a period off) is of the same windows.  A pool that knows them is held until this share of
#: a period after a window's end.
PERIOD_SLACK = 0.1
#: The longest period taken for a server's windows (a minute: Azure's TPM window).
MAX_PERIOD = 60.0
#: A pool that knows its windows gives each its size; a window that met a 429 sets it to what
#: that window admitted (but not below half), and each window that spent it all without one
#: raises it by this much (up to the size a 429 named): a call more about every five windows.
PERIOD_GAIN = 0.2
#: A pool that keeps to a sliding window (see ``Budget._slid``) counts each call in it for
#: the window's length and this share more: the server counts a call from when it arrives, a
#: moment after it left — a moment that varies from call to call.
SLIDE_SLACK = 0.05
#: ... and takes the window as at most this share longer than the longest a 429's reset
#: showed it (and SLIDE_SLACK): each 429 that meets the pool in its window lengthens it by
#: how early its call came — up to this, as 429s that others cause would do so for good ...
SLIDE_STRETCH = 0.25
#: ... if its window counts this many requests at most (a longer one is paced).
SLIDE_MOST = 64
#: A request that left this long ago and got no answer no longer counts as one the server
#: may not have counted yet: by now it has, or never will.
UNANSWERED_FOR = 60.0
#: Deadlines this close are one: a key cooling until one is not cooled again until the other
#: (Redis keeps a deadline to 14 digits, and both stores must keep the same reason).
SAME_DEADLINE = 1e-6
#: After a 429, a pool is paced at this share of the rate the server showed it admits ...
PACE_BACKOFF = 0.97
#: ... at this share of its pace after a span between two 429s in which nothing was admitted
#: (see Budget._close) ...
PACE_DROP = 0.5
#: ... and each call that succeeds raises the pace by this share, to find a higher limit
#: (3 % back in about 60 calls: a pool that keeps to its limit meets a 429 that rarely).
PACE_GAIN = 0.0005
#: A 429 that says no delay cools its pool for one call of its pace (or this many seconds,
#: before it has one), twice that after another such 429 with no success between, and so on
#: up to the policy's ``cooldown``: the server's limit is found by feedback.
BLIND_FIRST = 1.0
#: The model a pool's pace is learned from, once its calls or 429s have named two: a pace
#: learned from one model's limit would hold the calls of the others (budgets are per pool,
#: not yet per model), so such a pool is not paced from its 429s.
MIXED = "*"
#: A model held in a pool for a per-day limit is also held under its name and this suffix, so
#: that any process that sees the hold knows no wait short of the server's will help.
PER_DAY = " per day"


class Spent(NamedTuple):
    """A budget is spent: cool the pool's keys until ``until`` (on the clock of ``now``)."""

    until: float
    reason: str
    cause: Cause


#: An answer shows request budget left: keys held only for a spent one may be used again.
FREED: Final = "freed"


#: The windows servers count in (Azure's RPM in 1 or 10 s, its TPM in a minute): a period
#: measured within ``PERIOD_SLACK`` of one is taken as it.
KNOWN_PERIODS = (1.0, 10.0, 60.0)


def _known(period: float) -> float:
    """A windows' period as measured, or the known one it is near (``KNOWN_PERIODS``): the
    ends a 429 tells come late by as long as it took to answer — at start-up on a busy
    machine, by 5 % of a second — and a period measured short drifts the windows' calls
    early."""
    for known in KNOWN_PERIODS:
        if abs(period - known) <= PERIOD_SLACK * known:
            return known
    return period


def model_paced_by(budget: ServerBudget) -> tuple[float, float] | None:
    """In a pool serving several models, an answer's headers tell the budget of the model its
    request asked for, not the pool's.  Once they show no request left of its limit, that
    model is paced there as a 429's numbers would pace it: returns (calls a second, seconds
    until the first): held for one request's refill, ``reset / limit``, then paced at
    ``PACE_BACKOFF × limit / reset`` — right for a refilling bucket, which is empty again at
    the reset once it admitted its last request.  (A fixed window admits nothing more until
    its reset, its end: the call the pace lets go before then meets the 429 that holds the
    model until that end, as it would without the headers.)  ``None``: they do not show it
    spent — or their reset is over ``MAX_PERIOD`` away: a per-minute limit's never is, so they
    are of a longer one (a day's), which the call's request should meet: its 429 says so, and
    the call raises at once rather than wait for a refill."""
    left, limit, reset = budget.requests_left, budget.requests_limit, budget.requests_reset
    if (
        left is None or left > 0 or not limit or limit < 1 or reset is None or reset <= 0
        or reset > MAX_PERIOD
    ):
        return None
    return PACE_BACKOFF * limit / reset, reset / limit


class Budget:
    """What a pool knows of its server budget, brought up to date with what it sent since."""

    __slots__ = (
        "admitted",
        "allowance",
        "avg_tokens",
        "bucket_first",
        "bucket_first_reset",
        "bucket_full",
        "bucket_hi",
        "bucket_lo",
        "bucket_shared",
        "bucket_sure",
        "closing",
        "hintless",
        "hooked",
        "idle",
        "limited_at",
        "outstanding",
        "pace",
        "pace_level",
        "pace_model",
        "pace_stamp",
        "period",
        "period_admitted",
        "period_anchor",
        "period_end",
        "period_limit",
        "period_limited",
        "period_size",
        "period_told",
        "probing",
        "requests_back",
        "requests_ends",
        "requests_left",
        "requests_limit",
        "requests_order_at",
        "requests_refilled",
        "requests_reset_at",
        "requests_sent_at",
        "requests_view",
        "sent",
        "slide_least",
        "slide_opens",
        "slide_period",
        "slide_size",
        "snapshot",
        "stale",
        "tokens_left",
        "tokens_limit",
        "tokens_refilled",
        "tokens_reset_at",
        "told",
        "window_reset",
        "window_start",
    )

    def __init__(self) -> None:
        self.sent = 0  # calls started on the pool, ever
        self.hooked = 0  # requests seen leaving by the pooled client's hook, ever
        # (``hooked`` mark, when it left) of the requests not answered yet
        self.outstanding: list[tuple[int, float]] = []
        self.snapshot = -1  # ``hooked`` mark of the request behind the freshest headers
        self.probing = False  # a few calls go out first, to learn the budget from their answers
        self.requests_left: float | None = None
        self.requests_limit: int | None = None
        self.requests_reset_at = 0.0
        # the freshest answer's reset, stamped from when its request left (see ORDER_SLACK)
        self.requests_order_at = 0.0
        self.requests_refilled = 0.0  # the reset already refilled: answers before it are stale
        self.requests_sent_at = 0.0  # when the freshest answer's request left
        # and its mark, the requests it showed left, and when those it counted come back
        self.requests_view: tuple[int, int, list[float]] | None = None
        # Each answer's reset is when its own request stops counting (see _requests_counted):
        # when those answered since the last refill do (the latest ``requests_limit``), and,
        # of them, those the freshest answer counts that do before its reset (each brings one
        # request of the budget back then).
        self.requests_ends: list[tuple[float, float]] = []  # (and when at the earliest)
        self.requests_back: list[float] = []
        # A moving average of the tokens a call's requests cost: each call is counted at that
        # much when it starts (its size is known only when it ends, and not at all to a
        # shared store until then), and corrected by the next answer's headers.
        self.avg_tokens = 0.0
        self.tokens_left: float | None = None
        self.tokens_limit: int | None = None
        self.tokens_reset_at = 0.0
        self.tokens_refilled = 0.0
        # A window that began at a refill admits its limit less the calls started since
        # ``window_start`` (answers may come out of order; this count never does), until an
        # answer shows a later window than the first one it saw (``window_reset``).
        self.window_start: int | None = None
        self.window_reset: float | None = None
        # A refilling bucket's rate, told by answers (see ``_bucket_told``): the interval of
        # rates every answer allows (``bucket_lo`` < rate <= ``bucket_hi``; ``bucket_lo`` -1:
        # not a bucket, or not one to pace by), the requests the first answer counted and its
        # reset, and whether an answer that counted others, with another reset, agreed;
        # ``bucket_full``: when the bucket would be empty (all refilled), with the calls sent
        # since the freshest answer.
        self.bucket_lo = 0.0
        self.bucket_hi = math.inf
        self.bucket_first = 0
        self.bucket_first_reset = 0.0
        self.bucket_sure = False
        self.bucket_full = 0.0
        self.bucket_shared = False  # a 429 met the pool paced by it: others spend it unseen
        # The pace learned from 429s (calls a second; ``None`` before the first that told a
        # rate), spent as a bucket of one call: ``pace_level`` calls, at ``pace_stamp``.
        self.pace: float | None = None
        self.pace_level = 0.0
        self.pace_stamp = 0.0
        self.limited_at: float | None = None  # when the last 429 came back
        self.admitted = 0  # calls that succeeded since (and those in flight then)
        # Before a pace is known, after a 429 that gives no rate: the calls the pool may
        # still start before it sends one to learn where the limit stands.
        self.allowance: float | None = None
        # A server that counts in fixed windows, once two of its 429s told where one ends
        # (see PERIOD_SLACK): the pool gets ``period_size`` calls a window, what is left of it
        # in ``allowance``, and is then held until a little after ``period_end``, not paced.
        self.period: float | None = None  # the length of the server's windows
        self.period_told: float | None = None  # the last window end a 429 told
        self.period_end = 0.0  # when the current window ends
        self.period_anchor = 0.0  # the first window end of those measured
        self.period_size = 0.0  # the calls a window gets
        self.period_limit: int | None = None  # the size a 429 named: the most a window gets
        self.period_admitted = 0  # the calls that succeeded since the window began
        self.period_limited = False  # and whether one met a 429 there
        self.idle = 0.0  # seconds since then that the pace would have allowed calls, unused
        self.stale = 0  # calls in flight at that 429 that have not ended yet
        self.closing: float | None = None  # the span before it, to measure once they have
        self.told: float | None = None  # the rate that 429's numbers gave
        self.hintless = 0  # 429s that said no delay since the last success
        self.pace_model: str | None = None  # the model its calls named (MIXED: several)
        # A server that counts in a sliding window, once a 429 showed one (see _slid): the
        # window's length, and when each of the requests it counts ages out (its size at most).
        self.slide_period: float | None = None
        self.slide_least = 0.0  # the longest the 429s' resets showed it (and SLIDE_SLACK)
        self.slide_opens: list[float] = []
        self.slide_size = 0

    def window_bound(self, left: float) -> float:
        """``left``, or less: at most what is left of a window that began at a refill."""
        if self.window_start is None or self.requests_limit is None:
            return left
        return min(left, self.requests_limit - (self.sent - self.window_start))

    def refresh(self, now: float, in_flight: int, fresh: int = 0) -> None:
        """Past the server's reset, the full budget is back, less the ``in_flight`` calls;
        before it, a request each time one the freshest answer counted stops counting (see
        :meth:`_requests_counted`).  ``fresh``: calls already counted in ``sent`` that belong
        to the new window."""
        reset_at = self.requests_reset_at
        if reset_at and now >= reset_at and self.requests_refilled < reset_at:
            self.requests_refilled = reset_at
            self.requests_left = (  # the fresh calls spend their request after this
                None if self.requests_limit is None else self.requests_limit - (in_flight - fresh)
            )
            self.snapshot = self.hooked
            self.window_start = self.sent - fresh
            self.window_reset = None
            self._forget_returns()  # (all back: counted no more)
        back = self.requests_back
        if back and now >= back[0]:
            returned = bisect.bisect_right(back, now)
            del back[:returned]
            if self.requests_left is not None and self.requests_limit is not None:
                self.requests_left = self.window_bound(min(
                    self.requests_left + returned, self.requests_limit - (in_flight - fresh)
                ))
        reset_at = self.tokens_reset_at
        if reset_at and now >= reset_at and self.tokens_refilled < reset_at:
            self.tokens_refilled = reset_at
            self.tokens_left = (
                None
                if self.tokens_limit is None
                else self.tokens_limit - (in_flight - fresh) * self.avg_tokens
            )

    def requests_back_at(self, reset_at: float) -> float:
        """When the pool's request budget, spent, has room for a call again: when enough of
        the requests the freshest answer counts stop counting (``requests_back``), else at
        ``reset_at``."""
        if self.requests_left is None:
            return reset_at
        index = math.ceil(-self.requests_left)  # (the ones that bring it up to a call)
        back = self.requests_back
        return min(back[index], reset_at) if index < len(back) else reset_at

    def _request_ends(self, end: float, order: float) -> None:
        """An answer says its own request stops counting at ``end`` at the latest, and at
        ``order`` at the earliest (its reset, stamped from when the answer came and from when
        the request left: see :meth:`_requests_counted`)."""
        if not self._keeps_ends():
            self.requests_ends = []
            return
        limit = cast(int, self.requests_limit)
        ends = self.requests_ends
        bisect.insort(ends, (end, order))
        if len(ends) > limit:
            del ends[: len(ends) - limit]

    def _keeps_ends(self) -> bool:
        """Whether the pool keeps when its requests stop counting: not over ``SLIDE_MOST``
        requests (too long a list), nor for a bucket whose rate is known (it paces by
        that)."""
        limit = self.requests_limit
        return limit is not None and limit <= SLIDE_MOST and self.bucket_rate() is None

    def _forget_returns(self) -> None:
        """Forget when requests come back (at a refill, a 429, a pool found to serve two
        models): until answers tell again, what is counted comes back at the reset."""
        self.requests_ends, self.requests_back, self.requests_view = [], [], None

    def _requests_counted(self, left_at: float, reset_at: float, left: int) -> list[float]:
        """The freshest answer (its request left at ``left_at``) counts ``left`` requests of
        the limit left, and is back in full at ``reset_at``: when those it counts that the
        pool knows of come back, one at a time, before that.  (``left`` also leaves out the
        pool's requests that left before it and are still unanswered: it may count them, and
        their ends are unknown.)

        An answer's reset is when the limit that counted its request is back in full, were
        nothing admitted after it: a fixed window's end; a sliding window's, a window after
        the request (its last admission); a refilling bucket's, when it has drained.  So its
        request stops counting then: no later than that reset stamped from when the answer
        came, no earlier than stamped from when the request left.  The freshest answer counts
        those of the pool's answered requests that stop counting, at the earliest, after its
        own request left — or up to ``OVERTAKE`` before: requests take their own time to
        reach the server, and one that arrived later may be counted still — each back when
        it stops counting at the latest; as many as the answer counts besides its own at
        most, the latest.  A sliding window thus gives each request back a window after it,
        not the whole window after the last one: a burst whose calls went out over a part of
        a window goes out again a window later, not that part later each window.  What the
        pool does not know of (others' requests, one whose answer failed) comes back at the
        reset, as before.

        (One that stopped counting just before the answer's request arrived may so stand for
        a request the pool does not know of: with others spending the key unseen, a call may
        go into a full window, and its 429 forgets the list.  Without that margin, on this
        project's busy 2-core machine, whose requests take 10 to 30 ms to reach the
        simulator, requests it counted were left out: 0.83–0.85 of the limit on sliding
        windows, not 0.86.)"""
        if not self._keeps_ends() or self.bucket_shared:  # (others spend it unseen)
            return []
        counted = cast(int, self.requests_limit) - left - 1
        if counted <= 0:
            return []
        ends = [
            end for end, order in self.requests_ends
            if left_at - OVERTAKE < order and end < reset_at
        ]
        return ends[-counted:]

    def spend_request(self, now: float, in_flight: int) -> list[Spent]:
        """A call started (counted in ``sent`` and ``in_flight`` already): it spends one
        request of what is left, a call's worth of tokens (``avg_tokens``), and its place in
        the pace learned from 429s."""
        spent = []
        pace = self.pace
        if pace is not None:
            level = self.pace_level
            if now > self.pace_stamp:
                level += (now - self.pace_stamp) * pace
                self.pace_stamp = now
                if level > 1.0:  # the pool was not busy: that time says nothing of its limit
                    self.idle += (level - 1.0) / pace
                    level = 1.0
            level -= 1.0
            self.pace_level = level
            spent.append(Spent(now + (1.0 - level) / pace, "paced (429s)", Cause.PACED))
        if self.slide_period is not None:
            opens = [at for at in self.slide_opens if at > now]
            bisect.insort(opens, now + self.slide_period)
            self.slide_opens = opens
            if len(opens) >= self.slide_size:  # (the window counts no more than its size)
                del opens[: len(opens) - self.slide_size]
                spent.append(Spent(opens[0], "paced (429s)", Cause.PACED))
        period = self.period
        if period is not None:
            if now >= self.period_end:
                self._next_window(now, period)
            self.allowance = cast(float, self.allowance) - 1.0
            if self.allowance <= 0:
                # The window's calls are spent: hold until a little after its end (the ends
                # a 429 tells come late, by as long as it took to answer, but the period may
                # be a little short).
                spent.append(Spent(
                    self.period_end + PERIOD_SLACK * period, "paced (429s)", Cause.PACED
                ))
        elif self.allowance is not None:
            self.allowance -= 1.0
            if self.allowance < -ALLOWANCE_PROBES:
                # As many probes met no 429: the limit is not where the allowance put it.
                self.allowance = self.period_told = None
            elif self.allowance <= 0:
                # The pool holds a moment, then one call more goes (and holds it as long), for
                # a 429 to tell where the limit stands.
                spent.append(Spent(now + PROBE_WAIT, "paced (429s)", Cause.PACED))
        if self.requests_left is None and self.tokens_left is None:
            return spent
        self.refresh(now, in_flight, fresh=1)
        if self.requests_left is not None:
            self.requests_left = self.window_bound(self.requests_left - 1)
            bucket = self.bucket_rate()
            if bucket is not None and self.bucket_full:  # (once an answer told when it is empty)
                # A refilling bucket admits the next call once it has room (_bucket_ready).
                self.bucket_full = max(self.bucket_full, now) + 1.0 / bucket[0]
                ready = self._bucket_ready(bucket)
                if ready > now:
                    spent.append(Spent(ready, "budget spent (RPM)", Cause.REQUESTS_SPENT))
            elif self.requests_left <= 0:
                # Until a request comes back, or the server's reset, or until an answer says
                # when that is.
                reset_at = self.requests_back_at(self.requests_reset_at)
                until = reset_at if reset_at > now else now + PROBE_WAIT
                spent.append(Spent(until, "budget spent (RPM)", Cause.REQUESTS_SPENT))
        if self.tokens_left is not None:
            self.tokens_left -= self.avg_tokens
            if self.tokens_left < max(1.0, self.avg_tokens):
                reset_at = self.tokens_reset_at
                until = reset_at if reset_at > now else now + PROBE_WAIT
                spent.append(Spent(until, "budget spent (TPM)", Cause.TOKENS_SPENT))
        return spent

    def _bucket_told(self, left: int, reset: float) -> None:
        """An answer shows ``left`` requests of the limit left, and the budget back in full in
        ``reset`` seconds.  A refilling bucket (OpenAI's) is back in full once it refilled what
        it counts: between ``limit - left - 1`` and ``limit - left`` requests (the remainder is
        rounded down), so its rate is between those over ``reset`` (to ``RESET_SLACK``); every
        answer narrows the interval the rate is in.  A bucket's reset grows with what it
        counts; a window's does not (a fixed window's is its end, a sliding window's a window
        after the request): answers that counted different numbers, with resets more than the
        slack apart, allow no common rate.  A reset over ``MAX_PERIOD`` is of a longer limit
        than a minute's (a day's), which no pool is paced by."""
        limit = self.requests_limit
        lo = self.bucket_lo
        used = 0 if limit is None else limit - left
        if lo < 0 or used <= 0 or reset <= RESET_SLACK:
            return  # not a bucket; or a full budget, or a reset too near: they tell no rate
        if reset > MAX_PERIOD:
            self._bucket_end()
            return
        if not self.bucket_first:
            self.bucket_first, self.bucket_first_reset = used, reset
        elif used != self.bucket_first and abs(reset - self.bucket_first_reset) > 2 * RESET_SLACK:
            self.bucket_sure = True
        lo = max(lo, (used - 1) / (reset + RESET_SLACK))
        hi = min(self.bucket_hi, used / (reset - RESET_SLACK))
        if lo < hi:
            self.bucket_lo, self.bucket_hi = lo, hi
        else:
            self._bucket_end()

    def _bucket_answered(self, order_at: float, unseen: int) -> tuple[float, float] | None:
        """The freshest answer says the bucket is empty at ``order_at`` (its reset, stamped
        from when its request left), and ``unseen`` calls (sent since, or before and not
        answered yet) fill it more: the bucket's rate interval, or ``None`` when there is no
        bucket to pace by."""
        bucket = self.bucket_rate()
        if bucket is not None:
            self.bucket_full = order_at + unseen / bucket[0]
        return bucket

    def bucket_rate(self) -> tuple[float, float] | None:
        """The interval a refilling bucket's rate is in, once answers told it (see
        ``_bucket_told``), else ``None``."""
        if self.bucket_sure and self.bucket_lo > 0:
            return self.bucket_lo, self.bucket_hi
        return None

    def _bucket_ready(self, bucket: tuple[float, float]) -> float:
        """When the bucket has room for two requests (at the fastest rate it may refill at):
        the pool sends one then, and keeps one of margin for a request that takes less time
        to reach the server than the one whose answer told when the bucket is empty — which
        costs nothing once the pool is spent: the calls still go one a refill."""
        return self.bucket_full - max(cast(int, self.requests_limit) - 2, 0) / bucket[1]

    def _bucket_end(self) -> None:
        """No bucket to pace by: not one, or not one this pool may pace by (for good, until
        another limit: ``_bucket_forget``)."""
        self.bucket_lo, self.bucket_hi = -1.0, math.inf

    def _bucket_forget(self) -> None:
        self.bucket_lo, self.bucket_hi, self.bucket_first = 0.0, math.inf, 0
        self.bucket_first_reset, self.bucket_sure, self.bucket_full = 0.0, False, 0.0
        self.bucket_shared = False

    def _next_window(self, now: float, period: float) -> None:
        """A call starts after the window's end: the next window (the one ``now`` is in)
        begins, with as many calls as the last one admitted if a 429 met it, one more every
        few windows if it spent them all without one (up to the size a 429 named), else as
        many as the last one had."""
        end = self.period_end
        self.period_end = end + period * (math.floor((now - end) / period) + 1.0)
        size = self.period_size
        if self.period_limited:  # (halved at most: the first call may have met the 429)
            size = max(1.0, float(self.period_admitted), size / 2.0)
        elif cast(float, self.allowance) <= 0:
            size += PERIOD_GAIN
        if self.period_limit is not None:
            size = min(size, float(self.period_limit))
        self.period_size = size
        self.period_admitted, self.period_limited = 0, False
        self.allowance = float(math.floor(size))

    def _window_told(self, now: float, end: float, limit: int | None) -> bool:
        """A 429 that gives no rate said the server admits again at ``end``: the end of its
        window, if the server counts in windows.  The next such end measures the windows'
        period (see ``PERIOD_SLACK``); a later one that falls on the windows known keeps them,
        and tells the pool it had more calls in a window than the server admits; one that
        falls off them ends them, and the next measures anew.  Returns whether the pool knows
        its windows (then the current one is spent, unless this is its end told again)."""
        told = self.period_told
        period = self.period
        if told is not None and abs(end - told) <= max(NEW_WINDOW, PERIOD_SLACK * (period or 0.0)):
            return period is not None  # the same window's end again
        self.period_told = end
        if told is None or end < told:
            self.period = None
            return False
        gap = end - told
        if period is None:
            # Measured only by a 429 of the allowance the first end gave, with calls admitted
            # in it, within a minute, and in the first half of the span (else it may be a
            # later window's: the allowance's calls may have gone late): not by two ends
            # that happened to be told.
            if (
                self.allowance is None or gap > MAX_PERIOD or not self.admitted
                or now - told >= gap / 2
            ):
                return False
            self.period = _known(gap)
            self.period_anchor = told
            self.period_limit = limit
            self.period_size = float(limit if limit is not None else max(1, self.admitted))
            # Without a size named, the calls still in flight, which the server counted
            # before this 429, may add to what the window admitted: the next gets all it did.
            self.period_admitted, self.period_limited = (
                (0, False) if limit is not None else (self.admitted, True))
        else:
            windows = math.floor(gap / period + 0.5)
            if windows < 1 or abs(gap - windows * period) > PERIOD_SLACK * period:
                self.period = None  # off the windows known
                return False
            # The same windows: their period, measured over all of them since the first end
            # (each end is told late by as long as its answer took: once, not each time).
            since = end - self.period_anchor
            self.period = _known(since / math.floor(since / period + 0.5))
            self.period_limited = True
        self.period_end = end
        self.allowance = 0.0
        return True

    def send(self, now: float) -> int:
        """A request leaves (the pooled client's hook saw it): it is unanswered until
        :meth:`answered`.  Returns its mark."""
        self.hooked += 1
        self.outstanding.append((self.hooked, now))
        return self.hooked

    def cost(self, tokens: float) -> None:
        """A call ended whose requests cost ``tokens`` tokens (estimated when they left,
        corrected by the answers' ``usage``): the next calls are counted at the new average."""
        if tokens > 0:  # in whole tokens: sums of them are exact in both stores
            avg = self.avg_tokens
            moved = tokens if not avg else 0.8 * avg + 0.2 * tokens
            self.avg_tokens = float(math.floor(moved + 0.5))

    def answered(self, mark: int | None) -> float | None:
        """The request that left at ``mark`` (``0``: before its key joined this pool; ``None``:
        unknown) was answered: it is no longer unanswered.  Returns when it left, if known."""
        outstanding = self.outstanding
        if mark is None:
            return None
        index = bisect.bisect_left(outstanding, (mark,))
        if index < len(outstanding) and outstanding[index][0] == mark:
            left_at = outstanding[index][1]
            del outstanding[index]
            return left_at
        return None

    def drained(self) -> None:
        """The pool has no call in flight: nothing is unanswered any more (heals lost answers),
        and calls that never sent a request (they failed first) no longer count as started."""
        self.outstanding.clear()
        never_sent = self.sent - self.hooked
        if never_sent > 0:
            self.sent -= never_sent
            if self.window_start is not None:
                self.window_start -= never_sent

    def probe(self, keys: int, in_flight: int) -> None:
        """The pool's ``keys`` will be called through clients whose answers tell the budget:
        until the first one does, only a few calls go out instead of a burst."""
        if (
            self.requests_left is None and self.snapshot < 0 and not self.probing
            and self.pace_model != MIXED
        ):
            self.probing = True
            self.requests_left = float(PROBE_CALLS * keys) - in_flight

    def learn(
        self, budget: ServerBudget, mark: int, now: float, left_at: float | None = None
    ) -> list[Spent | str]:
        """Take in what an answer's headers say: the request that left at ``mark`` (at
        ``left_at``, if known) was answered with ``budget``.

        The remainders count the requests the server admitted up to this one; what the pool
        sent after it is taken off, and — as requests may overtake each other on the way —
        those that left before it and are still unanswered.  Only the freshest answer counts:
        of a request that the server counted after the last one taken in: it left later and
        its reset is not earlier, or its reset is later (a refilling bucket's moves out with
        each request it admits), whenever it left.  Resets are compared as stamped from when
        their requests left (``left_at``; else now), not when the answers arrived: a long
        request's answer arrives seconds after the server counted it.  Returns what the pool's
        keys must do: :class:`Spent` and/or ``FREED``."""
        if self.pace_model == MIXED:  # each answer tells one model's limit: not the pool's
            return []
        # (Calls started on another pool before their key joined this one hook here without
        # having been counted as started: hence the max.)
        started = max(self.sent, self.hooked)
        since = now - UNANSWERED_FOR
        if any(left_at <= since for _, left_at in self.outstanding):  # counted, or never
            self.outstanding = [entry for entry in self.outstanding if entry[1] > since]
        earlier = bisect.bisect_left(self.outstanding, (mark,))  # left before it, unanswered
        unseen = started - mark + earlier
        if budget.requests_limit is not None:
            if budget.requests_limit != self.requests_limit:
                self._bucket_forget()
            self.requests_limit = budget.requests_limit
        if budget.tokens_limit is not None:
            self.tokens_limit = budget.tokens_limit
        decisions: list[Spent | str] = []
        snapshot = self.snapshot  # the freshest answer before this one, for both budgets
        if budget.requests_left is not None and budget.requests_reset is not None:
            reset_at = now + min(budget.requests_reset, MAX_RESET)
            if left_at is None or left_at <= since:  # (as an unanswered one's place)
                left_at = now
            order_at = left_at + min(budget.requests_reset, MAX_RESET)
            known = self.requests_order_at
            self._bucket_told(budget.requests_left, budget.requests_reset)
            stale = reset_at <= self.requests_refilled + NEW_WINDOW
            if not stale and budget.requests_reset <= MAX_PERIOD:
                self._request_ends(reset_at, order_at)
            if stale:
                pass  # an answer from a window already over and refilled
            elif order_at >= known - ORDER_SLACK and (
                mark >= snapshot or order_at > known + ORDER_SLACK
            ):  # counted after the freshest answer known
                self.probing = False
                self.snapshot = mark
                # (The headers tell its budget now: an allowance or windows from 429s end.)
                self.allowance = self.period = self.period_told = self.slide_period = None
                known_reset, self.requests_reset_at = self.requests_reset_at, reset_at
                self.requests_order_at = order_at
                if self.window_start is not None:
                    if self.window_reset is None:
                        self.window_reset = reset_at
                    elif reset_at > self.window_reset + NEW_WINDOW:  # a later window
                        self.window_start = self.window_reset = None
                back = self._requests_counted(
                    left_at, reset_at, budget.requests_left + earlier
                )
                returned = bisect.bisect_right(back, now)  # (back already)
                left: float = budget.requests_left - unseen + returned
                view = self.requests_view
                if (
                    view is not None and left_at < self.requests_sent_at + OVERTAKE
                    and order_at <= known + NEW_WINDOW
                ):
                    # The answer before, of the same window, may be of a request counted
                    # after this one: no more left than it shows now (less the calls since,
                    # with what came back since), with its own request back at its reset, no
                    # longer the pool's.
                    view_mark, view_left, view_back = view
                    if known_reset < reset_at:
                        view_back = sorted([*view_back, known_reset])
                    before = (
                        view_left - (started - view_mark)
                        - bisect.bisect_left(self.outstanding, (view_mark,))
                        + bisect.bisect_right(view_back, now)
                    )
                    if before < left:
                        left, back = before, view_back
                        returned = bisect.bisect_right(back, now)
                self.requests_view = (mark, budget.requests_left, back)
                self.requests_sent_at = left_at
                self.requests_back = back[returned:]
                self.requests_left = self.window_bound(left)
                bucket = self._bucket_answered(order_at, unseen)
                if bucket is not None:
                    # The freshest answer says when the bucket has room again: the pool holds
                    # until then (no longer than the reset), not until a time its calls pushed
                    # out at the slowest rate the answers allow.
                    ready = min(self._bucket_ready(bucket), reset_at)
                    decisions.append(FREED)
                    if ready > now:
                        decisions.append(Spent(ready, "budget spent (RPM)", Cause.REQUESTS_SPENT))
                elif self.requests_left <= 0:
                    back_at = self.requests_back_at(reset_at)
                    if back_at < reset_at:  # (keys held until a later time are back sooner)
                        decisions.append(FREED)
                    decisions.append(Spent(back_at, "budget spent (RPM)", Cause.REQUESTS_SPENT))
                else:
                    decisions.append(FREED)
        elif self.probing:  # the server sends no budget headers: nothing to wait for
            self.probing = False
            self.requests_left = None
            decisions.append(FREED)
        if budget.tokens_left is not None and budget.tokens_reset is not None:
            reset_at = now + min(budget.tokens_reset, MAX_RESET)
            if reset_at <= self.tokens_refilled + NEW_WINDOW:
                pass  # stale, as above
            elif mark >= snapshot or reset_at > self.tokens_reset_at + NEW_WINDOW:
                self.tokens_reset_at = reset_at
                self.tokens_left = budget.tokens_left - unseen * self.avg_tokens
                if self.tokens_left < max(1.0, self.avg_tokens):
                    decisions.append(Spent(reset_at, "budget spent (TPM)", Cause.TOKENS_SPENT))
        return decisions

    def limited(
        self,
        now: float,
        in_flight: int,
        told: float | None,
        cooled: float,
        hinted: bool = True,
        model: str | None = None,
        limit: int | None = None,
        reset: float | None = None,
        sliding: bool = False,
    ) -> float:
        """A call on the pool was rate limited (429) and the pool cools for ``cooled`` seconds
        (``hinted``: the server said so; else that is the longest it backs off for):
        returns how long it cools.  ``in_flight``: the pool's calls still in flight;
        ``told``: the rate the 429's own numbers give (calls a second), if any; ``model``: the
        model whose limit it names, if it names one; ``limit``: the requests its window
        admits, when it names a window's size and end but no rate (or when its headers name
        it); ``reset``: when its headers say that limit is back in full; ``sliding``: its
        numbers are a sliding window's, which a pool not paced yet keeps to (:meth:`_slid`).

        The pool is paced a little below the rate the server admitted between its previous
        429 and this one (the calls that succeeded, over the time the pool was busy), and
        never above ``told``: what was admitted holds for every limiter, for a server that
        says no number at all, and for a key that other processes share unseen (the numbers
        are the key's, not this process's share of it); the numbers pace the pool at once,
        before a span is measured (``pace_of`` takes them only from a refilling bucket: from
        windows they say when the window ends).  Each success then raises the pace a little
        (:meth:`admit`), so a pace found too low rises, and a pace too high meets the next
        429, which measures again.

        The calls in flight at a 429 were sent before it: their 429s are of the same excess
        and teach nothing more (they are ``stale``), and their successes were admitted before
        it, so the span is measured once they have all ended."""
        if model is not None:
            self._model(model)
        if self.bucket_rate() is not None:
            # Paced by its refilling bucket, the pool sent this call once the bucket had room:
            # others spend it unseen (processes with a state of their own, other programs),
            # or requests reach the server in more uneven times than the margin allows (see
            # _bucket_ready).  Paced by what it sends, the pool would keep sending into them:
            # it waits for the reset again, for good.
            self._bucket_end()
            self.bucket_shared = True
        self._forget_returns()  # (the server counted more than the pool knew of)
        since = self.limited_at
        stale = self.stale > 0 and since is not None and now < since + UNANSWERED_FOR
        if not hinted:  # a backoff from the pace, doubled by each fresh 429 without a success
            if not stale:
                self.hintless += 1
            first = BLIND_FIRST if self.pace is None else 1.0 / self.pace
            cooled = min(cooled, first * 2.0 ** max(0, self.hintless - 1))
        if self.pace_model == MIXED or self.snapshot >= 0:
            # (Nor is a pool whose answers' headers tell its budget: they pace it better; and
            # they may be of another model than the 429's.)
            return cooled
        if stale:
            self._over()  # (after a minute, one of them was never reported: go on)
            return cooled if hinted else self._measured_backoff(cooled)
        if (
            reset is not None and limit is not None and limit <= SLIDE_MOST and hinted
            and (self.slide_period is not None or (sliding and self.pace is None))
            and self._slid(now, cooled, reset, limit)
        ):
            self.limited_at, self.idle, self.stale = now + cooled, 0.0, in_flight
            self.closing, self.admitted = None, 0  # (no span to measure: no pace)
            return cooled
        if self.slide_period is not None:  # (the span kept to a window, in bursts, is no pace)
            self.slide_period, self.slide_opens, since = None, [], None
        # A 429 that gives no rate but says when the server admits again may tell where the
        # server's window ends: once two have, the pool is allowed per window, not paced.
        was = self.period is not None
        if told is None and hinted and 0 < cooled <= MAX_PERIOD:
            windows = self._window_told(now, now + cooled, limit)
        else:
            windows, self.period, self.period_told = False, None, None
        if windows:
            self.pace = None  # (allowed per window instead)
        elif was:
            since = None  # the span spent in windows, bursts at their start, is no pace
        if self.closing is not None:  # the span before is still to measure: now, then
            self._close()
        # Spans run from where the server said it admits again (or from the 429, without a
        # hint): a window's 429 says where it ends, so its admissions come after that.
        mark = now + cooled if hinted else now
        self.closing = None if since is None else mark - since - self.idle
        self.told = told
        if told is not None:
            paced = PACE_BACKOFF * told
            if self.pace is None or paced < self.pace:
                self.pace = paced
        if self.pace is not None:
            self.allowance = None
        elif windows:
            pass  # (its window is spent until its end)
        elif told is None:
            # No rate (a window's end, or no numbers at all): until a span is measured, once
            # the pool cooled, as many calls go as the limit's size (``limit``; else as many as
            # were admitted since the pool began or was last measured — or a window's, when it
            # just left the windows it knew), then one more, a little later, whose 429 tells
            # where the limit stands — instead of every caller that waited rushing into it.
            admitted = math.floor(self.period_size) if was else max(1, self.admitted)
            self.allowance = float(limit if limit is not None else admitted)
        self.limited_at, self.idle, self.stale = mark, 0.0, in_flight
        if not in_flight:
            self._close()
        if not hinted:
            cooled = self._measured_backoff(cooled)
        # The pace restarts empty where the server admits again: the call it lets go then runs
        # on credit, and the next waits two slots (processes sharing the key unseen each retry
        # less often into a server that counts rejected requests).
        self.pace_level, self.pace_stamp = 0.0, now + cooled
        return cooled

    def _slid(self, now: float, wait: float, reset: float, limit: int) -> bool:
        """A sliding window's 429 (or any that gives its numbers, once one did): the window
        counts ``limit`` requests, the first aging out in ``wait`` seconds and the last in
        ``reset``.  The pool keeps to it: a call goes when one of the requests it counts has
        aged out, and counts there for the window's length from when it left — ``reset`` and
        ``SLIDE_SLACK`` more (the last admission came a moment before the 429), and as much
        longer as a 429 that met the pool keeping to it says it came early, up to
        ``SLIDE_STRETCH`` more (429s that others caused would lengthen it for good).
        Unlike a pace, this keeps the shape of a burst: a window that began with one admits
        its size again a window later, where a pace spreads it over the window and loses part
        of it.  (A window over ``SLIDE_MOST`` requests is paced instead: the pool would keep
        too long a list.)

        After such a 429, what the window counts is first the pool's own calls but the one
        that met it (the last the pool counted: it left last, or with the one that did), each
        aging out as much later as the call came early, or as the window grew if that is
        more; then the requests the pool does not know of, one aging out at the wait and the
        others with the last; and the last no sooner than the reset.  When it does not know
        of two or more, and fewer than a window's worth of its calls succeeded since the last
        429, others share the window unseen: ``False``, the pool is paced instead."""
        first, last = now + wait, now + max(wait, reset)
        opens: list[float] = []
        least = reset * (1.0 + SLIDE_SLACK)
        if self.slide_period is None:
            self.slide_least = self.slide_period = least
        else:  # it came ``wait`` early: so will the others the pool counts, as it counts them
            least = max(self.slide_least, least)
            period = min(max(least, self.slide_period + wait), least * (1.0 + SLIDE_STRETCH))
            # (what the pool counts ages out as much later as the window grew, if more)
            later = max(wait, period - self.slide_period)
            opens = [at + later for at in self.slide_opens[:-1] if at > now]
            if len(opens) < limit - 1 and self.admitted < limit:
                # The window counts more than the pool's calls, and a window's worth of them
                # did not succeed since the last 429: others share it unseen (processes with
                # a state of their own, other programs).  A pace measured from what the pool
                # is admitted takes its share; keeping to the whole window would not (and a
                # paced pool keeps to no window).
                return False
            self.slide_least, self.slide_period = least, period
        missing = limit - len(opens)
        if missing > 0:
            opens += [first] + [last] * (missing - 1)
        opens.sort()
        del opens[: max(0, len(opens) - limit)]
        opens[-1] = max(opens[-1], last)
        self.slide_size, self.slide_opens = limit, opens
        self.pace = self.allowance = self.period = self.period_told = None
        return True

    def _measured_backoff(self, cooled: float) -> float:
        """A 429 that named no delay backs off ``cooled`` (one call of the pace the pool had,
        or BLIND_FIRST, doubled by each such 429 since a success): or one call of the pace
        its span just measured, when the pool had none — or, while that span waits for the
        calls in flight at its 429, of the pace what it admitted so far gives (the measure
        will not be below it) — if that is shorter."""
        doubled = 2.0 ** max(0, self.hintless - 1)
        if self.pace is not None:
            return min(cooled, 1.0 / self.pace * doubled)
        span = self.closing
        if span is not None and span > 0 and self.admitted:
            return min(cooled, 1.0 / (PACE_BACKOFF * (self.admitted / span)) * doubled)
        return cooled

    def _over(self) -> None:
        """One of the calls in flight at the last 429 ended: once all have, the span is
        measured."""
        self.stale -= 1
        if not self.stale:
            self._close()

    def _close(self) -> None:
        """Measure the span that ended at the last 429 (if one did), and begin the next.  A
        span in which nothing was admitted halves the pace: the pool keeps to it, so others
        (processes that share its keys unseen) take the server's limit — and a 429 they cause
        that names a short wait would otherwise be met again at once, keeping the server's
        count full (rejected requests count) so that nobody is admitted."""
        span = self.closing
        if self.period is not None:  # (allowed per window, not paced)
            pass
        elif span is not None and span > 0 and self.admitted > 0:
            measured = self.admitted / span
            told = self.told
            self.pace = PACE_BACKOFF * (told if told is not None and told < measured else measured)
        elif span is not None and span > 0 and self.pace is not None:
            self.pace *= PACE_DROP
        if self.pace is not None:
            self.allowance = None
        self.closing = None
        self.admitted = 0

    def _model(self, model: str) -> None:
        """A call or a 429 named ``model``: the pool's first, or it serves two (MIXED)."""
        known = self.pace_model
        if known != model and known != MIXED:
            if known is None:
                self.pace_model = model
            else:  # two models: not paced from 429s any more (see MIXED), nor from the
                # headers of answers, each of one model's limit: they are not the pool's
                self.pace_model, self.pace, self.stale, self.closing = MIXED, None, 0, None
                self.allowance = self.period = self.period_told = self.slide_period = None
                self.requests_limit = None
                self.requests_left = None
                self._bucket_forget()
                self.snapshot = -1
                self.requests_reset_at = self.requests_order_at = self.requests_sent_at = 0.0
                self._forget_returns()
                self.window_start = self.window_reset = None
                self.tokens_limit = self.tokens_left = None
                self.tokens_reset_at = 0.0
                self.probing = False

    def admit(self, model: str | None = None) -> None:
        """A call on the pool succeeded (``model``: the one it asked for, if known)."""
        if model is not None and model != self.pace_model:
            self._model(model)
        self.admitted += 1
        if self.period is not None:
            self.period_admitted += 1
        self.hintless = 0
        if self.pace is not None:
            self.pace *= 1.0 + PACE_GAIN
        if self.stale:
            self._over()

    def ended(self) -> None:
        """A call on the pool ended without a success nor a 429 that :meth:`limited` saw."""
        if self.stale:
            self._over()
