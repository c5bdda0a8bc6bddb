"""KeyManager: the process-wide key ring behind one lock and condition.

Choosing a key and marking it in flight happen in one step under the lock; the caller makes
its HTTP call outside it.  A caller that finds every key cooling waits on the condition (or,
in asyncio, on a future the condition's notifier resolves) until the first deadline or until
the keys change.  No background thread: cooldowns are deadlines on a monotonic clock.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import ClassVar, TypedDict

from ._budget import ServerBudget, organization_in
from ._errors import AllKeysCoolingError, AllKeysDisabledError, NoKeysError
from ._keys import Key, KeyLike, normalize_keys
from ._policy import Fate, Verdict
from ._ring import KeyRing, KeyState, Marks, Where

__all__ = ["KeyManager", "KeyStats"]

logger = logging.getLogger("stable_openai")
logger.addHandler(logging.NullHandler())  # the library's records reach only handlers you set

_ENV_HELP = (
    "no API keys configured: call KeyManager([key1, key2, ...]) at start-up, or set "
    "OPENAI_API_KEYS (comma- or space-separated) or OPENAI_API_KEY"
)


class KeyStats(TypedDict):
    """One key's row in :meth:`KeyManager.stats`; ``key`` is masked, never whole."""

    key: str
    fingerprint: str
    pool: str
    state: str
    seconds_left: float
    reason: str
    calls: int
    successes: int
    rate_limits: int
    failures: int
    in_flight: int


def _keys_from_env() -> list[Key]:
    for name in ("OPENAI_API_KEYS", "OPENAI_API_KEY"):
        raw = os.environ.get(name, "")
        keys = [part for part in re.split(r"[\s,]+", raw) if part]
        if keys:
            return normalize_keys(keys, name)
    raise NoKeysError(_ENV_HELP)


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Waiter:
    """A caller queued for a key: a thread (on a condition sharing the manager's lock) or a
    coroutine (on a future of its loop).  Queued callers are served in arrival order."""

    __slots__ = ("condition", "future", "loop")

    def __init__(
        self,
        condition: threading.Condition | None = None,
        future: asyncio.Future[None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.condition = condition
        self.future = future
        self.loop = loop

    def wake(self) -> None:
        """Wake this caller.  Call with the manager's lock held."""
        if self.condition is not None:
            self.condition.notify()
        elif self.future is not None and self.loop is not None:
            # A closed loop raises RuntimeError: nobody is waiting there any more.
            with contextlib.suppress(RuntimeError):
                self.loop.call_soon_threadsafe(_wake, self.future)


class KeyManager:
    """The singleton that holds every API key and its state.

    ``KeyManager(api_keys)`` builds it (or reconfigures it: keys still present keep their
    state, new keys join, the rest leave, disabled keys given again are enabled);
    ``KeyManager()`` returns it, reading ``OPENAI_API_KEYS`` / ``OPENAI_API_KEY`` the first
    time if no keys were given.  ``KeyManager.reset()`` forgets it (for tests).
    """

    _instance: ClassVar[KeyManager | None] = None
    _class_lock: ClassVar[threading.Lock] = threading.Lock()

    _ring: KeyRing
    _lock: threading.Lock
    _queue: collections.deque[_Waiter]

    def __new__(
        cls,
        api_keys: Iterable[KeyLike] | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> KeyManager:
        keys = None if api_keys is None else normalize_keys(api_keys)
        if clock is not None and not callable(clock):
            raise TypeError("clock must be a callable returning seconds, like time.monotonic")
        with cls._class_lock:
            instance = KeyManager._instance
            if instance is None:
                instance = super().__new__(cls)
                instance._setup(keys if keys is not None else _keys_from_env(), clock)
                KeyManager._instance = instance
            else:
                if clock is not None:
                    with instance._lock:
                        instance._ring.clock = clock
                if keys is not None:
                    instance._reconfigure(keys)
        return instance

    def __init__(
        self,
        api_keys: Iterable[KeyLike] | None = None,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """All the work happens in ``__new__``: the instance is shared."""

    def _setup(self, keys: list[Key], clock: Callable[[], float] | None) -> None:
        self._ring = KeyRing(keys, clock=clock or time.monotonic)
        self._new_locks()

    def _new_locks(self) -> None:
        self._lock = threading.Lock()
        self._queue = collections.deque()

    @classmethod
    def reset(cls) -> None:
        """Forget the singleton, so the next ``KeyManager(...)`` starts afresh (for tests)."""
        with cls._class_lock:
            KeyManager._instance = None

    @classmethod
    def current(cls) -> KeyManager | None:
        """The singleton if one was built, else ``None`` (does not read the environment)."""
        return KeyManager._instance

    # -- the original package's API -----------------------------------------------------------
    def get_key(self) -> str:
        """A ready key, least recently used first; waits while every key is cooling."""
        state, _ = self._acquire(None, float("inf"))
        with self._lock:
            self._ring.give_back(state)
        return state.key

    def set_ttl(self, key: str, ttl: float) -> bool:
        """Cool ``key`` for exactly ``ttl`` seconds (0 makes it ready).

        ``False`` if the key is unknown or disabled (give it to ``add_keys`` to enable it)."""
        _check_key_arg(key)
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl != ttl:
            raise TypeError("ttl must be a number of seconds")
        with self._lock:
            state = self._ring.find(key.strip())
            if state is None or state.where is Where.DISABLED:
                return False
            self._ring.set_cooldown(state, float(ttl))
            self._notify()
            return True

    def delete_key(self, key: str) -> bool:
        """Remove ``key`` from the ring.  ``False`` if it was not there."""
        _check_key_arg(key)
        with self._lock:
            removed = self._ring.remove(key.strip())
            self._notify()
            return removed

    def get_min_ttl(self) -> float:
        """Seconds until the first key is ready: 0 if one is ready now."""
        with self._lock:
            seconds = [self._ring.seconds_left(s) for s in self._ring]
        return min(seconds) if seconds else 0.0

    @property
    def data(self) -> dict[str, float]:
        """Each key and the seconds of cooldown it has left (``inf`` when disabled)."""
        with self._lock:
            return {s.key: self._ring.seconds_left(s) for s in self._ring}

    # -- additions ---------------------------------------------------------------------------
    def add_keys(self, api_keys: Iterable[KeyLike]) -> int:
        """Add keys (a disabled key given again is enabled).  Returns how many were new."""
        keys = normalize_keys(api_keys)
        with self._lock:
            added = self._ring.add(keys)
            self._notify()
        return len(added)

    def stats(self) -> list[KeyStats]:
        """One row per key: masked key, state, seconds left, reason and counters."""
        with self._lock:
            return [
                KeyStats(
                    key=s.masked, fingerprint=s.fingerprint, pool=_pool_label(s),
                    state=s.where.value,
                    seconds_left=self._ring.seconds_left(s), reason=s.reason, calls=s.calls,
                    successes=s.successes, rate_limits=s.rate_limits, failures=s.failures,
                    in_flight=s.in_flight,
                )
                for s in self._ring
            ]

    def close(self) -> None:
        """Close the pooled clients (``client`` parameters); new ones are built on next use."""
        from ._clients import close_clients

        with self._lock:
            states = list(self._ring)
        close_clients(states)

    async def aclose(self) -> None:
        """Close the pooled clients, with the async ones of the running event loop: await it
        before your loop ends (``asyncio.run`` closes the loop, not the connections)."""
        from ._clients import aclose_clients

        with self._lock:
            states = list(self._ring)
        await aclose_clients(states)

    def __len__(self) -> int:
        return len(self._ring)

    def __repr__(self) -> str:
        with self._lock:
            counts = {where: 0 for where in (Where.READY, Where.COOLING, Where.DISABLED)}
            for state in self._ring:
                counts[state.where] += 1
        parts = ", ".join(f"{n} {where.value}" for where, n in counts.items())
        return f"<KeyManager {len(self._ring)} keys: {parts}>"

    # -- used by @stable ---------------------------------------------------------------------
    def _reconfigure(self, keys: list[Key]) -> None:
        with self._lock:
            self._ring.reconfigure(keys)
            self._notify()

    def _notify(self) -> None:
        """The keys changed: wake the first queued caller.  Call with the lock held."""
        if self._queue:
            self._queue[0].wake()

    def _take(self, avoid: set[KeyState] | None = None) -> KeyState | None:
        """Choose a key at once, unless callers are queued (they come first).  Lock held."""
        if self._queue:
            return None
        return self._ring.choose(avoid)

    def _wait_time(self, budget: float, last: BaseException | None) -> float:
        """Seconds to wait for a key, or raise if waiting cannot help.  Lock held."""
        ring = self._ring
        if not len(ring):
            raise NoKeysError("KeyManager has no keys left: every key was deleted") from last
        wait = ring.next_ready_in()
        if wait is None:
            raise AllKeysDisabledError(ring.reasons(Where.DISABLED)) from last
        if wait > budget:
            if last is not None and ring.all_usable_forbidden():
                raise last
            reasons = ring.reasons(Where.COOLING)
            raise AllKeysCoolingError(wait, sum(reasons.values()), reasons) from last
        return min(wait, threading.TIMEOUT_MAX)  # an "infinite" cooldown still waits, in steps

    def _serve_head(
        self, waiter: _Waiter, avoid: set[KeyState] | None, budget: float,
        last: BaseException | None,
    ) -> tuple[KeyState | None, float]:
        """One turn of a queued caller: ``(key, 0)`` when it got one, else ``(None, seconds
        to wait)``.  Only the head of the queue chooses; it then hands the turn on."""
        if self._queue[0] is not waiter:
            if budget <= 0:  # waited its whole budget behind other callers
                reasons = self._ring.reasons(Where.COOLING)
                wait = self._ring.next_ready_in() or 0.0
                raise AllKeysCoolingError(wait, sum(reasons.values()), reasons) from last
            return None, min(budget, threading.TIMEOUT_MAX)
        state = self._ring.choose(avoid)
        if state is not None:
            self._queue.popleft()
            if self._queue:  # the next caller is now first: it chooses, or waits its deadline
                self._queue[0].wake()
            return state, 0.0
        return None, self._wait_time(budget, last)

    def _leave_queue(self, waiter: _Waiter) -> None:
        """Take ``waiter`` out of the queue (it gave up); wake the next if it was first."""
        queue = self._queue
        if queue and queue[0] is waiter:
            queue.popleft()
            if queue:
                queue[0].wake()
        else:
            with contextlib.suppress(ValueError):  # already served
                queue.remove(waiter)

    def _acquire(
        self,
        avoid: set[KeyState] | None,
        budget: float,
        last: BaseException | None = None,
    ) -> tuple[KeyState, float]:
        """Choose a key and mark it in flight, waiting up to ``budget`` seconds, in turn with
        the other waiting callers.  Returns the key's state and the seconds spent waiting."""
        with self._lock:
            state = self._take(avoid)
            if state is not None:
                return state, 0.0
            waiter = _Waiter(condition=threading.Condition(self._lock))
            self._queue.append(waiter)
            start = time.monotonic()
            try:
                while True:
                    waited = time.monotonic() - start
                    state, wait = self._serve_head(waiter, avoid, budget - waited, last)
                    if state is not None:
                        return state, waited
                    assert waiter.condition is not None
                    waiter.condition.wait(wait)
            except BaseException:
                self._leave_queue(waiter)
                raise

    async def _acquire_async(
        self,
        avoid: set[KeyState] | None,
        budget: float,
        last: BaseException | None = None,
    ) -> tuple[KeyState, float]:
        """:meth:`_acquire` for coroutines: waits on a future, never blocks the loop."""
        with self._lock:
            state = self._take(avoid)
            if state is not None:
                return state, 0.0
            loop = asyncio.get_running_loop()
            waiter = _Waiter(loop=loop)
            self._queue.append(waiter)
        start = time.monotonic()
        try:
            while True:
                with self._lock:
                    waited = time.monotonic() - start
                    state, wait = self._serve_head(waiter, avoid, budget - waited, last)
                    if state is not None:
                        return state, waited
                    future: asyncio.Future[None] = loop.create_future()
                    waiter.future = future
                try:
                    await asyncio.wait((future,), timeout=wait)
                finally:
                    future.cancel()
        except BaseException:
            with self._lock:
                self._leave_queue(waiter)
            raise

    def _succeed(self, state: KeyState) -> None:
        with self._lock:
            self._ring.succeed(state)

    def _abandon(self, state: KeyState) -> None:
        with self._lock:
            self._ring.release(state)

    def _fail(self, state: KeyState, verdict: Verdict, exc: BaseException | None = None) -> None:
        """Record a failed call and apply the verdict to its key (and its pool)."""
        first_disable = False
        organization = None
        if verdict.pooled and exc is not None:
            organization = organization_in(str(getattr(exc, "message", "")))
        with self._lock:
            ring = self._ring
            ring.fail(state, rate_limited=verdict.rate_limited)
            if organization and not state.pool.learned:
                ring.join_pool(state, organization)
            if verdict.fate is Fate.COOL:
                if verdict.pooled:
                    ring.cool_pool(state.pool, verdict.seconds, verdict.reason)
                else:
                    ring.cool(state, verdict.seconds, verdict.reason, forbidden=verdict.forbidden)
            elif verdict.fate is Fate.DISABLE:
                first_disable = ring.disable(state, verdict.reason)
        if first_disable:
            logger.warning("API key %s disabled: %s", state.masked, verdict.reason)
        elif verdict.fate is Fate.COOL:
            logger.debug(
                "API key %s cooling %.3gs: %s", state.masked, verdict.seconds, verdict.reason
            )

    def _learn(
        self, state: KeyState, budget: ServerBudget | None, tokens: float = 0.0,
        marks: Marks | None = None,
    ) -> None:
        """A response arrived on ``state`` for a request of ``tokens`` tokens, sent when the
        pool stood at ``marks``; a successful one carries the pool's budget in its headers."""
        with self._lock:
            self._ring.answered(state, tokens, marks)
            if budget is not None and self._ring.learn(state, budget, marks):
                self._notify()

    def _probe(self, state: KeyState) -> None:
        with self._lock:
            self._ring.probe(state)

    def _spend_tokens(self, state: KeyState, tokens: float) -> Marks:
        with self._lock:
            return self._ring.spend_tokens(state, tokens)

    def _correct_tokens(self, state: KeyState, estimated: float, actual: float) -> None:
        with self._lock:
            self._ring.correct_tokens(state, estimated, actual)


def _pool_label(state: KeyState) -> str:
    """The pool's name if it is shared or learned; else the key's own, masked."""
    pool = state.pool
    return pool.name if pool.learned else f"own ({state.masked})"


def _check_key_arg(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")


def _before_fork() -> None:
    KeyManager._class_lock.acquire()
    instance = KeyManager._instance
    if instance is not None:
        instance._lock.acquire()


def _after_fork_in_parent() -> None:
    instance = KeyManager._instance
    if instance is not None:
        instance._lock.release()
    KeyManager._class_lock.release()


def _after_fork_in_child() -> None:
    """Fresh locks, and no calls in flight: the parent's calls are not the child's."""
    KeyManager._class_lock = threading.Lock()
    instance = KeyManager._instance
    if instance is not None:
        instance._new_locks()
        instance._ring.forget_in_flight()
        for state in instance._ring:
            state.clients.clear()  # their connections belong to the parent


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
