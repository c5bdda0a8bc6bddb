"""The key ring: the state of every key and pool, and choosing a key.  Pure: no locks, no I/O.

Every key is in exactly one place: a *ready* bucket, the *cooling* heap, or nowhere
(disabled or removed).  Ready keys sit in buckets indexed by their load level — calls in
flight divided by the key's weight — and each bucket is an ``OrderedDict`` kept in
least-recently-used order.  ``choose()`` takes the first key of the lowest non-empty bucket:
fewest calls in flight (for its weight), then least recently used, in O(1) whatever the
number of keys.  Cooling keys wait in a min-heap of deadlines on an injected monotonic clock.

Keys that share one budget on the server (the same organization and project) form a
:class:`Pool`: a rate limit on one key cools them all, and the pool's budget — paced
client-side when the user gave ``rpm``/``tpm``, and learned from the server's
``x-ratelimit-*`` headers — is spent by all of them.  The caller (``KeyManager``) holds one
lock around every method.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator

from ._budget import Bucket, ServerBudget
from ._cause import Cause
from ._keys import Key, KeyLike, fingerprint, mask, normalize_keys
from ._policy import Fate, Verdict

__all__ = [
    "MAX_RESET",
    "NEW_WINDOW",
    "PROBE_CALLS",
    "PROBE_WAIT",
    "KeyRing",
    "KeyState",
    "Pool",
    "Where",
    "fingerprint",
    "mask",
    "normalize_keys",
]

#: A learned budget is trusted for at most this long without a fresh response.
MAX_RESET = 3600.0
#: An answer whose reset is this much later than the one known is from a new window.
NEW_WINDOW = 0.1
#: How long a pool whose budget is spent waits when it does not know the reset yet: about
#: the time an answer needs to come back and tell.
PROBE_WAIT = 0.05
#: Calls per key a pool sends before an answer has told its budget.
PROBE_CALLS = 2


#: Where a request stood when it left: its pool, and that pool's request and token counts.
Marks = tuple["Pool", int, float]


class Where(enum.Enum):
    """Where a key is in the ring."""

    READY = "ready"
    COOLING = "cooling"
    DISABLED = "disabled"
    REMOVED = "removed"


class Pool:
    """Keys sharing one budget, and what is known of that budget."""

    __slots__ = (
        "avg_tokens",
        "hooked",
        "in_flight",
        "learned",
        "members",
        "name",
        "outstanding",
        "probing",
        "request_bucket",
        "requests_left",
        "requests_limit",
        "requests_refilled",
        "requests_reset_at",
        "sent",
        "snapshot",
        "token_bucket",
        "tokens_in_flight",
        "tokens_left",
        "tokens_limit",
        "tokens_refilled",
        "tokens_reset_at",
        "tokens_sent",
        "window_reset",
        "window_start",
    )

    def __init__(self, name: str, learned: bool = False) -> None:
        self.name = name
        self.learned = learned  # named after what the server said, not after one key
        self.members: list[KeyState] = []
        self.in_flight = 0
        self.tokens_in_flight = 0.0
        self.avg_tokens = 0.0  # a moving average of the tokens a request costs
        self.request_bucket: Bucket | None = None  # client-side pacing (Key.rpm)
        self.token_bucket: Bucket | None = None  # client-side pacing (Key.tpm)
        # What the server's headers said, brought up to date with what was sent since:
        self.sent = 0  # calls started on the pool, ever
        self.tokens_sent = 0.0  # tokens of the requests sent, ever
        self.hooked = 0  # requests seen leaving by the pooled client's hook, ever
        self.outstanding: list[int] = []  # ``hooked`` marks of requests not answered yet
        self.snapshot = -1  # ``hooked`` mark of the request behind the freshest headers
        self.probing = False  # a few calls go out first, to learn the budget from their answers
        self.requests_left: float | None = None
        self.requests_limit: int | None = None
        self.requests_reset_at = 0.0
        self.requests_refilled = 0.0  # the reset already refilled: answers before it are stale
        self.tokens_left: float | None = None
        self.tokens_limit: int | None = None
        self.tokens_reset_at = 0.0
        self.tokens_refilled = 0.0
        # A window that began at a refill admits its limit less the calls started since
        # ``window_start`` (answers may come out of order; this count never does), until an
        # answer shows a later window than the first one it saw (``window_reset``).
        self.window_start: int | None = None
        self.window_reset: float | None = None

    def window_bound(self, left: float) -> float:
        """``left``, or less: at most what is left of a window that began at a refill."""
        if self.window_start is None or self.requests_limit is None:
            return left
        return min(left, self.requests_limit - (self.sent - self.window_start))

    def __repr__(self) -> str:
        return f"<Pool {self.name} keys={len(self.members)} in_flight={self.in_flight}>"


class KeyState:
    """One key's state and counters.  Identity-hashed; only the ring mutates it."""

    __slots__ = (
        "calls",
        "cause",
        "clients",
        "cool_until",
        "cooled",
        "failures",
        "fingerprint",
        "forbidden",
        "in_flight",
        "key",
        "level",
        "masked",
        "pool",
        "rate_limits",
        "reason",
        "serial",
        "spec",
        "successes",
        "weight",
        "where",
    )

    def __init__(self, spec: Key, serial: int, pool: Pool) -> None:
        self.spec = spec
        self.key = spec.key
        self.masked = mask(spec.key)
        self.fingerprint = fingerprint(spec.key)
        self.serial = serial
        self.weight = float(spec.weight)
        self.pool = pool
        self.where = Where.READY
        self.in_flight = 0
        self.level = 0
        self.cool_until = 0.0
        self.cooled = 0  # the heap entry of its current cooling (see KeyRing._set_deadline)
        self.reason = ""  # for people; ``cause`` decides
        self.cause: Cause | None = None
        self.forbidden = False
        self.calls = 0
        self.successes = 0
        self.rate_limits = 0
        self.failures = 0
        self.clients: dict[object, object] = {}  # pooled openai clients, owned by _clients

    def __repr__(self) -> str:
        return f"<KeyState {self.masked} {self.where.value} in_flight={self.in_flight}>"


class KeyRing:
    """The keys, their pools and states; see the module docstring for the structure."""

    def __init__(
        self, keys: Iterable[KeyLike] = (), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self._states: dict[str, KeyState] = {}
        self._pools: dict[str, Pool] = {}
        self._buckets: list[OrderedDict[KeyState, None]] = [OrderedDict()]
        self._low = 0  # no ready key sits in a bucket below this index
        self._cooling: list[tuple[float, int, KeyState]] = []  # (deadline, push no., state)
        self._pushes = 0
        self._serial = 0
        self.add(keys)

    # -- membership -----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[KeyState]:
        return iter(list(self._states.values()))

    def find(self, key: str) -> KeyState | None:
        return self._states.get(key)

    def pools(self) -> list[Pool]:
        return list(self._pools.values())

    def add(self, keys: Iterable[KeyLike]) -> list[KeyState]:
        """Add keys; a disabled key given again is enabled again.  Returns the new states."""
        added = []
        for spec in (key if isinstance(key, Key) else Key(key) for key in keys):
            state = self._states.get(spec.key)
            if state is None:
                self._serial += 1
                pool = self._pool(spec.pool or f"key:{self._serial}", learned=bool(spec.pool))
                state = KeyState(spec, self._serial, pool)
                pool.members.append(state)
                self._pace(pool, spec)
                self._states[spec.key] = state
                self._buckets[0][state] = None
                self._low = 0
                added.append(state)
            elif state.where is Where.DISABLED:
                self._make_ready(state)
        return added

    def reconfigure(self, keys: Iterable[KeyLike]) -> None:
        """Make the ring hold exactly ``keys``: present keys keep their state, others leave."""
        specs = normalize_keys(keys)
        keep = {spec.key for spec in specs}
        for key in [key for key in self._states if key not in keep]:
            self.remove(key)
        self.add(specs)
        self._states = {spec.key: self._states[spec.key] for spec in specs}

    def remove(self, key: str) -> bool:
        state = self._states.pop(key, None)
        if state is None:
            return False
        self._leave(state)
        state.where = Where.REMOVED
        pool = state.pool
        pool.members.remove(state)
        pool.in_flight -= state.in_flight
        if not pool.members:
            del self._pools[pool.name]
        return True

    def _pool(self, name: str, learned: bool) -> Pool:
        pool = self._pools.get(name)
        if pool is None:
            pool = self._pools[name] = Pool(name, learned)
        return pool

    def _pace(self, pool: Pool, spec: Key) -> None:
        now = self.clock()
        if spec.rpm is not None and pool.request_bucket is None:
            pool.request_bucket = Bucket(spec.rpm, now)
        if spec.tpm is not None and pool.token_bucket is None:
            pool.token_bucket = Bucket(spec.tpm, now)

    def join_pool(self, state: KeyState, name: str) -> None:
        """Move ``state`` into the pool the server says it belongs to."""
        old = state.pool
        if old.name == name or state.spec.pool is not None or state.where is Where.REMOVED:
            return
        if name not in self._pools and old.members == [state]:
            # The key's own pool gets the server's name, keeping what it counted so far.
            del self._pools[old.name]
            old.name = name
            old.learned = True
            self._pools[name] = old
            return
        new = self._pool(name, learned=True)
        old.members.remove(state)
        old.in_flight -= state.in_flight
        new.members.append(state)
        new.in_flight += state.in_flight
        # Its calls in flight may reach the server after the pool's answers were counted:
        # hold them as unanswered requests older than any of the pool's own.
        new.outstanding[0:0] = [0] * state.in_flight
        state.pool = new
        self._pace(new, state.spec)
        if not old.members:
            del self._pools[old.name]

    # -- choosing and releasing --------------------------------------------------------------
    def choose(self, avoid: frozenset[KeyState] | set[KeyState] | None = None) -> KeyState | None:
        """Take the ready key with the lowest load, least recently used first, and mark it
        in flight.  Keys in ``avoid`` are taken only when no other is ready.  ``None`` when
        no key is ready."""
        cooling = self._cooling
        if cooling and cooling[0][0] <= self.clock():
            self._promote()
        buckets = self._buckets
        low = self._low
        top = len(buckets)
        while low < top and not buckets[low]:
            low += 1
        self._low = low
        if low == top:
            return None
        if avoid:
            state = self._first_not_in(avoid, low) or next(iter(buckets[low]))
            del buckets[state.level][state]
        else:
            state = buckets[low].popitem(last=False)[0]
        self._mark_taken(state, True)
        return state

    def _first_not_in(
        self, avoid: frozenset[KeyState] | set[KeyState], low: int
    ) -> KeyState | None:
        for bucket in self._buckets[low:]:
            for state in bucket:
                if state not in avoid:
                    return state
        return None

    def release(self, state: KeyState) -> None:
        """The call on ``state`` is over, whatever its outcome."""
        if state.in_flight <= 0:  # e.g. a call that began before os.fork() ends in the child
            return
        in_flight = state.in_flight = state.in_flight - 1
        level = in_flight if state.weight == 1.0 else int(in_flight / state.weight)
        if state.where is Where.READY:
            buckets = self._buckets
            del buckets[state.level][state]
            buckets[level][state] = None
            if level < self._low:
                self._low = level
        state.level = level
        if state.where is Where.REMOVED:  # remove() already took its calls off the pool
            return
        pool = state.pool
        pool.in_flight -= 1
        if not pool.in_flight:  # no call in flight, so nothing unanswered (heals lost answers)
            pool.tokens_in_flight = 0.0
            pool.outstanding.clear()
            # Calls that never sent a request (they failed first) no longer count as started
            # but unseen: with none in flight, the calls started are the requests seen leaving.
            never_sent = pool.sent - pool.hooked
            if never_sent > 0:
                pool.sent -= never_sent
                if pool.window_start is not None:
                    pool.window_start -= never_sent

    def take(self, state: KeyState) -> None:
        """Mark ``state`` in flight, for a key chosen elsewhere (by a shared backend), as
        :meth:`choose` marks the key it chose.  A key not ready here is counted all the same:
        the shared state, which chose it, knows better than this process."""
        ready = state.where is Where.READY
        if ready:
            del self._buckets[state.level][state]
        self._mark_taken(state, ready)

    def _mark_taken(self, state: KeyState, ready: bool) -> None:
        """One more call in flight on ``state`` (already out of its ready bucket, when
        ``ready``): its new load level, its pool's counts and budget."""
        state.calls += 1
        in_flight = state.in_flight = state.in_flight + 1
        level = state.level = in_flight if state.weight == 1.0 else int(in_flight / state.weight)
        if ready:
            buckets = self._buckets
            while level >= len(buckets):
                buckets.append(OrderedDict())
            buckets[level][state] = None
        pool = state.pool
        pool.in_flight += 1
        pool.sent += 1
        if pool.requests_left is not None or pool.request_bucket is not None:
            self._spend_request(pool)

    def give_back(self, state: KeyState) -> None:
        """Undo :meth:`choose` for a key that was only handed out (``get_key()``), not called."""
        state.calls -= 1
        self.release(state)

    def succeed(self, state: KeyState) -> None:
        state.successes += 1
        self.release(state)

    def fail(self, state: KeyState, *, rate_limited: bool = False) -> None:
        if rate_limited:
            state.rate_limits += 1
        else:
            state.failures += 1
        self.release(state)

    # -- budgets -----------------------------------------------------------------------------
    def _spend_request(self, pool: Pool) -> None:
        """A call leaves ``pool``: cool the pool if that spends its budget."""
        now = self.clock()
        if pool.requests_left is not None:
            self._refresh(pool, now, fresh=1)
            if pool.requests_left is not None:
                pool.requests_left = pool.window_bound(pool.requests_left - 1)
                if pool.requests_left <= 0:
                    # Until the server's reset, or until an answer says when that is.
                    reset_at = pool.requests_reset_at
                    until = reset_at if reset_at > now else now + PROBE_WAIT
                    self.cool_pool(pool, 0.0, "budget spent (RPM)", Cause.REQUESTS_SPENT,
                                   until=until)
        bucket = pool.request_bucket
        if bucket is not None:
            bucket.take(1.0, now)
            wait = bucket.ready_in(now)
            if wait > 0:
                self.cool_pool(pool, wait, "paced (rpm)", Cause.PACED)

    def _refresh(self, pool: Pool, now: float, fresh: int = 0) -> None:
        """Past the server's reset, the pool's full budget is back (less what is in flight).
        ``fresh``: calls already counted in ``sent`` that belong to the new window."""
        reset_at = pool.requests_reset_at
        if reset_at and now >= reset_at and pool.requests_refilled < reset_at:
            pool.requests_refilled = reset_at
            pool.requests_left = (
                None if pool.requests_limit is None else pool.requests_limit - pool.in_flight
            )
            pool.snapshot = pool.hooked
            pool.window_start = pool.sent - fresh
            pool.window_reset = None
        reset_at = pool.tokens_reset_at
        if reset_at and now >= reset_at and pool.tokens_refilled < reset_at:
            pool.tokens_refilled = reset_at
            pool.tokens_left = (
                None if pool.tokens_limit is None else pool.tokens_limit - pool.tokens_in_flight
            )

    def spend_tokens(self, state: KeyState, tokens: float) -> Marks:
        """A request of about ``tokens`` tokens is being sent on ``state``.  Returns its marks
        (calls started, tokens sent) for :meth:`learn` to place its answer."""
        pool = state.pool
        now = self.clock()
        pool.tokens_in_flight += tokens
        pool.tokens_sent += tokens
        pool.hooked += 1
        pool.outstanding.append(pool.hooked)
        pool.avg_tokens = tokens if not pool.avg_tokens else 0.8 * pool.avg_tokens + 0.2 * tokens
        if pool.tokens_left is not None:
            self._refresh(pool, now)
            if pool.tokens_left is not None:
                pool.tokens_left -= tokens
                if pool.tokens_left < pool.avg_tokens:
                    reset_at = pool.tokens_reset_at
                    wait = reset_at - now if reset_at > now else PROBE_WAIT
                    self.cool_pool(pool, wait, "budget spent (TPM)", Cause.TOKENS_SPENT)
        bucket = pool.token_bucket
        if bucket is not None:
            bucket.take(tokens, now)
            wait = bucket.ready_in(now, pool.avg_tokens)
            if wait > 0:
                self.cool_pool(pool, wait, "paced (tpm)", Cause.PACED)
        return pool, pool.hooked, pool.tokens_sent

    def probe(self, state: KeyState) -> None:
        """``state`` will be called through a client whose answers tell the budget: until the
        first one does, its pool sends only a few calls instead of a burst."""
        pool = state.pool
        if pool.requests_left is None and pool.snapshot < 0 and not pool.probing:
            pool.probing = True
            pool.requests_left = float(PROBE_CALLS * len(pool.members)) - pool.in_flight

    def correct_tokens(self, state: KeyState, estimated: float, actual: float) -> None:
        """The server counted ``actual`` tokens for a request estimated at ``estimated``."""
        bucket = state.pool.token_bucket
        if bucket is not None and actual != estimated:
            bucket.take(actual - estimated, self.clock())

    def answered(self, state: KeyState, tokens: float, marks: Marks | None = None) -> None:
        """The server answered a request of ``tokens`` tokens: they are no longer in flight."""
        pool = state.pool
        pool.tokens_in_flight = max(0.0, pool.tokens_in_flight - tokens)
        if marks is None:
            return
        outstanding = pool.outstanding
        if marks[0] is pool:
            index = bisect.bisect_left(outstanding, marks[1])
            if index < len(outstanding) and outstanding[index] == marks[1]:
                del outstanding[index]
        elif outstanding and outstanding[0] == 0:  # sent before its key joined this pool
            del outstanding[0]

    def learn(self, state: KeyState, budget: ServerBudget, marks: Marks | None = None) -> bool:
        """Take in what a successful response's headers say about ``state``'s pool.

        The remainders count the requests the server admitted up to this one; what the pool
        sent after it (``marks`` says where it stood) is taken off.  Only the freshest
        answer counts, unless it shows a new window.  A pool whose budget is spent cools
        until the server's reset.  Returns whether keys became ready.
        """
        if state.where is Where.REMOVED:
            return False
        if budget.organization:
            name = budget.organization
            if budget.project:
                name = f"{name}/{budget.project}"
            self.join_pool(state, name)
        pool = state.pool
        now = self.clock()
        if marks is not None and marks[0] is not pool:
            return False  # sent before its key joined this pool: its place here is unknown
        _, mark, tokens_sent = marks if marks is not None else (pool, pool.hooked, pool.tokens_sent)
        # Not in the server's count: every call started after this request left, and — as
        # requests may overtake each other on the way — those that left before it and are
        # still unanswered.
        # (Calls started on another pool before their key joined this one hook here without
        # having been counted as started: hence the max.)
        started = max(pool.sent, pool.hooked)
        unseen = started - mark + bisect.bisect_left(pool.outstanding, mark)
        if budget.requests_limit is not None:
            pool.requests_limit = budget.requests_limit
        if budget.tokens_limit is not None:
            pool.tokens_limit = budget.tokens_limit
        freed = False
        if budget.requests_left is not None and budget.requests_reset is not None:
            reset_at = now + min(budget.requests_reset, MAX_RESET)
            if reset_at <= pool.requests_refilled + NEW_WINDOW:
                pass  # an answer from a window already over and refilled: stale
            elif mark >= pool.snapshot or reset_at > pool.requests_reset_at + NEW_WINDOW:
                pool.probing = False
                pool.snapshot = mark
                pool.requests_reset_at = reset_at
                if pool.window_start is not None:
                    if pool.window_reset is None:
                        pool.window_reset = reset_at
                    elif reset_at > pool.window_reset + NEW_WINDOW:  # a later window
                        pool.window_start = pool.window_reset = None
                pool.requests_left = pool.window_bound(budget.requests_left - unseen)
                if pool.requests_left <= 0:
                    self.cool_pool(pool, 0.0, "budget spent (RPM)", Cause.REQUESTS_SPENT,
                                   until=reset_at)
                else:
                    freed = self._uncool_budget(pool)
        elif pool.probing:  # the server sends no budget headers: nothing to wait for
            pool.probing = False
            pool.requests_left = None
            freed = self._uncool_budget(pool)
        if budget.tokens_left is not None and budget.tokens_reset is not None:
            reset_at = now + min(budget.tokens_reset, MAX_RESET)
            if reset_at <= pool.tokens_refilled + NEW_WINDOW:
                pass  # stale, as above
            elif mark >= pool.snapshot or reset_at > pool.tokens_reset_at + NEW_WINDOW:
                pool.tokens_reset_at = reset_at
                pool.tokens_left = budget.tokens_left - (pool.tokens_sent - tokens_sent)
                if pool.tokens_left < max(1.0, pool.avg_tokens):
                    self.cool_pool(pool, 0.0, "budget spent (TPM)", Cause.TOKENS_SPENT,
                                   until=reset_at)
        return freed

    def _uncool_budget(self, pool: Pool) -> bool:
        """An answer shows budget left: members held only for a spent budget are ready."""
        freed = False
        for member in pool.members:
            if member.where is Where.COOLING and member.cause is Cause.REQUESTS_SPENT:
                self._make_ready(member)
                freed = True
        return freed

    def cool_pool(
        self,
        pool: Pool,
        seconds: float,
        reason: str,
        cause: Cause = Cause.UNSPECIFIED,
        *,
        until: float | None = None,
    ) -> None:
        """Cool every key of ``pool`` (until ``until``, when given): they share the budget
        that is spent."""
        for member in pool.members:
            self.cool(member, seconds, reason, cause, until=until)

    # -- cooling and disabling ---------------------------------------------------------------
    def cool(
        self,
        state: KeyState,
        seconds: float,
        reason: str,
        cause: Cause = Cause.UNSPECIFIED,
        *,
        forbidden: bool = False,
        until: float | None = None,
    ) -> None:
        """Cool ``state`` for ``seconds`` (or until the clock reads ``until``); an already
        later deadline is kept."""
        if state.where in (Where.DISABLED, Where.REMOVED):
            return
        deadline = until if until is not None else self.clock() + max(0.0, seconds)
        if state.where is Where.COOLING and state.cool_until >= deadline:
            return
        self._set_deadline(state, deadline, reason, cause, forbidden)

    def set_cooldown(self, state: KeyState, seconds: float, reason: str = "set_ttl") -> None:
        """Set the cooldown to exactly ``seconds`` from now (0 makes the key ready now)."""
        if state.where in (Where.DISABLED, Where.REMOVED):
            return
        if seconds <= 0:
            if state.where is Where.COOLING:
                self._make_ready(state)
            return
        self._set_deadline(state, self.clock() + seconds, reason, Cause.SET_BY_USER, False)

    def disable(self, state: KeyState, reason: str, cause: Cause = Cause.UNSPECIFIED) -> bool:
        """Disable ``state`` until it is given again; ``True`` if it was not disabled before."""
        if state.where in (Where.DISABLED, Where.REMOVED):
            return False
        self._leave(state)
        state.where = Where.DISABLED
        state.reason = reason
        state.cause = cause
        return True

    def apply_verdict(
        self, state: KeyState, verdict: Verdict, organization: str | None = None
    ) -> bool:
        """Apply what a failure means to ``state`` (and its pool).  ``organization`` (named by
        a 429 message) becomes the key's pool if it has none yet.  ``True`` if this disabled
        the key (it was not disabled before)."""
        if organization and not state.pool.learned:
            self.join_pool(state, organization)
        if verdict.fate is Fate.COOL:
            if verdict.pooled:
                self.cool_pool(state.pool, verdict.seconds, verdict.reason, verdict.cause)
            else:
                self.cool(
                    state, verdict.seconds, verdict.reason, verdict.cause,
                    forbidden=verdict.forbidden,
                )
        elif verdict.fate is Fate.DISABLE:
            return self.disable(state, verdict.reason, verdict.cause)
        return False

    def seconds_left(self, state: KeyState) -> float:
        """Seconds until ``state`` is ready: 0 when ready, ``inf`` when disabled."""
        if state.where is Where.COOLING:
            return max(0.0, state.cool_until - self.clock())
        if state.where is Where.READY:
            return 0.0
        return math.inf

    def next_ready_in(self) -> float | None:
        """Seconds until the first cooling key is ready; ``None`` when none is cooling."""
        self._drop_stale_cooling()
        if not self._cooling:
            return None
        return max(0.0, self._cooling[0][0] - self.clock())

    def reasons(self, where: Where) -> Counter[str]:
        """How many keys are in ``where``, by reason (for error messages; O(n))."""
        return Counter(s.reason or where.value for s in self._states.values() if s.where is where)

    def all_usable_forbidden(self) -> bool:
        """True when every key not disabled is benched for a 403."""
        usable = [s for s in self._states.values() if s.where is not Where.DISABLED]
        return bool(usable) and all(s.where is Where.COOLING and s.forbidden for s in usable)

    def forget_in_flight(self) -> None:
        """Zero every in-flight count (a forked child has none of its parent's calls)."""
        for state in self._states.values():
            if state.where is Where.READY:
                self._leave(state)
                state.in_flight = state.level = 0
                self._make_ready(state)
            else:
                state.in_flight = state.level = 0
        for pool in self._pools.values():
            pool.in_flight = 0
            pool.tokens_in_flight = 0.0
            pool.outstanding.clear()

    # -- internals -----------------------------------------------------------------------------
    def _leave(self, state: KeyState) -> None:
        """Take ``state`` out of the ready buckets (cooling heap entries go stale by themselves)."""
        if state.where is Where.READY:
            del self._buckets[state.level][state]

    def _make_ready(self, state: KeyState) -> None:
        state.where = Where.READY
        state.cool_until = 0.0
        state.reason = ""
        state.cause = None
        state.forbidden = False
        buckets = self._buckets
        while state.level >= len(buckets):
            buckets.append(OrderedDict())
        buckets[state.level][state] = None
        if state.level < self._low:
            self._low = state.level

    def _set_deadline(
        self, state: KeyState, deadline: float, reason: str, cause: Cause, forbidden: bool
    ) -> None:
        self._leave(state)
        state.where = Where.COOLING
        state.cool_until = deadline
        state.reason = reason
        state.cause = cause
        state.forbidden = forbidden
        self._pushes += 1
        state.cooled = self._pushes  # this cooling's entry in the heap: older ones are stale
        heapq.heappush(self._cooling, (deadline, self._pushes, state))
        if len(self._cooling) > 2 * len(self._states) + 16:
            self._cooling = [e for e in self._cooling if self._is_current(e)]
            heapq.heapify(self._cooling)

    @staticmethod
    def _is_current(entry: tuple[float, int, KeyState]) -> bool:
        _, pushed, state = entry
        return state.where is Where.COOLING and state.cooled == pushed

    def _drop_stale_cooling(self) -> None:
        cooling = self._cooling
        while cooling and not self._is_current(cooling[0]):
            heapq.heappop(cooling)

    def promote_due(self) -> None:
        """Make the keys whose cooldown is over ready now (choosing does so by itself)."""
        cooling = self._cooling
        if cooling and cooling[0][0] <= self.clock():
            self._promote()

    def _promote(self) -> None:
        now = self.clock()
        cooling = self._cooling
        while cooling and cooling[0][0] <= now:
            entry = heapq.heappop(cooling)
            if self._is_current(entry):
                state = entry[2]
                self._refresh(state.pool, now)
                self._make_ready(state)
