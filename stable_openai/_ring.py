"""The key ring: the state of every key, and choosing one.  Pure: no locks, no I/O.

Every key is in exactly one place: a *ready* bucket, the *cooling* heap, or nowhere
(disabled or removed).  Ready keys sit in buckets indexed by their number of calls in
flight; each bucket is an ``OrderedDict`` kept in least-recently-used order.  ``choose()``
takes the first key of the lowest non-empty bucket — fewest calls in flight, then least
recently used — in O(1), whatever the number of keys.  Cooling keys wait in a min-heap of
deadlines on an injected monotonic clock and return to the buckets when it passes them.

The caller (``KeyManager``) holds one lock around every method.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator

__all__ = ["KeyRing", "KeyState", "Where", "fingerprint", "mask", "normalize_keys"]


def mask(key: str) -> str:
    """A form of ``key`` safe to print: ``sk-…WXYZ`` for real-length keys, less for short ones."""
    if len(key) >= 16:
        return f"{key[:3]}…{key[-4:]}"
    if len(key) >= 8:
        return f"…{key[-2:]}"
    return "…"


def fingerprint(key: str) -> str:
    """A short one-way identifier of ``key``, stable across processes."""
    return hashlib.blake2b(key.encode(), digest_size=6, person=b"stable_openai").hexdigest()


def normalize_keys(api_keys: object, name: str = "api_keys") -> list[str]:
    """Validate a list of keys: strings only, stripped, without duplicates, not empty.

    Errors name the position of the bad entry, never its value.
    """
    if isinstance(api_keys, (str, bytes)):
        raise TypeError(f"{name} must be a list of keys, not a single string: use [key]")
    if isinstance(api_keys, dict) or not isinstance(api_keys, Iterable):
        raise TypeError(f"{name} must be a list of strings, not {type(api_keys).__name__}")
    keys: list[str] = []
    seen: set[str] = set()
    for position, raw in enumerate(api_keys):
        if not isinstance(raw, str):
            raise TypeError(f"{name}[{position}] is {type(raw).__name__}; keys must be str")
        key = raw.strip()
        if not key:
            raise ValueError(f"{name}[{position}] is empty")
        if any(char.isspace() for char in key):
            raise ValueError(f"{name}[{position}] contains whitespace inside the key")
        if key not in seen:
            seen.add(key)
            keys.append(key)
    if not keys:
        raise ValueError(f"{name} is empty: give at least one API key")
    return keys


class Where(enum.Enum):
    """Where a key is in the ring."""

    READY = "ready"
    COOLING = "cooling"
    DISABLED = "disabled"
    REMOVED = "removed"


class KeyState:
    """One key's state and counters.  Identity-hashed; only the ring mutates it."""

    __slots__ = (
        "calls",
        "cool_until",
        "failures",
        "fingerprint",
        "forbidden",
        "in_flight",
        "key",
        "masked",
        "rate_limits",
        "reason",
        "serial",
        "successes",
        "where",
    )

    def __init__(self, key: str, serial: int) -> None:
        self.key = key
        self.masked = mask(key)
        self.fingerprint = fingerprint(key)
        self.serial = serial
        self.where = Where.READY
        self.in_flight = 0
        self.cool_until = 0.0
        self.reason = ""
        self.forbidden = False
        self.calls = 0
        self.successes = 0
        self.rate_limits = 0
        self.failures = 0

    def __repr__(self) -> str:
        return f"<KeyState {self.masked} {self.where.value} in_flight={self.in_flight}>"


class KeyRing:
    """The keys and their states; see the module docstring for the structure."""

    def __init__(
        self, keys: Iterable[str] = (), *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self._states: dict[str, KeyState] = {}
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

    def add(self, keys: Iterable[str]) -> list[KeyState]:
        """Add keys; a disabled key given again is enabled again.  Returns the new states."""
        added = []
        for key in keys:
            state = self._states.get(key)
            if state is None:
                self._serial += 1
                state = KeyState(key, self._serial)
                self._states[key] = state
                self._bucket(0)[state] = None
                self._low = 0
                added.append(state)
            elif state.where is Where.DISABLED:
                state.reason = ""
                self._make_ready(state)
        return added

    def reconfigure(self, keys: Iterable[str]) -> None:
        """Make the ring hold exactly ``keys``: present keys keep their state, others leave."""
        wanted = list(dict.fromkeys(keys))
        keep = set(wanted)
        for key in [key for key in self._states if key not in keep]:
            self.remove(key)
        self.add(wanted)
        self._states = {key: self._states[key] for key in wanted}

    def remove(self, key: str) -> bool:
        state = self._states.pop(key, None)
        if state is None:
            return False
        self._leave(state)
        state.where = Where.REMOVED
        return True

    # -- choosing and releasing --------------------------------------------------------------
    def choose(self, avoid: frozenset[KeyState] | set[KeyState] | None = None) -> KeyState | None:
        """Take the ready key with the fewest calls in flight, least recently used first,
        and mark it in flight.  Keys in ``avoid`` are taken only when no other is ready.
        ``None`` when no key is ready."""
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
            del buckets[state.in_flight][state]
        else:
            state = buckets[low].popitem(last=False)[0]
        state.calls += 1
        in_flight = state.in_flight = state.in_flight + 1
        if in_flight == top:
            buckets.append(OrderedDict())
        buckets[in_flight][state] = None
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
        """The call on ``state`` is over (whatever its outcome)."""
        if state.in_flight <= 0:  # e.g. a call that began before os.fork() ends in the child
            return
        if state.where is Where.READY:
            del self._buckets[state.in_flight][state]
            state.in_flight -= 1
            self._buckets[state.in_flight][state] = None
            if state.in_flight < self._low:
                self._low = state.in_flight
        else:
            state.in_flight -= 1

    def give_back(self, state: KeyState) -> None:
        """Undo :meth:`choose` for a key that was only handed out (``get_key()``), not called."""
        state.calls -= 1
        self.release(state)

    def succeed(self, state: KeyState) -> None:
        state.successes += 1
        # release(), inlined: this is the path of nearly every call.
        in_flight = state.in_flight
        if in_flight > 0 and state.where is Where.READY:
            buckets = self._buckets
            del buckets[in_flight][state]
            state.in_flight = in_flight = in_flight - 1
            buckets[in_flight][state] = None
            if in_flight < self._low:
                self._low = in_flight
        elif in_flight > 0:
            state.in_flight = in_flight - 1

    def fail(self, state: KeyState, *, rate_limited: bool = False) -> None:
        if rate_limited:
            state.rate_limits += 1
        else:
            state.failures += 1
        self.release(state)

    # -- cooling and disabling ---------------------------------------------------------------
    def cool(
        self, state: KeyState, seconds: float, reason: str, *, forbidden: bool = False
    ) -> None:
        """Cool ``state`` for ``seconds``; an already later deadline is kept."""
        if state.where in (Where.DISABLED, Where.REMOVED):
            return
        deadline = self.clock() + max(0.0, seconds)
        if state.where is Where.COOLING and state.cool_until >= deadline:
            return
        self._set_deadline(state, deadline, reason, forbidden)

    def set_cooldown(self, state: KeyState, seconds: float, reason: str = "set_ttl") -> None:
        """Set the cooldown to exactly ``seconds`` from now (0 makes the key ready now)."""
        if state.where in (Where.DISABLED, Where.REMOVED):
            return
        if seconds <= 0:
            if state.where is Where.COOLING:
                state.reason = ""
                self._make_ready(state)
            return
        self._set_deadline(state, self.clock() + seconds, reason, False)

    def disable(self, state: KeyState, reason: str) -> bool:
        """Disable ``state`` until it is given again; ``True`` if it was not disabled before."""
        if state.where in (Where.DISABLED, Where.REMOVED):
            return False
        self._leave(state)
        state.where = Where.DISABLED
        state.reason = reason
        return True

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
                state.in_flight = 0
                self._make_ready(state)
            else:
                state.in_flight = 0

    # -- internals -----------------------------------------------------------------------------
    def _bucket(self, index: int) -> OrderedDict[KeyState, None]:
        buckets = self._buckets
        while len(buckets) <= index:
            buckets.append(OrderedDict())
        return buckets[index]

    def _leave(self, state: KeyState) -> None:
        """Take ``state`` out of the ready buckets (cooling heap entries go stale by themselves)."""
        if state.where is Where.READY:
            del self._buckets[state.in_flight][state]

    def _make_ready(self, state: KeyState) -> None:
        state.where = Where.READY
        state.cool_until = 0.0
        state.forbidden = False
        self._bucket(state.in_flight)[state] = None
        if state.in_flight < self._low:
            self._low = state.in_flight

    def _set_deadline(self, state: KeyState, deadline: float, reason: str, forbidden: bool) -> None:
        self._leave(state)
        state.where = Where.COOLING
        state.cool_until = deadline
        state.reason = reason
        state.forbidden = forbidden
        self._pushes += 1
        heapq.heappush(self._cooling, (deadline, self._pushes, state))
        if len(self._cooling) > 2 * len(self._states) + 16:
            self._cooling = [e for e in self._cooling if self._is_current(e)]
            heapq.heapify(self._cooling)

    @staticmethod
    def _is_current(entry: tuple[float, int, KeyState]) -> bool:
        deadline, _, state = entry
        return state.where is Where.COOLING and state.cool_until == deadline

    def _drop_stale_cooling(self) -> None:
        cooling = self._cooling
        while cooling and not self._is_current(cooling[0]):
            heapq.heappop(cooling)

    def _promote(self) -> None:
        now = self.clock()
        cooling = self._cooling
        while cooling and cooling[0][0] <= now:
            entry = heapq.heappop(cooling)
            if self._is_current(entry):
                entry[2].reason = ""
                self._make_ready(entry[2])
