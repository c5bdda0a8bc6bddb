"""The default backend: the state of the keys lives in this process's key ring, and only there.

:class:`MemoryBackend` is the protocol's reference: each method is the ring operation it
names.  KeyManager drives its ring directly on the hot path (a shared backend only adds
calls around it), so choosing the memory backend costs nothing.  Its methods, like the
ring's, must be called with the lock that guards the ring held.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from .._budget import ServerBudget
from .._policy import Fate, Verdict
from .._ring import KeyRing, KeyState, Where
from ._base import Outcome, Pick, SharedKeyState

__all__ = ["MemoryBackend", "apply_verdict"]


def apply_verdict(
    ring: KeyRing, state: KeyState, verdict: Verdict, organization: str | None = None
) -> bool:
    """Apply what a failure means to ``state`` (and its pool) in ``ring``.

    ``organization`` (named by a 429 message) becomes the key's pool if it has none yet.
    Returns ``True`` if this disabled the key (it was not disabled before).
    """
    if organization and not state.pool.learned:
        ring.join_pool(state, organization)
    if verdict.fate is Fate.COOL:
        if verdict.pooled:
            ring.cool_pool(state.pool, verdict.seconds, verdict.reason, verdict.cause)
        else:
            ring.cool(
                state, verdict.seconds, verdict.reason, verdict.cause,
                forbidden=verdict.forbidden,
            )
    elif verdict.fate is Fate.DISABLE:
        return ring.disable(state, verdict.reason, verdict.cause)
    return False


class MemoryBackend:
    """Key state in this process only (the default: ``KeyManager(keys)``)."""

    shared = False

    def __init__(self) -> None:
        self._ring: KeyRing | None = None

    def __repr__(self) -> str:
        return "MemoryBackend()"

    @property
    def ring(self) -> KeyRing:
        if self._ring is None:
            raise RuntimeError("MemoryBackend is not bound to a key ring yet")
        return self._ring

    def bind(self, ring: KeyRing) -> None:
        self._ring = ring

    def available(self) -> bool:
        return True

    def choose(self, avoid: Collection[KeyState] | None) -> Pick:
        ring = self.ring
        state = ring.choose(set(avoid) if avoid else None)
        if state is not None:
            return Pick(state)
        return Pick(
            None, ring.next_ready_in(), ring.reasons(Where.COOLING),
            ring.reasons(Where.DISABLED), ring.all_usable_forbidden(),
        )

    async def choose_async(self, avoid: Collection[KeyState] | None) -> Pick:
        return self.choose(avoid)

    def observe(
        self, state: KeyState, budget: ServerBudget | None = None, tokens: float = 0.0
    ) -> None:
        if tokens:
            self.ring.spend_tokens(state, tokens)
        if budget is not None:
            self.ring.learn(state, budget)

    def report(
        self,
        state: KeyState,
        outcome: Outcome,
        verdict: Verdict | None = None,
        organization: str | None = None,
    ) -> None:
        ring = self.ring
        if outcome == "succeeded":
            ring.succeed(state)
        elif outcome == "failed" or outcome == "rate_limited":
            ring.fail(state, rate_limited=outcome == "rate_limited")
        elif outcome == "given_back":
            ring.give_back(state)
        else:
            ring.release(state)
        if verdict is not None:
            apply_verdict(ring, state, verdict, organization)

    def set_cooldown(self, state: KeyState, seconds: float) -> None:
        self.ring.set_cooldown(state, seconds)

    def enable(self, states: Collection[KeyState]) -> None:
        self.ring.add([state.spec for state in states if state.where is Where.DISABLED])

    def snapshot(self, states: Collection[KeyState]) -> Mapping[KeyState, SharedKeyState] | None:
        return None  # the ring is the state: KeyManager.stats() reads it directly

    def close(self) -> None:
        pass
