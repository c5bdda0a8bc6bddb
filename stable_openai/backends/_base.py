"""The narrow protocol between :class:`~stable_openai.KeyManager` and where key state lives.

KeyManager keeps its keys in an in-process :class:`~stable_openai._ring.KeyRing`, whatever
the backend: it holds the key strings, the pooled clients and the state this process knows,
and it calls the backend at every event, with no branch on which backend it is.  A backend
says where else the state lives:

- :class:`~stable_openai.backends.MemoryBackend` (the default): nowhere else.  Its methods do
  nothing; the ring chooses every key.
- :class:`~stable_openai.backends.RedisBackend`: Redis, shared by every process and host
  that uses the same namespace.  While it is :meth:`~StateBackend.available`, it chooses the
  key (one atomic script) and each call is reported back to it (a second one); the ring
  mirrors what this process did, and carries on alone whenever Redis cannot be reached.

A backend is called outside the manager's lock (it may do I/O); its methods never raise
because the store failed: they return ``None`` (or do nothing) and the manager uses its ring
instead.  The store's own exceptions become :class:`StorageError` inside the backend and
never reach a caller.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from .._budget import ServerBudget
from .._errors import StableOpenAIError
from .._limits import Lesson
from .._policy import Verdict
from .._ring import KeyRing, KeyState

__all__ = ["Outcome", "Pick", "SharedKeyState", "StateBackend", "StorageError"]

Outcome = Literal["succeeded", "failed", "rate_limited", "abandoned", "given_back"]
"""How a call ended: answered; failed; failed with a rate limit (429); stopped by the caller
(cancelled, interrupted, a stream closed early); or a key handed out by ``get_key()``."""


class StorageError(StableOpenAIError):
    """The shared store failed: unreachable, too slow, restarted, or it refused a command.

    Internal: a backend catches it, logs one WARNING and lets the manager carry on with
    in-process state.  It is public only so that code driving a backend directly can catch it.
    """


@dataclass(frozen=True)
class Pick:
    """What a shared backend answered when asked for a key.

    Either ``state``, the key it chose and already marked in flight there, or why no key is
    ready: ``wait``, the seconds until the first cooling key is ready (``None`` when none is
    cooling), and how many keys are cooling and disabled for each reason.
    """

    state: KeyState | None = None
    wait: float | None = None
    cooling: Mapping[str, int] = field(default_factory=dict)
    disabled: Mapping[str, int] = field(default_factory=dict)
    all_forbidden: bool = False
    """Every usable key is benched for a 403: waiting will not help a 403 of this call."""
    recheck: float | None = None
    """Seconds until the first disabled key is tried again (``None``: none will be)."""
    lanes: Mapping[str, float] = field(default_factory=dict)
    """The models held in the chosen key's pool, and for how many seconds (a 429 of each
    said its limit there is spent: ``KeyRing.hold_lane``)."""


@dataclass(frozen=True)
class SharedKeyState:
    """One key as a shared backend sees it: its state, and counters over every process."""

    where: str
    seconds_left: float
    reason: str
    pool: str
    calls: int
    successes: int
    rate_limits: int
    failures: int
    in_flight: int
    own_pool: bool = False
    """The key is still in a pool of its own (neither given nor learned)."""


@runtime_checkable
class StateBackend(Protocol):
    """Where the state of the keys lives.  See the module docstring.

    Every method but :attr:`shared` does, by default, what a store that shares nothing does:
    nothing (``MemoryBackend`` is this protocol with its defaults).  A shared store overrides
    them all."""

    @property
    def shared(self) -> bool:
        """Whether the state is outside this process (then the methods below do I/O and the
        manager calls them outside its lock)."""
        ...

    def bind(self, ring: KeyRing) -> None:
        """Serve the keys of ``ring`` (again after they changed).  Called with the manager's
        lock held: no I/O here."""
        return None

    def available(self) -> bool:
        """Whether the backend chooses now: ``False`` when the ring is to choose (always, for
        a backend that shares nothing; while a broken store is left alone, for one that
        does)."""
        return False

    def choose(self, avoid: Collection[KeyState] | None) -> Pick | None:
        """Choose a key and mark it in flight, in one step.  Keys in ``avoid`` are chosen only
        when no other key is ready.  ``None`` when the store failed."""
        return None

    async def choose_async(self, avoid: Collection[KeyState] | None) -> Pick | None:
        """:meth:`choose` without blocking the event loop."""
        return None

    def sent(self, state: KeyState) -> None:
        """Note, for the call's :meth:`report`: its request left on ``state`` (the pooled
        client's hook saw it).  No I/O."""
        return None

    def another_request(self, state: KeyState) -> None:
        """A call on ``state`` sends another request: it spends the pool's shared budget, as
        a call chosen does (``KeyRing.another_request``)."""
        return None

    def answered(self, state: KeyState, budget: ServerBudget | None) -> None:
        """Note, for the call's :meth:`report`: its answer arrived; ``budget`` is what the
        answer's headers said of the pool's budget.  No I/O."""
        return None

    def report(
        self, state: KeyState, outcome: Outcome, verdict: Verdict | None = None,
        organization: str | None = None, tokens: float = 0.0, *,
        lesson: Lesson | None = None, model: str | None = None,
    ) -> None:
        """A call on ``state`` is over: release it, count ``outcome``, and apply ``verdict``
        (cool the key or its pool, or disable the key).  ``organization`` is the pool a 429
        named: the key's pool, if it has none yet.  ``tokens``: what the call's requests
        cost, for its pool's average call and token pacing.  ``lesson``: what a 429 teaches
        the pool's pace (``_limits.pace_of``, ``_model.Budget.limited``); ``model``: the one
        the call asked for, if known (a 429 of it in a pool serving several holds it there)."""
        return None

    def lane_pass(
        self, state: KeyState, model: str, probe: bool = False, book: float = 0.0,
        track: bool = False,
    ) -> tuple[float, bool, str | None] | None:
        """A call of ``model`` would go on ``state``: the seconds the model is held in the
        key's pool, or 0 — then the call takes its place in the model's pace there, or, with
        ``probe`` (a 429 named the model lately), one call per ``PROBE_WAIT`` until the pool
        learns its limit; held at most ``book`` seconds, the call goes once the hold ends and
        takes its place then (``KeyRing.lane_pass``).  With ``track`` (the caller tells
        :meth:`probe_answered` when the call comes back) a probe is also held while more
        are out than came back.  With whether the pool probes the model no more (it
        has no pace for it, and learned its limit or spent its probes), and the store's stamp
        of a tracked probe, as text to send back as it is (else ``None``).  ``None`` when the
        store failed (or shares nothing)."""
        return None

    def probe_answered(self, state: KeyState, model: str, stamp: str) -> None:
        """A call of ``model`` that :meth:`lane_pass` counted out as a probe at ``stamp``, in
        ``state``'s pool, came back (``KeyRing.probe_answered``)."""
        return None

    def pace_lane(
        self, state: KeyState, model: str, rate: float, after: float, pool: str | None = None
    ) -> None:
        """An answer of a request for ``model`` on ``state`` showed that model's requests
        spent (``_model.model_paced_by``): where the key's pool serves several models, hold
        ``model`` there for ``after`` seconds, then pace it at ``rate`` calls a second
        (``KeyRing.hold_lane`` and ``KeyRing.pace_lane``).  ``pool``: the pool the answer
        named, which the key joins (``KeyRing.join_pool``) — in this process at once, in a
        shared store when the call reports: the pace is for that pool.  Before returning: the
        call's next request asks whether its model is held."""
        return None

    def probe(self, state: KeyState) -> None:
        """``state`` will be called through a client whose answers tell its pool's budget:
        until the first one does, the pool sends only a few calls per key."""
        return None

    def set_cooldown(self, state: KeyState, seconds: float) -> None:
        """Cool ``state`` for exactly ``seconds`` (0 makes it ready); not a disabled key."""
        return None

    def enable(self, states: Collection[KeyState]) -> None:
        """Make the disabled keys among ``states`` ready again (they were given again)."""
        return None

    def snapshot(self, states: Collection[KeyState]) -> Mapping[KeyState, SharedKeyState] | None:
        """The shared state of ``states``; ``None`` when there is none (memory) or the store
        failed."""
        return None

    def close(self) -> None:
        """Let go of connections."""
        return None
