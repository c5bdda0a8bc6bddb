"""Where the state of the keys lives: in this process (the default) or shared through Redis.

::

    KeyManager(keys)                                     # MemoryBackend: this process only
    KeyManager(keys, backend="redis://localhost:6379/0")  # shared by every worker and host
    KeyManager(keys, backend=RedisBackend(url, namespace="myapp", secret=...))

:func:`backend_from_url` builds a backend from a URL; :class:`StateBackend` is the protocol a
backend object implements.  ``RedisBackend`` needs ``pip install "stable-openai[redis]"``
(redis-py is imported when one is built, never before).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from ._base import Outcome, Pick, SharedKeyState, StateBackend, StorageError
from .memory import MemoryBackend
from .redis import SCHEMES, RedisBackend

__all__ = [
    "MemoryBackend",
    "Outcome",
    "Pick",
    "RedisBackend",
    "SharedKeyState",
    "StateBackend",
    "StorageError",
    "backend_from_url",
]


def backend_from_url(url: str, **options: Any) -> StateBackend:
    """The backend a URL names: ``memory://``, or ``redis://host:port/db`` (also
    ``rediss://`` for TLS, ``unix:///path.sock``, ``valkey://``).  ``options`` go to
    :class:`RedisBackend` (``namespace``, ``secret``, ``lease_seconds``, ...)."""
    if not isinstance(url, str):
        raise TypeError(f"a backend URL must be a str, not {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        if options:
            raise TypeError(f"memory:// takes no options, got {sorted(options)}")
        return MemoryBackend()
    if scheme in SCHEMES:
        return RedisBackend(url, **options)
    raise ValueError(
        f"unknown backend URL scheme {scheme!r}: use memory:// or redis://host:6379/0 "
        "(also rediss://, unix://, valkey://)"
    )

