"""One call's key: the only handle ``@stable`` and the pooled clients have on a KeyManager.

A :class:`Lease` is taken for one attempt of one call (``_manager.take_lease`` and its
waiting twins), carries the key (``lease.key``) into the call, and is ended exactly once:
:meth:`~Lease.succeed`, :meth:`~Lease.fail` with the failure's verdict, or
:meth:`~Lease.abandon` (cancelled, interrupted, a stream closed early).  A second end is
ignored, so a driver can end a lease in a ``finally`` without tracking whether it did.

What the lease reports goes to its :class:`Owner`, the manager's side of the seam; the pooled
clients' HTTP hooks report to the same owner (:class:`KeyReports`) what each request cost and
what each answer said of the key's budget.  Data flows down (a call asks for a lease) and facts
flow up once (the lease reports how the call ended).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ._budget import ServerBudget
    from ._policy import Verdict
    from ._ring import KeyState, Marks, Pool

__all__ = ["KeyReports", "LaneHeld", "Lease", "Owner", "Probe"]


class LaneHeld(Exception):
    """The call's model is held in its key's pool (a 429 said its limit there is spent):
    nothing was sent.  The call takes a key of another pool, or waits, or raises.  Raised
    before the decorated function runs, from its ``model`` argument."""

    def __init__(self, model: str, seconds: float) -> None:
        super().__init__(model, seconds)
        self.model = model
        self.seconds = seconds


class Probe:
    """A call counted out as a probe of its model in its key's pool (``KeyRing.lane_pass``):
    held by its lease, and taken back once when the lease ends, whatever thread or task ends
    it.  ``stamp`` is the store's own token for it (a number in memory, the shared record's
    text in Redis: sent back as it came); ``pool``, where it was counted (the key may move
    to another pool while its call is out)."""

    __slots__ = ("model", "pool", "shared", "stamp")

    def __init__(self, model: str, stamp: float | str, shared: bool, pool: Pool) -> None:
        self.model = model
        self.stamp = stamp
        self.shared = shared
        self.pool = pool


class KeyReports(Protocol):
    """What a pooled client's hooks tell about the requests they see on one key."""

    def before_sending(self, state: KeyState, model: str | None = None) -> float:
        """A request for ``model`` (if its body names one) is about to leave on ``state``:
        the seconds it should wait first (a call's further requests spend their pool's
        budget, and wait while it is spent; a call's first waits while its model is held in
        the key's pool)."""
        ...

    def sending(self, state: KeyState, tokens: float) -> Marks:
        """A request of about ``tokens`` tokens leaves on ``state`` (they count towards its
        call's cost, reported when the call ends); returns where its pool stood, for
        :meth:`answered` to place the answer."""
        ...

    def answered(
        self, state: KeyState, budget: ServerBudget | None, marks: Marks | None,
        model: str | None = None,
    ) -> None:
        """The server answered that request (``budget``: what a success's or a 429's
        headers said; ``model``: the one its body asked for, if it named one)."""
        ...

    def corrected(self, state: KeyState, estimated: float, actual: float) -> None:
        """The server counted ``actual`` tokens for a request estimated at ``estimated``."""
        ...

    def probing(self, state: KeyState) -> None:
        """A client that reads budget headers now serves ``state``: send a few calls first."""
        ...

    def wants_usage(self, state: KeyState) -> bool:
        """Whether the tokens an answer's ``usage`` counted matter to ``state``'s pacing (then
        the hooks read JSON bodies and report :meth:`corrected`)."""
        ...


class Owner(KeyReports, Protocol):
    """The manager's side of a lease: how a call on a key ended."""

    def succeeded(self, state: KeyState, model: str | None = None) -> None:
        """The call on ``state`` succeeded; ``model``: the one it asked for, if known."""
        ...

    def failed(
        self, state: KeyState, verdict: Verdict, error: BaseException | None,
        model: str | None = None,
    ) -> None: ...

    def lane_held(
        self, state: KeyState, model: str, book: float = 0.0, lease: Lease | None = None
    ) -> float:
        """Seconds ``model``'s calls are held in ``state``'s pool (0: not held — then the
        call takes its place in the model's pace there, if it has one; held at most
        ``book`` seconds, the call goes once the hold ends, and takes its place then).  With
        ``lease`` (the call's, which tells when it ends), a call that goes as a probe of the
        model is noted on it (``lease.probe``), and other probes wait while it is out."""
        ...

    def probe_back(self, state: KeyState, probe: Probe) -> None:
        """A call on ``state`` that went as ``probe`` ended (answered, failed, given up)."""
        ...

    def spread_back(self, state: KeyState, model: str) -> None:
        """A call of ``model`` on ``state``, counted in flight by ``take_lease``, ended."""
        ...

    def abandoned(self, state: KeyState) -> None: ...

    def given_back(self, state: KeyState) -> None:
        """The key was only handed out (``get_key()``), never called."""
        ...


class Lease:
    """One attempt's key; end it once with :meth:`succeed`, :meth:`fail` or :meth:`abandon`."""

    __slots__ = (
        "__weakref__", "_ended", "deadline", "key", "model", "owner", "probe", "spread", "state",
    )

    def __init__(self, owner: Owner, state: KeyState) -> None:
        self.owner = owner
        self.state = state
        self.key = state.key
        self.model: str | None = None  # the model the call asks for, when the driver knows
        self.deadline: float | None = None  # when the call's timeout ends (monotonic clock)
        self.probe: Probe | None = None  # the probe the call is, if it is one (lane_held)
        self.spread: str | None = None  # the model it is counted in flight of (take_lease)
        self._ended = False

    def __repr__(self) -> str:
        status = "ended" if self._ended else "open"
        return f"<Lease {self.state.masked} {status}>"

    def succeed(self) -> None:
        """The call got its answer."""
        if self._end():
            self.owner.succeeded(self.state, self.model)

    def fail(self, verdict: Verdict, error: BaseException | None = None) -> None:
        """The call failed; ``verdict`` (``_policy.classify``) says what that means for the
        key and its pool."""
        if self._end():
            self.owner.failed(self.state, verdict, error, self.model)

    def abandon(self) -> None:
        """The call stopped without an outcome: cancelled, interrupted, closed early."""
        if self._end():
            self.owner.abandoned(self.state)

    def give_back(self) -> None:
        """Only the key was wanted (``KeyManager.get_key()``): it was never called."""
        if self._end():
            self.owner.given_back(self.state)

    def _end(self) -> bool:
        """Whether this is the lease's first end; then its probe and its count in flight
        (if it has them) are given back first."""
        if self._ended:
            return False
        self._ended = True
        probe, self.probe = self.probe, None
        if probe is not None:
            self.owner.probe_back(self.state, probe)
        if self.spread is not None:
            self.owner.spread_back(self.state, self.spread)
        return True
