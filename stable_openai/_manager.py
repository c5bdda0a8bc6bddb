"""KeyManager: the process-wide key ring behind one lock and condition.

Choosing a key and marking it in flight happen in one step under the lock; the caller makes
its HTTP call outside it.  A caller that finds every key cooling waits on the condition (or,
in asyncio, on a future the condition's notifier resolves) until the first deadline or until
the keys change.  No background thread: cooldowns are deadlines on a monotonic clock.

With a shared backend (``backend="redis://..."``), the choice is made there instead, outside
the lock, and every call is reported back to it; the ring then mirrors what this process
does, and decides alone whenever the backend cannot be reached.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping
from dataclasses import replace
from typing import ClassVar, TypedDict

from ._budget import ServerBudget, organization_in, read_headers
from ._clients import aclose_clients, close_clients, close_retired
from ._errors import AllKeysCoolingError, AllKeysDisabledError, NoKeysError, duration
from ._keys import Key, KeyLike, mask, normalize_keys, split_keys
from ._lease import Lease, Probe
from ._limits import Lesson, pace_of
from ._model import MIXED, PACE_BACKOFF, PER_DAY, model_paced_by
from ._policy import Fate, Verdict, headers_of
from ._ring import KeyRing, KeyState, Marks, Pool, Where
from ._waiting import Attempt, Turns, wait_turn, wait_turn_async
from .backends import MemoryBackend, StateBackend, backend_from_url
from .backends._base import Outcome, Pick, SharedKeyState

__all__ = ["KeyManager", "KeyStats", "first_lease", "lease", "lease_async", "take_lease"]

logger = logging.getLogger("stable_openai")
logger.addHandler(logging.NullHandler())  # the library's records reach only handlers you set

_ENV_HELP = (
    "no API keys configured: call KeyManager([key1, key2, ...]) at start-up, or set "
    "OPENAI_API_KEYS (separated by commas, semicolons or spaces, or a JSON list) or "
    "OPENAI_API_KEY"
)

#: Every KeyManager alive (the singleton and those of ``KeyManager.create``): a fork must
#: give each fresh locks.
_MANAGERS: weakref.WeakSet[KeyManager] = weakref.WeakSet()

#: Longest wait between two questions to a shared backend while no key is ready: another
#: process may enable or add a key meanwhile.
_SHARED_POLL = 1.0


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
        keys = split_keys(os.environ.get(name, ""), name)
        if keys:
            return normalize_keys(keys, name)
    raise NoKeysError(_ENV_HELP)


class KeyManager:
    """The singleton that holds every API key and its state.

    ``KeyManager(api_keys)`` builds it (or reconfigures it: keys still present keep their
    state, new keys join, the rest leave, disabled keys given again are enabled);
    ``KeyManager()`` returns it, reading ``OPENAI_API_KEYS`` / ``OPENAI_API_KEY`` the first
    time if no keys were given.  ``KeyManager.reset()`` forgets it (for tests).

    ``backend`` says where the keys' state lives: ``None`` (this process), a URL such as
    ``"redis://localhost:6379/0"`` (shared by every process and host using that Redis), or a
    :class:`~stable_openai.backends.StateBackend` object.
    """

    _instance: ClassVar[KeyManager | None] = None
    _class_lock: ClassVar[threading.Lock] = threading.Lock()

    _owner: _Owner
    _ring: KeyRing
    _lock: threading.Lock
    _turns: Turns
    _backend: StateBackend
    _last_pick: Pick | None  # the shared backend's last "no key is ready", for messages

    def __new__(
        cls,
        api_keys: Iterable[KeyLike] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        backend: str | StateBackend | None = None,
    ) -> KeyManager:
        keys = None if api_keys is None else normalize_keys(api_keys)
        _check_clock(clock)
        with cls._class_lock:
            instance = KeyManager._instance
            if instance is None:
                instance = KeyManager._instance = cls._build(keys, clock, backend)
            else:
                # The same URL again (start-up code run twice) keeps the backend and its state.
                same = backend is instance._backend or (
                    isinstance(backend, str) and backend == instance._backend_url
                )
                built = None if same else _build_backend(backend)
                if clock is not None:
                    with instance._lock:
                        instance._ring.clock = clock
                if keys is not None:
                    instance._reconfigure(keys)
                instance._use_backend(built, backend)
        return instance

    def __init__(
        self,
        api_keys: Iterable[KeyLike] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        backend: str | StateBackend | None = None,
    ) -> None:
        """All the work happens in ``__new__``: the instance is shared."""

    def _setup(self, keys: list[Key], clock: Callable[[], float] | None) -> None:
        _MANAGERS.add(self)
        self._owner = _Owner(self)
        self._ring = KeyRing(keys, clock=clock or time.monotonic)
        self._new_locks()
        self._backend = MemoryBackend()
        self._backend.bind(self._ring)
        self._backend_url: str | None = None
        self._last_pick = None

    def _use_backend(self, backend: StateBackend | None, given: object = None) -> None:
        """Keep the keys' state in ``backend`` from now on (``None``: no change); ``given``
        is what the caller passed, a URL or the object."""
        if backend is None:
            return
        with self._lock:
            old = self._backend
            backend.bind(self._ring)
            self._backend = backend
            self._backend_url = given if isinstance(given, str) else None
            self._last_pick = None
        if old is not backend:
            old.close()

    @property
    def backend(self) -> StateBackend:
        """Where the keys' state lives (a ``MemoryBackend`` unless one was given)."""
        return self._backend

    def _new_locks(self) -> None:
        self._lock = threading.Lock()
        self._turns = Turns()
        # This process's calls in flight of each model that a decorated function's ``model``
        # argument named, by key (see _spread): made anew after a fork, as the locks are —
        # the parent's calls are not the child's.
        self._spread_calls: dict[str, dict[KeyState, int]] = {}

    @classmethod
    def reset(cls) -> None:
        """Forget the singleton, so the next ``KeyManager(...)`` starts afresh (for tests)."""
        with cls._class_lock:
            instance = KeyManager._instance
            KeyManager._instance = None
        if instance is not None:
            instance.close()

    @classmethod
    def create(
        cls,
        api_keys: Iterable[KeyLike] | None = None,
        *,
        clock: Callable[[], float] | None = None,
        backend: str | StateBackend | None = None,
    ) -> KeyManager:
        """A new, independent KeyManager — not the singleton — for a second group of keys:
        ``azure = KeyManager.create(azure_keys)`` then ``@stable(manager=azure)``.  It takes
        the same arguments as ``KeyManager(...)``, shares nothing with the singleton or with
        other groups, and is closed with its own ``close()``."""
        keys = None if api_keys is None else normalize_keys(api_keys)
        _check_clock(clock)
        return cls._build(keys, clock, backend)

    @classmethod
    def _build(
        cls, keys: list[Key] | None, clock: Callable[[], float] | None,
        backend: str | StateBackend | None,
    ) -> KeyManager:
        """A new manager (the singleton's first build, or a group of ``create``)."""
        built = _build_backend(backend)
        instance = super().__new__(cls)
        instance._setup(keys if keys is not None else _keys_from_env(), clock)
        instance._use_backend(built, backend)
        return instance

    @classmethod
    def current(cls) -> KeyManager | None:
        """The singleton if one was built, else ``None`` (does not read the environment)."""
        return KeyManager._instance

    # -- the original package's API -----------------------------------------------------------
    def get_key(self) -> str:
        """A ready key, least recently used first; waits while every key is cooling."""
        state, _ = self._acquire(None, float("inf"))
        taken = Lease(self._owner, state)
        taken.give_back()
        return taken.key

    def set_ttl(self, key: str, ttl: float) -> bool:
        """Cool ``key`` for exactly ``ttl`` seconds (0 makes it ready).

        ``False`` if the key is unknown or disabled (give it to ``add_keys`` to enable it)."""
        _check_key_arg(key)
        _check_ttl(ttl)
        with self._lock:
            state = self._ring.find(key.strip())
            if state is None or state.where is Where.DISABLED:
                return False
            self._ring.set_cooldown(state, float(ttl))
            self._notify()
        self._backend.set_cooldown(state, float(ttl))
        return True

    def delete_key(self, key: str) -> bool:
        """Remove ``key`` from the ring.  ``False`` if it was not there."""
        _check_key_arg(key)
        with self._lock:
            state = self._ring.find(key.strip())
            removed = self._ring.remove(key.strip())
            if removed:
                self._backend.bind(self._ring)
            self._notify()
        if state is not None:
            close_clients([state])  # (one a call still uses closes after it)
        return removed

    def get_min_ttl(self) -> float:
        """Seconds until the first key is ready: 0 if one is ready now."""
        with self._lock:
            left = {s: self._ring.seconds_left(s) for s in self._ring}
        for state, row in self._shared_rows(left).items():
            left[state] = row.seconds_left
        return min(left.values()) if left else 0.0

    @property
    def data(self) -> MutableMapping[str, float]:
        """Each key and the seconds of cooldown it has left (``inf`` when disabled).

        As stable-openai 0.1.1's ``data`` dict, writes take effect: ``data[key] = ttl`` is
        :meth:`set_ttl` (adding the key first if it is new), ``del data[key]`` is
        :meth:`delete_key`.  Reads are of the moment ``data`` was read."""
        with self._lock:
            left = {s: self._ring.seconds_left(s) for s in self._ring}
        for state, row in self._shared_rows(left).items():
            left[state] = row.seconds_left
        return _KeyData(self, {state.key: seconds for state, seconds in left.items()})

    # -- additions ---------------------------------------------------------------------------
    def add_keys(self, api_keys: Iterable[KeyLike]) -> int:
        """Add keys (a disabled key given again is enabled).  Returns how many were new."""
        keys = normalize_keys(api_keys)
        with self._lock:
            known = [s for s in map(self._ring.find, (k.key for k in keys)) if s is not None]
            specs = [s.spec for s in known]
            added = self._ring.add(keys)
            self._backend.bind(self._ring)
            self._notify()
        if known:
            self._backend.enable(known)
        _renew_clients(known, specs)
        return len(added)

    def stats(self) -> list[KeyStats]:
        """One row per key: masked key, state, seconds left, reason and counters.

        With a shared backend, the state and counters are the shared ones (every process's
        calls), as long as the backend answers."""
        with self._lock:
            self._ring.promote_due()
            rows = {
                s: KeyStats(
                    key=s.masked, fingerprint=s.fingerprint, pool=_pool_label(s),
                    state=s.where.value,
                    seconds_left=self._ring.seconds_left(s), reason=s.reason, calls=s.calls,
                    successes=s.successes, rate_limits=s.rate_limits, failures=s.failures,
                    in_flight=s.in_flight,
                )
                for s in self._ring
            }
        for state, shared in self._shared_rows(rows).items():
            row = rows[state]
            row["state"] = shared.where
            row["seconds_left"] = shared.seconds_left
            row["reason"] = shared.reason
            row["calls"] = shared.calls
            row["successes"] = shared.successes
            row["rate_limits"] = shared.rate_limits
            row["failures"] = shared.failures
            row["in_flight"] = shared.in_flight
            if not shared.own_pool:  # a pool the server or the user named
                row["pool"] = shared.pool
        return list(rows.values())

    def _shared_rows(self, states: Iterable[KeyState]) -> Mapping[KeyState, SharedKeyState]:
        """The shared backend's view of ``states`` (empty without one, or when it fails)."""
        return self._backend.snapshot(list(states)) or {}

    def close(self) -> None:
        """Close the pooled clients (``client`` parameters) and the backend's connections;
        new ones are made on next use."""
        with self._lock:
            states = list(self._ring)
        close_clients(states)
        self._backend.close()

    async def aclose(self) -> None:
        """Close the pooled clients, with the async ones of the running event loop: await it
        before your loop ends (``asyncio.run`` closes the loop, not the connections)."""
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
            known = [s for s in map(self._ring.find, (k.key for k in keys)) if s is not None]
            specs = [s.spec for s in known]
            before = list(self._ring)
            self._ring.reconfigure(keys)
            self._backend.bind(self._ring)
            self._notify()
        if known:
            self._backend.enable(known)
        close_clients([state for state in before if state.where is Where.REMOVED])
        _renew_clients(known, specs)

    def _notify(self) -> None:
        """The keys changed: wake the first queued caller.  Call with the lock held."""
        self._turns.notify()

    def _take(self, avoid: set[KeyState] | None = None) -> KeyState | None:
        """Choose a key at once from the ring, unless callers are queued (they come first) or
        the backend is to choose (outside the lock, in :meth:`_acquire`).  Lock held."""
        if self._turns or self._backend.available():
            return None
        return self._ring.choose(avoid)

    def _wait_time(self, budget: float, last: BaseException | None) -> float:
        """Seconds to wait for a key, or raise if waiting cannot help.  Lock held."""
        ring = self._ring
        if not len(ring):
            raise NoKeysError("KeyManager has no keys left: every key was deleted") from last
        wait = ring.next_ready_in()
        if wait is None:
            raise AllKeysDisabledError(ring.reasons(Where.DISABLED), ring.recheck_in()) from last
        if wait > budget:
            if last is not None and ring.all_usable_forbidden():
                raise last
            reasons = ring.reasons(Where.COOLING)
            raise AllKeysCoolingError(wait, sum(reasons.values()), reasons) from last
        return min(wait, threading.TIMEOUT_MAX)  # an "infinite" cooldown still waits, in steps

    def _attempt(
        self, avoid: set[KeyState] | None, last: BaseException | None
    ) -> Attempt[Pick, KeyState]:
        """One try of a queued caller (see ``_waiting.Attempt``), with the lock held."""

        def attempt(head: bool, budget: float, pick: Pick | None) -> tuple[KeyState | None, float]:
            if not head:
                if budget <= 0:  # waited its whole budget behind other callers
                    shown = self._last_pick
                    if shown is not None:
                        reasons = dict(shown.cooling)
                        wait = shown.wait or 0.0
                    else:
                        reasons = self._ring.reasons(Where.COOLING)
                        wait = self._ring.next_ready_in() or 0.0
                    raise AllKeysCoolingError(wait, sum(reasons.values()), reasons) from last
                return None, budget
            if pick is not None:
                state = self._claim(pick)
                if state is None:
                    return None, self._shared_wait_time(pick, budget, last)
            else:
                state = self._ring.choose(avoid)
            if state is not None:
                return state, 0.0
            return None, self._wait_time(budget, last)

        return attempt

    def _claim(self, pick: Pick | None) -> KeyState | None:
        """Mark in flight here the key a shared backend chose.  Lock held."""
        state = pick.state if pick is not None else None
        if state is None or state.where is Where.REMOVED:  # deleted meanwhile: its lease expires
            return None
        self._ring.take(state)
        for model, seconds in pick.lanes.items() if pick is not None else ():
            self._ring.hold_lane(state, model, seconds)  # held by another process's 429
        return state

    def _shared_wait_time(self, pick: Pick, budget: float, last: BaseException | None) -> float:
        """:meth:`_wait_time` from what a shared backend said when no key was ready."""
        if pick.state is not None:  # it chose a key this process no longer has: ask again
            return 0.0
        if not len(self._ring):
            raise NoKeysError("KeyManager has no keys left: every key was deleted") from last
        self._last_pick = pick
        wait = pick.wait
        if wait is None:
            raise AllKeysDisabledError(
                pick.disabled or {"disabled": len(self._ring)}, pick.recheck
            ) from last
        if wait > budget:
            if last is not None and pick.all_forbidden:
                raise last
            reasons = dict(pick.cooling)
            raise AllKeysCoolingError(wait, sum(reasons.values()), reasons) from last
        return min(wait, _SHARED_POLL)

    def _acquire(
        self,
        avoid: set[KeyState] | None,
        budget: float,
        last: BaseException | None = None,
    ) -> tuple[KeyState, float]:
        """Choose a key and mark it in flight, waiting up to ``budget`` seconds, in turn with
        the other waiting callers.  Returns the key's state and the seconds spent waiting."""
        backend = self._backend
        pick = None
        if not self._turns and backend.available():
            pick = backend.choose(avoid)  # outside the lock: this is I/O
            with self._lock:
                state = self._claim(pick)
            if state is not None:
                return state, 0.0
        with self._lock:
            state = self._take(avoid)
        if state is not None:
            return state, 0.0
        return wait_turn(
            self._turns, self._lock, self._attempt(avoid, last), budget,
            ask_shared=backend.available, shared_choose=lambda: backend.choose(avoid),
            pick=pick,
        )

    async def _acquire_async(
        self,
        avoid: set[KeyState] | None,
        budget: float,
        last: BaseException | None = None,
    ) -> tuple[KeyState, float]:
        """:meth:`_acquire` for coroutines: waits on a future, never blocks the loop."""
        backend = self._backend
        pick = None
        if not self._turns and backend.available():
            pick = await backend.choose_async(avoid)
            with self._lock:
                state = self._claim(pick)
            if state is not None:
                return state, 0.0
        with self._lock:
            state = self._take(avoid)
        if state is not None:
            return state, 0.0
        return await wait_turn_async(
            self._turns, self._lock, self._attempt(avoid, last), budget,
            ask_shared=backend.available, shared_choose=lambda: backend.choose_async(avoid),
            pick=pick,
        )

    def _abandon(self, state: KeyState) -> None:
        tokens = _call_tokens(state)
        with self._lock:
            self._ring.end(state, tokens)
        self._backend.report(state, "abandoned", tokens=tokens)
        if "retired" in state.clients:
            close_retired(state)

    def _give_back(self, state: KeyState) -> None:
        with self._lock:
            self._ring.give_back(state)
        self._backend.report(state, "given_back")
        if "retired" in state.clients:
            close_retired(state)

    def _fail(
        self, state: KeyState, verdict: Verdict, exc: BaseException | None = None,
        model: str | None = None,
    ) -> None:
        """Record a failed call (``model``: the one it asked for, if known) and apply the
        verdict to its key (and its pool)."""
        first_disable = False
        organization = None
        lesson = NO_LESSON
        if verdict.pooled and exc is not None:
            message = str(getattr(exc, "message", ""))
            headers = headers_of(exc)
            said = None if headers is None else read_headers(headers)
            organization = (said and said.pool) or organization_in(message)
            if verdict.rate_limited:
                lesson = pace_of(message, said)
        tokens = _call_tokens(state)
        with self._lock:
            seconds = self._ring.fail(
                state, rate_limited=verdict.rate_limited, tokens=tokens,
                organization=organization, lesson=lesson, cooled=verdict.seconds,
                hinted=verdict.hinted,
            )
            if model is not None and verdict.rate_limited and verdict.pooled:
                self._ring.limit_met(model)  # (see KeyRing.lane_pass)
            if (
                model is not None and verdict.rate_limited and verdict.pooled
                and state.pool.pace_model == MIXED
            ):
                # A pool serving several models: the 429 is of this call's model's limit.
                self._ring.hold_lane(state, model, seconds)
                if lesson.daily:  # (and marked as a day's: see _model.PER_DAY)
                    self._ring.hold_lane(state, model + PER_DAY, seconds)
                if lesson.told is not None:  # and paced a little below the rate it gave
                    self._ring.pace_lane(state, model, PACE_BACKOFF * lesson.told, seconds)
            else:
                first_disable = self._ring.apply_verdict(
                    state,
                    verdict if seconds == verdict.seconds else replace(verdict, seconds=seconds),
                    organization,
                )
        outcome: Outcome = "rate_limited" if verdict.rate_limited else "failed"
        self._backend.report(
            state, outcome, verdict, organization, tokens, lesson=lesson, model=model
        )
        if "retired" in state.clients:
            close_retired(state)
        if first_disable:
            logger.warning("API key %s disabled: %s", state.masked, verdict.reason)
        elif verdict.fate is Fate.COOL:
            logger.debug(
                "API key %s cooling %s: %s", state.masked, duration(seconds),
                verdict.reason,
            )

    def _learn(
        self, state: KeyState, budget: ServerBudget | None, marks: Marks | None = None,
        model: str | None = None,
    ) -> None:
        """A response arrived on ``state`` for a request for ``model`` (if its body named
        one) sent when the pool stood at ``marks``; a successful one, or a 429, carries the
        pool's budget in its headers — in a pool serving several models, the budget of the
        request's model there, which paces that model once they show it spent
        (``_model.model_paced_by``)."""
        self._backend.answered(state, budget)
        paced = None if budget is None or model is None else model_paced_by(budget)
        with self._lock:
            left_at = self._ring.answered(state, marks)
            if budget is not None and self._ring.learn(state, budget, marks, left_at):
                self._notify()
            if paced is not None and model is not None and state.pool.pace_model == MIXED:
                self._ring.limit_met(model)
                self._ring.hold_lane(state, model, paced[1])
                self._ring.pace_lane(state, model, *paced)
        if paced is not None and model is not None and budget is not None:
            # (a shared store's pool, where it serves several models)
            self._backend.pace_lane(state, model, *paced, budget.pool)

    def _probe_back(self, state: KeyState, probe: Probe) -> None:
        """A call on ``state`` that went as ``probe`` ended: the probe is back."""
        if probe.shared:
            self._backend.probe_answered(state, probe.model, str(probe.stamp))
        else:
            with self._lock:
                self._ring.probe_answered(probe.pool, probe.model, float(probe.stamp))

    def _probe(self, state: KeyState) -> None:
        with self._lock:
            self._ring.probe(state)
        self._backend.probe(state)

    def _model_free_in(
        self, model: str, avoid: set[KeyState], state: KeyState
    ) -> tuple[float | None, float | None, float | None, bool]:
        """For a call of ``model`` whose key ``state`` holds it: the seconds until a key not
        in ``avoid`` may serve it, and until any key may (``KeyRing.lane_free``: a hold for a
        day never ends for it), until the first cooling key is ready (``None`` where there is
        none), and whether ``state``'s hold is a day's."""
        mine = _probes_here(model)
        with self._lock:
            ring = self._ring
            return (ring.lane_free(model, avoid, mine), ring.lane_free(model, frozenset(), mine),
                    ring.next_ready_in(), ring.lane_held(state, model + PER_DAY) > 0)

    def _before_sending(self, state: KeyState, model: str | None = None) -> float:
        """A request for ``model`` (if its body names one) is about to leave on ``state``:
        the seconds it waits first.  A call's first request goes at once (its key was chosen
        for it) — unless the call's model, known first from this body, is held in the key's
        pool: then it waits for the hold (or its slot in the model's pace there), at most
        ``_LONGEST_REQUEST_WAIT``, and goes at once if the hold is longer (a 429 moves the
        call on); each further request does the same for its own model, and spends its
        pool's budget, as a call does, and waits while that budget holds the pool back.  Each
        request's model becomes the call's: a 429 is of the last one sent.  (The hook never
        raises: requests of one call that run side by side, each its own first, may already
        have been sent.)"""
        calls = _CALL_TOKENS.get()
        first = not calls or state not in calls
        held = 0.0
        if model is not None:
            if first and _call_model(state, keep=True) is not None:
                _note_call_model(state, model)  # (its model argument was checked already)
            else:
                held = self._owner.lane_held(state, model, book=_LONGEST_REQUEST_WAIT)
                if held > _LONGEST_REQUEST_WAIT:
                    held = 0.0
        if first:
            return held
        with self._lock:
            wait = self._ring.another_request(state)
        self._backend.another_request(state)
        return max(held, min(wait, _LONGEST_REQUEST_WAIT))

    def _sending(self, state: KeyState, tokens: float) -> Marks:
        _add_call_tokens(state, tokens)
        self._backend.sent(state)
        with self._lock:
            return self._ring.sent(state)


#: The longest another request of a call waits for its pool's budget: beyond, it goes, and a
#: 429 moves the call to another key.
_LONGEST_REQUEST_WAIT = 30.0

#: What a failure that is no rate limit teaches a pool's pace: nothing.
NO_LESSON = Lesson(False)


class _Owner:
    """The manager's side of every lease it hands out (``_lease.Owner``), and what pooled
    clients report (``_lease.KeyReports``): the seam's one crossing into the manager."""

    __slots__ = ("_manager",)

    def __init__(self, manager: KeyManager) -> None:
        self._manager = manager

    def succeeded(self, state: KeyState, model: str | None = None) -> None:
        # The path of nearly every call: _succeed's work done here, one call less.
        manager = self._manager
        tokens = _call_tokens(state) if _CALL_TOKENS.get() else 0.0
        if _CALL_MODELS.get():
            model = _call_model(state) or model
        lock = manager._lock
        if not lock.acquire(False):
            _take_contended(lock)
        try:
            manager._ring.succeed(state, tokens, model)
            if model is not None and state.pool.lane_paces:
                manager._ring.lane_succeeded(state, model)
        finally:
            lock.release()
        manager._backend.report(
            state, "succeeded", None, None, tokens,
            lesson=None if model is None else Lesson(False, None, model),
        )
        if "retired" in state.clients:
            close_retired(state)

    def failed(
        self, state: KeyState, verdict: Verdict, error: BaseException | None,
        model: str | None = None,
    ) -> None:
        self._manager._fail(state, verdict, error, _call_model(state) or model)

    def lane_held(
        self, state: KeyState, model: str, book: float = 0.0, lease: Lease | None = None
    ) -> float:
        _note_call_model(state, model)
        pool = state.pool
        manager = self._manager
        ring = manager._ring
        probing = ring.probing(model)
        if not pool.lanes and not pool.lane_paces and not (
            probing and ring.unlearned(pool, model)
        ):
            return 0.0  # (the path of nearly every call: no lock, no round trip to a store)
        backend = manager._backend
        # A call that asks again (not a booked request, which goes when told) and tells when
        # it ends is counted out while it is a probe — unless one out is its own caller's (a
        # decorated function calling another): waiting for that one would wait for itself.
        track = lease is not None and not book and pool not in _probes_here(model)
        if backend.shared and backend.available():  # the holds and paces every process shares
            reply = backend.lane_pass(state, model, probing, book, track)
            if reply is not None:
                held, spent, stamp = reply
                if spent and ring.unlearned(pool, model):
                    with manager._lock:  # (this process's own count knows only its probes)
                        ring.probes_spent(pool, model)
                if stamp is not None and lease is not None:
                    _note_probe(lease, Probe(model, stamp, True, pool))
                elif held and track:  # (for _model_free_in: when to ask again)
                    with manager._lock:
                        ring.hold_lane(state, model, held)
                return held
        stamps: list[float] | None = [] if track else None
        with manager._lock:
            held = ring.lane_pass(state, model, book, stamps)
        if stamps and lease is not None:
            _note_probe(lease, Probe(model, stamps[0], False, pool))
        return held

    def probe_back(self, state: KeyState, probe: Probe) -> None:
        self._manager._probe_back(state, probe)

    def spread_back(self, state: KeyState, model: str) -> None:
        manager = self._manager
        with manager._lock:
            _count_spread(manager, state, model, -1)

    def abandoned(self, state: KeyState) -> None:
        _call_model(state)
        self._manager._abandon(state)

    def given_back(self, state: KeyState) -> None:
        _call_model(state)
        self._manager._give_back(state)

    def before_sending(self, state: KeyState, model: str | None = None) -> float:
        return self._manager._before_sending(state, model)

    def sending(self, state: KeyState, tokens: float) -> Marks:
        return self._manager._sending(state, tokens)

    def answered(
        self, state: KeyState, budget: ServerBudget | None, marks: Marks | None,
        model: str | None = None,
    ) -> None:
        self._manager._learn(state, budget, marks, model)

    def corrected(self, state: KeyState, estimated: float, actual: float) -> None:
        _add_call_tokens(state, actual - estimated)

    def probing(self, state: KeyState) -> None:
        self._manager._probe(state)

    def wants_usage(self, state: KeyState) -> bool:
        return state.pool.token_bucket is not None


#: The tokens the requests of this thread's or task's calls cost so far, by key: the pooled
#: client's hooks (which run in the thread or task of the call) add to them, and the call's end
#: hands them to the ring and the backend, so that both stores take in a call's tokens at one
#: moment.  Never mutated: each change sets a new mapping, so tasks never share one.
_CALL_TOKENS: contextvars.ContextVar[Mapping[KeyState, float] | None] = contextvars.ContextVar(
    "stable_openai_call_tokens", default=None
)


def _add_call_tokens(state: KeyState, tokens: float) -> None:
    calls = _CALL_TOKENS.get() or {}
    _CALL_TOKENS.set({**calls, state: calls.get(state, 0.0) + tokens})


#: The model of this thread's or task's call on a key, by key, once known: from the decorated
#: function's ``model`` argument (``_Owner.lane_held``) or from the body of the call's first
#: request (``KeyManager._before_sending``); taken by the call's end.  Never mutated, as above.
_CALL_MODELS: contextvars.ContextVar[Mapping[KeyState, str] | None] = contextvars.ContextVar(
    "stable_openai_call_models", default=None
)


def _note_call_model(state: KeyState, model: str) -> None:
    calls = _CALL_MODELS.get() or {}
    if calls.get(state) != model:
        _CALL_MODELS.set({**calls, state: model})


def _call_model(state: KeyState, keep: bool = False) -> str | None:
    """The model of this thread's or task's call on ``state``, if known; forgotten unless
    ``keep`` (the call is ending)."""
    calls = _CALL_MODELS.get()
    if not calls or state not in calls:
        return None
    if not keep:
        _CALL_MODELS.set({key: value for key, value in calls.items() if key is not state})
    return calls[state]


#: The leases of this thread's or task's calls (and of those it runs in) that went as probes
#: (``_Owner.lane_held``), weakly: a thread's context outlives its calls, and must not keep
#: their leases (nor, through them, their manager).  Those ended have no probe left.  Never
#: mutated, as above.
_OPEN_PROBES: contextvars.ContextVar[tuple[weakref.ref[Lease], ...]] = contextvars.ContextVar(
    "stable_openai_open_probes", default=())


def _note_probe(lease: Lease, probe: Probe) -> None:
    lease.probe = probe
    _OPEN_PROBES.set((*(ref for ref, _ in _open_probes()), weakref.ref(lease)))


def _open_probes() -> Iterator[tuple[weakref.ref[Lease], Probe]]:
    """The probes still out of this thread's or task's calls, each with its lease's ref."""
    for ref in _OPEN_PROBES.get():
        taken = ref()
        probe = None if taken is None else taken.probe
        if probe is not None:
            yield ref, probe


def _probes_here(model: str) -> list[Pool]:
    """The pools where a call this thread or task runs in is a probe of ``model``, still
    out."""
    return [probe.pool for _, probe in _open_probes() if probe.model == model]


def _call_tokens(state: KeyState) -> float:
    """The tokens of this thread's or task's call on ``state``, which is ending."""
    calls = _CALL_TOKENS.get()
    if not calls or state not in calls:
        return 0.0
    _CALL_TOKENS.set({key: value for key, value in calls.items() if key is not state})
    return calls[state]


def first_lease(
    manager: KeyManager | None, model: str | None = None
) -> tuple[KeyManager, Lease | None]:
    """The manager of a call — ``manager``, else the singleton (built from the environment
    if there is none yet) — and a lease at once if a key is ready.  Every call starts here;
    only one that must wait or fails goes on to :func:`lease`."""
    if manager is None:  # (not "or": a manager whose keys were all deleted is falsy)
        manager = KeyManager._instance
        if manager is None:
            manager = KeyManager()
    return manager, take_lease(manager, None, model)


def take_lease(
    manager: KeyManager, avoid: set[KeyState] | None = None, model: str | None = None
) -> Lease | None:
    """A lease on a ready key at once, or ``None`` when the caller must wait (no key is
    ready, other callers are queued first, or a shared backend chooses).  A call of
    ``model`` prefers a key with no call of that model in flight from this process (see
    :func:`_spread`)."""
    lock = manager._lock
    if not lock.acquire(False):
        _take_contended(lock)
    try:
        state = manager._take(_spread(manager, avoid, model))
        if state is not None and model is not None:
            _count_spread(manager, state, model, 1)
    finally:
        lock.release()
    if state is None:
        return None
    taken = Lease(manager._owner, state)
    taken.spread = model
    return taken


def _spread(
    manager: KeyManager, avoid: set[KeyState] | None, model: str | None
) -> set[KeyState] | None:
    """The keys a call of ``model`` would rather not take: ``avoid``, and those with a call
    of the model in flight from this process — so that a model's calls spread over the
    keys (a model's limits are per key's project: calls of a small model that crowd onto one
    key meet its limit there together).  A choice takes an avoided key only when no other is
    ready (``KeyRing.choose``, the Redis ``choose``): the least loaded.  Lock held."""
    busy = None if model is None else manager._spread_calls.get(model)
    if not busy:
        return avoid
    return set(busy) if not avoid else avoid | busy.keys()


def _count_spread(manager: KeyManager, state: KeyState, model: str, change: int) -> None:
    """Count a call of ``model`` on ``state`` in flight (``change`` 1) or ended (-1).  Lock
    held."""
    calls = manager._spread_calls.setdefault(model, {})
    left = calls.get(state, 0) + change
    if left > 0:
        calls[state] = left
    else:
        calls.pop(state, None)
        if not calls:
            del manager._spread_calls[model]


#: How many times a thread that finds the manager's lock taken yields before it blocks.
_YIELDS = 100


def _take_contended(lock: threading.Lock) -> None:
    """Take ``lock``, which another thread holds, on the path every call takes twice.

    Its holder keeps it for a microsecond or two, but may have lost the GIL meanwhile.
    Blocking on the lock would then put this thread to sleep in the kernel, and every other
    thread behind it, each to be woken in turn: with tens of threads, a call cost 30 µs
    instead of 4 (benchmarks/overhead.py).  Giving the GIL back instead lets the holder
    finish; only a lock held for long (``add_keys`` of thousands of keys) is waited for."""
    for _ in range(_YIELDS):
        time.sleep(0)
        if lock.acquire(False):
            return
    lock.acquire()


def lease(
    manager: KeyManager, avoid: set[KeyState] | None, budget: float,
    last: BaseException | None = None, model: str | None = None,
) -> tuple[Lease, float]:
    """A lease, waiting up to ``budget`` seconds in turn with the other callers; and the
    seconds waited.  Raises the library's errors when no key will be ready in time.  A call
    of ``model`` prefers a key with none of its calls in flight (:func:`_spread`)."""
    state, waited = manager._acquire(_spreading(manager, avoid, model), budget, last)
    return _spread_lease(manager, state, model), waited


async def lease_async(
    manager: KeyManager, avoid: set[KeyState] | None, budget: float,
    last: BaseException | None = None, model: str | None = None,
) -> tuple[Lease, float]:
    """:func:`lease` for coroutines: waits without blocking the event loop."""
    state, waited = await manager._acquire_async(_spreading(manager, avoid, model), budget, last)
    return _spread_lease(manager, state, model), waited


def _spreading(
    manager: KeyManager, avoid: set[KeyState] | None, model: str | None
) -> set[KeyState] | None:
    """:func:`_spread`, taking the manager's lock (for a call of a model only)."""
    if model is None:
        return avoid
    with manager._lock:
        return _spread(manager, avoid, model)


def _spread_lease(manager: KeyManager, state: KeyState, model: str | None) -> Lease:
    taken = Lease(manager._owner, state)
    if model is not None:
        with manager._lock:
            _count_spread(manager, state, model, 1)
        taken.spread = model
    return taken


class _KeyData(MutableMapping[str, float]):
    """:attr:`KeyManager.data`: a snapshot of each key's cooldown whose writes go to the
    manager.  Never shows a key whole in an error."""

    __slots__ = ("_manager", "_seconds")

    def __init__(self, manager: KeyManager, seconds: dict[str, float]) -> None:
        self._manager = manager
        self._seconds = seconds

    def __getitem__(self, key: str) -> float:
        try:
            return self._seconds[key]
        except (KeyError, TypeError):
            raise KeyError(f"no such key: {_masked(key)}") from None

    def __setitem__(self, key: str, ttl: float) -> None:
        _check_key_arg(key)
        _check_ttl(ttl)  # before a new key is added: a bad write changes nothing
        if key.strip() not in self._seconds:
            self._manager.add_keys([key])
        if not self._manager.set_ttl(key, ttl):
            raise ValueError(f"{_masked(key)} is disabled: give it to add_keys() to enable it")
        self._seconds[key.strip()] = float(max(0.0, ttl))

    def __delitem__(self, key: str) -> None:
        _check_key_arg(key)
        if not self._manager.delete_key(key):
            raise KeyError(f"no such key: {_masked(key)}")
        self._seconds.pop(key.strip(), None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._seconds)

    def __len__(self) -> int:
        return len(self._seconds)

    def __repr__(self) -> str:
        rows = ", ".join(f"{_masked(k)!r}: {v:g}" for k, v in self._seconds.items())
        return "{" + rows + "}"


def _renew_clients(states: list[KeyState], specs: list[Key]) -> None:
    """Keys given again with other settings (``base_url``, ``client_options``, ...): their
    next calls build pooled clients with them; the old ones close when no call uses them."""
    close_clients([state for state, spec in zip(states, specs) if state.spec is not spec])


def _masked(key: object) -> str:
    return mask(key) if isinstance(key, str) else type(key).__name__


def _pool_label(state: KeyState) -> str:
    """The pool's name if it is shared or learned; else the key's own, masked."""
    pool = state.pool
    return pool.name if pool.learned else f"own ({state.masked})"


def _build_backend(backend: object) -> StateBackend | None:
    """The backend ``KeyManager(backend=...)`` names; ``None`` for the default."""
    if backend is None or isinstance(backend, StateBackend):
        return backend
    if isinstance(backend, str):
        return backend_from_url(backend)
    raise TypeError(
        "backend must be None, a URL such as 'redis://localhost:6379/0', or a StateBackend "
        f"(stable_openai.backends), not {type(backend).__name__}"
    )



def _check_clock(clock: object) -> None:
    if clock is not None and not callable(clock):
        raise TypeError("clock must be a callable returning seconds, like time.monotonic")


def _check_ttl(ttl: object) -> None:
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl != ttl:
        raise TypeError("ttl must be a number of seconds")


def _check_key_arg(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"key must be str, not {type(key).__name__}")


_FORKING: list[KeyManager] = []  # the managers whose locks _before_fork took


def _before_fork() -> None:
    KeyManager._class_lock.acquire()
    # One fixed order: their locks are never nested otherwise, so this cannot deadlock.
    _FORKING[:] = sorted(_MANAGERS, key=id)
    for manager in _FORKING:
        manager._lock.acquire()


def _after_fork_in_parent() -> None:
    for manager in reversed(_FORKING):
        manager._lock.release()
    _FORKING.clear()
    KeyManager._class_lock.release()


def _after_fork_in_child() -> None:
    """Fresh locks, and no calls in flight: the parent's calls are not the child's."""
    KeyManager._class_lock = threading.Lock()
    _FORKING.clear()
    for manager in list(_MANAGERS):
        manager._new_locks()
        manager._ring.forget_in_flight()
        forget = getattr(manager._backend, "forget_in_flight", None)
        if forget is not None:
            forget()
        for state in manager._ring:
            state.clients.clear()  # their connections belong to the parent


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_before_fork, after_in_parent=_after_fork_in_parent,
        after_in_child=_after_fork_in_child,
    )
