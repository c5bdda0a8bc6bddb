"""The default backend: the state of the keys lives in this process's key ring, and only there.

KeyManager keeps every key's state in its ring whatever the backend, and tells the backend
what happens (a call chosen, answered, ended; a key cooled or enabled).  A backend that
shares state stores it elsewhere too; :class:`MemoryBackend` shares nothing, so each of its
methods does nothing: it never asks to choose (``available()`` is ``False``, so the ring
chooses), and has no view of its own (``snapshot()`` is ``None``).  Choosing it costs a
method call per event and nothing else.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from .._budget import ServerBudget
from .._policy import Verdict
from .._ring import KeyRing, KeyState
from ._base import Outcome, Pick, SharedKeyState

__all__ = ["MemoryBackend"]


class MemoryBackend:
    """Key state in this process only (the default: ``KeyManager(keys)``)."""

    shared = False

    def __repr__(self) -> str:
        return "MemoryBackend()"

    def bind(self, ring: KeyRing) -> None:
        pass

    def available(self) -> bool:
        return False  # nothing to ask: the ring chooses

    def choose(self, avoid: Collection[KeyState] | None) -> Pick | None:
        return None

    async def choose_async(self, avoid: Collection[KeyState] | None) -> Pick | None:
        return None

    def observe(
        self,
        state: KeyState,
        budget: ServerBudget | None = None,
        *,
        sent: bool = False,
        answered: bool = False,
    ) -> None:
        pass

    def report(
        self,
        state: KeyState,
        outcome: Outcome,
        verdict: Verdict | None = None,
        organization: str | None = None,
        tokens: float = 0.0,
    ) -> None:
        pass

    def probe(self, state: KeyState) -> None:
        pass

    def set_cooldown(self, state: KeyState, seconds: float) -> None:
        pass

    def enable(self, states: Collection[KeyState]) -> None:
        pass

    def snapshot(self, states: Collection[KeyState]) -> Mapping[KeyState, SharedKeyState] | None:
        return None  # the ring is the state: KeyManager.stats() reads it directly

    def close(self) -> None:
        pass
