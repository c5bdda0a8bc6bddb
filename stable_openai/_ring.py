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

import dataclasses
import enum
import heapq
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterable, Iterator

from ._budget import Bucket, ServerBudget
from ._cause import Cause
from ._keys import Key, KeyLike, fingerprint, mask, normalize_keys
from ._limits import Lesson
from ._model import (
    ALLOWANCE_PROBES,
    FREED,
    MIXED,
    PACE_GAIN,
    PER_DAY,
    PROBE_FOR,
    PROBE_WAIT,
    SAME_DEADLINE,
    Budget,
    Spent,
)
from ._policy import Fate, Verdict

__all__ = [
    "KeyRing",
    "KeyState",
    "Pool",
    "Where",
    "fingerprint",
    "mask",
    "normalize_keys",
]

#: Where a request stood when it left: its pool, and its mark there (``Budget.send``).
Marks = tuple["Pool", int]


class Where(enum.Enum):
    """Where a key is in the ring."""

    READY = "ready"
    COOLING = "cooling"
    DISABLED = "disabled"
    REMOVED = "removed"


#: Why a pool's keys may cool that another request of a call already under way waits out:
#: a budget of the pool (a key's own trouble — no quota, 403 — is not waited for).
_HELD_BY_BUDGET = frozenset(
    (Cause.RATE_LIMITED, Cause.REQUESTS_SPENT, Cause.TOKENS_SPENT, Cause.PACED)
)

# Where's members, as plain names: an enum member looked up on its class costs ~0.1 µs
# (Python 3.11), and the path of every call asks where its key is.
READY, COOLING, DISABLED, REMOVED = Where.READY, Where.COOLING, Where.DISABLED, Where.REMOVED


class Pool(Budget):
    """Keys sharing one budget: its members, its calls in flight, its client-side pacing,
    and (from :class:`~stable_openai._model.Budget`) what is known of the server's budget."""

    __slots__ = (
        "in_flight",
        "lane_back",
        "lane_out",
        "lane_paces",
        "lane_probes",
        "lanes",
        "learned",
        "members",
        "name",
        "request_bucket",
        "token_bucket",
    )

    def __init__(self, name: str, learned: bool = False) -> None:
        super().__init__()
        self.name = name
        self.learned = learned  # named after what the server said, not after one key
        # Models whose limit a 429 said is spent, in a pool that serves several: held until
        # then, while the pool's keys go on serving the others.
        self.lanes: dict[str, float] = {}
        # Those models' paces, from their 429s' numbers: [rate, level, stamp] (a bucket of one
        # call, as the pool's own pace in _model.Budget).
        self.lane_paces: dict[str, list[float]] = {}
        # Calls sent of models a 429 named lately, before this pool learned their limit (see
        # KeyRing.lane_pass).
        self.lane_probes: dict[str, int] = {}
        # When each of those calls that is still out went (of calls that come back to
        # KeyRing.probe_answered; forgotten after PROBE_FOR).
        self.lane_out: dict[str, list[float]] = {}
        # How many of those came back (or were out over PROBE_FOR).
        self.lane_back: dict[str, int] = {}
        self.members: list[KeyState] = []
        self.in_flight = 0
        self.request_bucket: Bucket | None = None  # client-side pacing (Key.rpm)
        self.token_bucket: Bucket | None = None  # client-side pacing (Key.tpm)

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
        self.where = READY
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
        # Disabled keys to try again (a 401 may have been the provider's passing trouble):
        # (when, push no., state), as the cooling heap.
        self._rechecks: list[tuple[float, int, KeyState]] = []
        self._pushes = 0
        self._serial = 0
        # Models a 429 named, or held in a pool serving several (a 429, or an answer whose
        # headers show the model's budget spent), until when: in a pool that has not learned
        # their limit, their calls go one at a time till then (see lane_pass).
        self.limited: dict[str, float] = {}
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
            else:
                if spec != state.spec and spec != Key(spec.key):  # a bare key keeps its own
                    self._respec(state, spec)
                if state.where is DISABLED:
                    self._make_ready(state)
        return added

    def _respec(self, state: KeyState, spec: Key) -> None:
        """A key given again with other settings takes them: its weight, the pool it was
        given, its pacing (its clients are the manager's to renew).  A pool it was given
        stays when the new settings name none (as in the Redis scripts)."""
        old = state.spec
        if spec.pool is None and old.pool is not None:
            spec = dataclasses.replace(spec, pool=old.pool)
        state.spec = spec
        weight = float(spec.weight)
        if weight != state.weight:
            ready = state.where is READY
            if ready:
                self._leave(state)
            state.weight = weight
            state.level = state.in_flight if weight == 1.0 else int(state.in_flight / weight)
            if ready:
                self._make_ready(state)
        if spec.pool is not None and spec.pool != state.pool.name:
            self._move(state, spec.pool)
        self._pace(state.pool, spec, retune=(spec.rpm, spec.tpm) != (old.rpm, old.tpm))

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
        state.where = REMOVED
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

    def _pace(self, pool: Pool, spec: Key, retune: bool = False) -> None:
        """Pace ``pool`` as ``spec`` asks where it is not paced yet — and, ``retune`` (the
        key was given again), at the new rate where it is (as ``pace()`` in the Redis
        scripts, which every configuration runs)."""
        now = self.clock()
        if spec.rpm is not None:
            if pool.request_bucket is None:
                pool.request_bucket = Bucket(spec.rpm, now)
            elif retune:
                pool.request_bucket.set_rate(spec.rpm)
        if spec.tpm is not None:
            if pool.token_bucket is None:
                pool.token_bucket = Bucket(spec.tpm, now)
            elif retune:
                pool.token_bucket.set_rate(spec.tpm)

    def join_pool(self, state: KeyState, name: str) -> None:
        """Move ``state`` into the pool the server says it belongs to."""
        if state.pool.name == name or state.spec.pool is not None or state.where is REMOVED:
            return
        self._move(state, name)

    def _move(self, state: KeyState, name: str) -> None:
        """Move ``state``, with its calls in flight, into the pool ``name``."""
        old = state.pool
        if old.name == name or state.where is REMOVED:
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
        new.outstanding[0:0] = [(0, self.clock())] * state.in_flight
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
        rechecks = self._rechecks
        if rechecks and rechecks[0][0] <= self.clock():
            self._recheck()
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
        if state.where is READY:
            buckets = self._buckets
            del buckets[state.level][state]
            buckets[level][state] = None
            if level < self._low:
                self._low = level
        state.level = level
        if state.where is REMOVED:  # remove() already took its calls off the pool
            return
        pool = state.pool
        pool.in_flight -= 1
        if not pool.in_flight and pool.hooked:  # (no request seen leaving: nothing to heal)
            pool.drained()

    def take(self, state: KeyState) -> None:
        """Mark ``state`` in flight, for a key chosen elsewhere (by a shared backend), as
        :meth:`choose` marks the key it chose.  A key not ready here is counted all the same:
        the shared state, which chose it, knows better than this process."""
        ready = state.where is READY
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
        if (
            pool.requests_left is not None
            or pool.tokens_left is not None
            or pool.request_bucket is not None
            or pool.pace is not None
            or pool.allowance is not None
            or pool.slide_period is not None
        ):
            self._spend_request(pool)

    def give_back(self, state: KeyState) -> None:
        """Undo :meth:`choose` for a key that was only handed out (``get_key()``), not called."""
        state.calls -= 1
        self.release(state)
        if state.where is not REMOVED:
            state.pool.ended()

    def succeed(self, state: KeyState, tokens: float = 0.0, model: str | None = None) -> None:
        """A call on ``state`` succeeded; its requests cost ``tokens`` tokens; ``model``: the
        one it asked for, if known."""
        state.successes += 1
        self.release(state)
        pool = state.pool
        if (pool.limited_at is not None or model is not None) and state.where is not REMOVED:
            single = pool.pace_model != MIXED
            pool.admit(model)
            if single and pool.pace_model == MIXED:  # its budget from headers is forgotten
                self._uncool_budget(pool)
        elif state.where is not REMOVED:  # before a 429 or a model, only counted: the usual path
            pool.admitted += 1
        if tokens:
            self._cost(state, tokens)

    def fail(
        self,
        state: KeyState,
        *,
        rate_limited: bool = False,
        tokens: float = 0.0,
        organization: str | None = None,
        lesson: Lesson | None = None,
        cooled: float = 0.0,
        hinted: bool = True,
    ) -> float:
        """A call on ``state`` failed; ``organization``: the pool its 429 named, which becomes
        the key's pool (and takes in the call's tokens) if it has none yet.  ``lesson``: what
        a 429 teaches the pool's pace (``_limits.pace_of``); ``cooled``: the seconds the 429
        cools the pool, or at most, when not ``hinted`` by the server.  Returns the seconds
        the pool is to cool; see :meth:`~stable_openai._model.Budget.limited`."""
        if rate_limited:
            state.rate_limits += 1
        else:
            state.failures += 1
        self.release(state)
        self.join_named(state, organization)
        if state.where is not REMOVED:
            pool = state.pool
            if lesson is not None and lesson.paces:
                single = pool.pace_model != MIXED
                cooled = pool.limited(
                    self.clock(), pool.in_flight, lesson.told, cooled, hinted, lesson.model,
                    lesson.limit, lesson.reset, lesson.sliding,
                )
                if single and pool.pace_model == MIXED:  # its budget from headers is forgotten
                    self._uncool_budget(pool)
            else:
                pool.ended()
        if tokens:
            self._cost(state, tokens)
        return cooled

    def end(self, state: KeyState, tokens: float = 0.0) -> None:
        """A call on ``state`` is over (succeeded, failed or abandoned); its requests cost
        ``tokens`` tokens, which its pool's average and token pacing take in."""
        self.release(state)
        if state.where is not REMOVED:
            state.pool.ended()
        if tokens:
            self._cost(state, tokens)

    def _cost(self, state: KeyState, tokens: float) -> None:
        if state.where is not REMOVED:
            pool = state.pool
            pool.cost(tokens)
            bucket = pool.token_bucket
            if bucket is not None:
                now = self.clock()
                bucket.take(tokens, now)
                wait = bucket.ready_in(now, pool.avg_tokens)
                if wait > 0:
                    self.cool_pool(pool, wait, "paced (tpm)", Cause.PACED)

    # -- budgets -----------------------------------------------------------------------------
    def _spend_request(self, pool: Pool) -> None:
        """A call leaves ``pool``: cool the pool if that spends its budget, or its pacing."""
        now = self.clock()
        for spent in pool.spend_request(now, pool.in_flight):
            self._apply(pool, spent)
        bucket = pool.request_bucket
        if bucket is not None:
            bucket.take(1.0, now)
            wait = bucket.ready_in(now)
            if wait > 0:
                self.cool_pool(pool, wait, "paced (rpm)", Cause.PACED)

    def _apply(self, pool: Pool, decision: Spent | str | None) -> bool:
        """Do to ``pool``'s keys what its budget decided.  ``True`` if keys became ready."""
        if isinstance(decision, Spent):
            self.cool_pool(pool, 0.0, decision.reason, decision.cause, until=decision.until)
        elif decision == FREED:
            return self._uncool_budget(pool)
        return False

    def another_request(self, state: KeyState) -> float:
        """A call on ``state`` sends another request (a function that makes several per call,
        seen by its pooled client): it spends its pool's budget as a call does, since the
        server counts requests.  Returns the seconds it should wait before it leaves: until
        the pool's keys are ready again, when a budget of theirs holds them back (the call
        holds its key; had it asked for a key now, it would wait as long)."""
        if state.where is REMOVED:
            return 0.0
        wait = 0.0
        if state.where is COOLING and state.cause in _HELD_BY_BUDGET:
            wait = max(0.0, state.cool_until - self.clock())
        state.pool.sent += 1
        self._spend_request(state.pool)
        return wait

    def hold_lane(self, state: KeyState, model: str, seconds: float) -> None:
        """``model``'s limit in ``state``'s pool is spent for ``seconds``: hold that model's
        calls there (a later deadline already held is kept), not the pool's keys."""
        self._hold_lane_until(state.pool, model, self.clock() + max(0.0, seconds))

    @staticmethod
    def _hold_lane_until(pool: Pool, model: str, until: float) -> None:
        if until > pool.lanes.get(model, 0.0):
            pool.lanes[model] = until

    def limit_met(self, model: str) -> None:
        """A 429 named ``model``, or an answer's headers showed its budget spent: for
        ``PROBE_FOR`` seconds, pools that have not learned its limit probe it
        (:meth:`lane_pass`)."""
        self.limited[model] = self.clock() + PROBE_FOR

    def probing(self, model: str) -> bool:
        """Whether a 429 named ``model`` less than ``PROBE_FOR`` seconds ago."""
        until = self.limited.get(model)
        return until is not None and until > self.clock()

    @staticmethod
    def unlearned(pool: Pool, model: str) -> bool:
        """Whether ``pool`` has yet to learn ``model``'s limit (when it has no pace for it):
        it serves several models, or has met no 429 nor answer with headers — and has not
        spent its probes of it (:meth:`lane_pass`)."""
        return (
            pool.pace_model != model or (pool.limited_at is None and pool.snapshot < 0)
        ) and pool.lane_probes.get(model, 0) < ALLOWANCE_PROBES

    @staticmethod
    def probes_spent(pool: Pool, model: str) -> None:
        """A shared store says ``pool`` probes ``model`` no more (its probes are spent, or it
        learned the model's limit): no need to ask it again (see :meth:`unlearned`)."""
        pool.lane_probes[model] = ALLOWANCE_PROBES

    def lane_held(self, state: KeyState, model: str) -> float:
        """Seconds ``model``'s calls are still held in ``state``'s pool (0: not held)."""
        lanes = state.pool.lanes
        until = lanes.get(model)
        if until is None:
            return 0.0
        left = until - self.clock()
        if left <= 0:
            del lanes[model]
            return 0.0
        return left

    def pace_lane(self, state: KeyState, model: str, rate: float, after: float) -> None:
        """Pace ``model`` in ``state``'s pool at ``rate`` calls a second, one call once
        ``after`` seconds have passed (a lower rate already known is kept)."""
        paces = state.pool.lane_paces
        known = paces.get(model)
        rate = rate if known is None else min(rate, known[0])
        paces[model] = [rate, 1.0, self.clock() + after]

    def lane_pass(
        self, state: KeyState, model: str, book: float = 0.0, probes: list[float] | None = None
    ) -> float:
        """A call of ``model`` would go on ``state``: the seconds the model is held in its
        pool, or 0 — then the call takes its place in the model's pace there, which holds the
        next ones.  ``book``: the longest the call waits for a hold (a request of a call
        whose key is chosen): a hold no longer, it takes its place when the hold ends, and
        the next are held after it; a longer one, it does not wait, and takes no place.

        A model a 429 named in the last ``PROBE_FOR`` seconds, whose limit this pool has not
        learned (no pace for it; or, in a pool serving only that model, no 429 nor headers
        yet), goes one call per ``PROBE_WAIT`` (``ALLOWANCE_PROBES`` calls at most): its
        limit here may be as low, and a call at a time meets one 429 to learn it from, not a
        volley.  A caller that tells when its call comes back (``probes``: the call's stamp
        is appended, for :meth:`probe_answered`) is also held while more of the pool's probes
        of the model that tell are out than have come back (an answer, a failure, a call
        given up; or out over ``PROBE_FOR``) — one at a time at first, then more as they come
        back, as TCP's slow start: answers take longer than ``PROBE_WAIT`` on a busy machine,
        and seconds from a real server."""
        held = self.lane_held(state, model)
        if held and held > book:
            return held
        pool = state.pool
        at = self.clock() + held  # when the call goes
        pace = pool.lane_paces.get(model)
        if pace is None:
            if self.probing(model) and self.unlearned(pool, model):
                if probes is not None:
                    if self._probes_full(pool, model):
                        return PROBE_WAIT  # (asked again then; it takes no place)
                    pool.lane_out.setdefault(model, []).append(at)
                    probes.append(at)
                pool.lane_probes[model] = pool.lane_probes.get(model, 0) + 1
                self._hold_lane_until(pool, model, at + PROBE_WAIT)
        else:
            rate, level, stamp = pace
            if at > stamp:
                level = min(1.0, level + (at - stamp) * rate)
                stamp = at
            level -= 1.0
            pace[1], pace[2] = level, stamp
            self._hold_lane_until(pool, model, at + (1.0 - level) / rate)
        return held

    def _probes_full(self, pool: Pool, model: str) -> bool:
        """Whether more of ``pool``'s calls of ``model`` that :meth:`lane_pass` counted out
        are out than have come back (those out over ``PROBE_FOR`` count as back)."""
        out = pool.lane_out.get(model)
        if not out:
            return False
        since = self.clock() - PROBE_FOR
        if out[0] <= since:
            kept = [went for went in out if went > since]
            pool.lane_back[model] = pool.lane_back.get(model, 0) + len(out) - len(kept)
            out[:] = kept
        return len(out) > pool.lane_back.get(model, 0)

    @staticmethod
    def probe_answered(pool: Pool, model: str, stamp: float) -> None:
        """A call of ``model`` that :meth:`lane_pass` counted out in ``pool`` at ``stamp``
        came back (answered, failed or given up)."""
        out = pool.lane_out.get(model)
        if out and stamp in out:
            out.remove(stamp)
            pool.lane_back[model] = pool.lane_back.get(model, 0) + 1

    def lane_succeeded(self, state: KeyState, model: str) -> None:
        """A call of ``model`` succeeded on ``state``: its pace there rises a little."""
        pace = state.pool.lane_paces.get(model)
        if pace is not None:
            pace[0] *= 1.0 + PACE_GAIN

    def lane_free(
        self, model: str, avoid: frozenset[KeyState] | set[KeyState],
        mine: Collection[Pool] = (),
    ) -> float | None:
        """Seconds until ``model`` may be served by a usable key not in ``avoid`` — 0 when one
        is free for it now; ``None`` when there is no such key (a key whose pool holds the
        model for a per-day limit is none: no wait short of the server's will help).  The
        probes out in ``mine`` hold nothing: the caller runs in one of them."""
        soonest: float | None = None
        day = model + PER_DAY
        for state in self._states.values():
            if state.where is DISABLED or state in avoid or self.lane_held(state, day):
                continue
            held = self.lane_held(state, model)
            pool = state.pool
            if not held and model in pool.lane_out and pool not in mine and (
                model not in pool.lane_paces and self.probing(model) and self.unlearned(pool, model)
                and self._probes_full(pool, model)
            ):
                held = PROBE_WAIT
            if soonest is None or held < soonest:
                soonest = held
                if not held:
                    break
        return soonest

    def sent(self, state: KeyState) -> Marks:
        """A request leaves on ``state`` (the pooled client's hook saw it).  Returns its marks
        for :meth:`learn` to place its answer."""
        pool = state.pool
        return pool, pool.send(self.clock())

    def probe(self, state: KeyState) -> None:
        """``state`` will be called through a client whose answers tell the budget: until the
        first one does, its pool sends only a few calls instead of a burst."""
        pool = state.pool
        pool.probe(len(pool.members), pool.in_flight)

    def answered(self, state: KeyState, marks: Marks | None = None) -> float | None:
        """The server answered a request that left on ``state`` at ``marks``: when it left,
        if known."""
        pool = state.pool
        if marks is None:
            return pool.answered(None)
        # mark 0: sent before its key joined this pool
        return pool.answered(marks[1] if marks[0] is pool else 0)

    def learn(
        self, state: KeyState, budget: ServerBudget, marks: Marks | None = None,
        left_at: float | None = None,
    ) -> bool:
        """Take in what a response's headers say about ``state``'s pool, for a request that
        left at ``left_at`` (see :meth:`~stable_openai._model.Budget.learn`); a pool whose
        budget is spent cools until the server's reset.  Returns whether keys became
        ready."""
        if state.where is REMOVED:
            return False
        if budget.pool:
            before = state.pool
            self.join_pool(state, budget.pool)
            if state.pool is not before:
                # The move held the key's calls in flight as unanswered in its new pool: not
                # this one's request, answered (as Redis forgets it at the call's report).
                state.pool.answered(0)
        pool = state.pool
        if marks is not None and marks[0] is not pool:
            return False  # sent before its key joined this pool: its place here is unknown
        mark = marks[1] if marks is not None else pool.hooked
        freed = False
        for decision in pool.learn(budget, mark, self.clock(), left_at):
            freed = self._apply(pool, decision) or freed
        return freed

    def _uncool_budget(self, pool: Pool) -> bool:
        """An answer shows budget left: members held only for a spent budget are ready."""
        freed = False
        for member in pool.members:
            if member.where is COOLING and member.cause is Cause.REQUESTS_SPENT:
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
        if state.where in (DISABLED, REMOVED):
            return
        deadline = until if until is not None else self.clock() + max(0.0, seconds)
        if state.where is COOLING and state.cool_until >= deadline - SAME_DEADLINE:
            return
        self._set_deadline(state, deadline, reason, cause, forbidden)

    def set_cooldown(self, state: KeyState, seconds: float, reason: str = "set_ttl") -> None:
        """Set the cooldown to exactly ``seconds`` from now (0 makes the key ready now)."""
        if state.where in (DISABLED, REMOVED):
            return
        if seconds <= 0:
            if state.where is COOLING:
                self._make_ready(state)
            return
        self._set_deadline(state, self.clock() + seconds, reason, Cause.SET_BY_USER, False)

    def disable(
        self, state: KeyState, reason: str, cause: Cause = Cause.UNSPECIFIED,
        recheck: float = math.inf,
    ) -> bool:
        """Disable ``state`` until it is given again, or for ``recheck`` seconds: then it is
        ready again, for a call to find out whether it works.  ``True`` if it was not
        disabled before."""
        if state.where in (DISABLED, REMOVED):
            return False
        self._leave(state)
        state.where = DISABLED
        state.reason = reason
        state.cause = cause
        state.forbidden = False
        state.cool_until = 0.0
        self._pushes += 1
        state.cooled = self._pushes  # (an entry of an earlier recheck is stale from now)
        if recheck < math.inf:
            state.cool_until = when = self.clock() + max(0.0, recheck)
            heapq.heappush(self._rechecks, (when, self._pushes, state))
        return True

    def recheck_in(self) -> float | None:
        """Seconds until the first disabled key is tried again; ``None`` when none will be."""
        rechecks = self._rechecks
        while rechecks and not self._is_recheck(rechecks[0]):
            heapq.heappop(rechecks)
        return max(0.0, rechecks[0][0] - self.clock()) if rechecks else None

    @staticmethod
    def _is_recheck(entry: tuple[float, int, KeyState]) -> bool:
        _, pushed, state = entry
        return state.where is DISABLED and state.cooled == pushed

    def _recheck(self) -> None:
        """Make the disabled keys due to be tried again ready."""
        self._ready_due(self._rechecks, self._is_recheck)

    def join_named(self, state: KeyState, organization: str | None) -> None:
        """``organization`` (named by a 429 message) becomes ``state``'s pool if it has none
        yet (neither given nor learned)."""
        if organization and not state.pool.learned:
            self.join_pool(state, organization)

    def apply_verdict(
        self, state: KeyState, verdict: Verdict, organization: str | None = None
    ) -> bool:
        """Apply what a failure means to ``state`` (and its pool).  ``organization`` (named by
        a 429 message) becomes the key's pool if it has none yet.  ``True`` if this disabled
        the key (it was not disabled before)."""
        self.join_named(state, organization)
        if verdict.fate is Fate.COOL:
            if verdict.pooled:
                self.cool_pool(state.pool, verdict.seconds, verdict.reason, verdict.cause)
            else:
                self.cool(
                    state, verdict.seconds, verdict.reason, verdict.cause,
                    forbidden=verdict.forbidden,
                )
        elif verdict.fate is Fate.DISABLE:
            return self.disable(state, verdict.reason, verdict.cause, verdict.seconds)
        return False

    def seconds_left(self, state: KeyState) -> float:
        """Seconds until ``state`` is ready: 0 when ready, ``inf`` when disabled."""
        if state.where is COOLING:
            return max(0.0, state.cool_until - self.clock())
        if state.where is READY:
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
        usable = [s for s in self._states.values() if s.where is not DISABLED]
        return bool(usable) and all(s.where is COOLING and s.forbidden for s in usable)

    def forget_in_flight(self) -> None:
        """Zero every in-flight count (a forked child has none of its parent's calls)."""
        for state in self._states.values():
            if state.where is READY:
                self._leave(state)
                state.in_flight = state.level = 0
                self._make_ready(state)
            else:
                state.in_flight = state.level = 0
        for pool in self._pools.values():
            pool.in_flight = 0
            pool.outstanding.clear()

    # -- internals -----------------------------------------------------------------------------
    def _leave(self, state: KeyState) -> None:
        """Take ``state`` out of the ready buckets (cooling heap entries go stale by themselves)."""
        if state.where is READY:
            del self._buckets[state.level][state]

    def _make_ready(self, state: KeyState) -> None:
        state.where = READY
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
        state.where = COOLING
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
        return state.where is COOLING and state.cooled == pushed

    def _drop_stale_cooling(self) -> None:
        cooling = self._cooling
        while cooling and not self._is_current(cooling[0]):
            heapq.heappop(cooling)

    def promote_due(self) -> None:
        """Make the keys whose cooldown is over ready now (choosing does so by itself)."""
        cooling = self._cooling
        if cooling and cooling[0][0] <= self.clock():
            self._promote()
        rechecks = self._rechecks
        if rechecks and rechecks[0][0] <= self.clock():
            self._recheck()

    def _promote(self) -> None:
        """Make the cooling keys whose deadline has passed ready."""
        self._ready_due(self._cooling, self._is_current)

    def _ready_due(
        self, heap: list[tuple[float, int, KeyState]],
        current: Callable[[tuple[float, int, KeyState]], bool],
    ) -> None:
        """Make ready the keys of the current entries of ``heap`` that are due, soonest
        first, each pool brought up to date first."""
        now = self.clock()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            if current(entry):
                state = entry[2]
                state.pool.refresh(now, state.pool.in_flight)
                self._make_ready(state)
