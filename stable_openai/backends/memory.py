"""The default backend: the state of the keys lives in this process's key ring, and only there.

KeyManager keeps every key's state in its ring whatever the backend, and tells the backend
what happens (a call chosen, answered, ended; a key cooled or enabled).  A backend that
shares state stores it elsewhere too; :class:`MemoryBackend` shares nothing, so each of its
methods does nothing: it never asks to choose (``available()`` is ``False``, so the ring
chooses), and has no view of its own (``snapshot()`` is ``None``).  Choosing it costs a
method call per event and nothing else.
"""

from __future__ import annotations

from ._base import StateBackend

__all__ = ["MemoryBackend"]


class MemoryBackend(StateBackend):
    """Key state in this process only (the default: ``KeyManager(keys)``).  Every method is
    the protocol's default: it does nothing."""

    shared = False

    def __repr__(self) -> str:
        return "MemoryBackend()"
