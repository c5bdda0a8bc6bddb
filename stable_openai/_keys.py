"""API keys as the user gives them: plain strings, or :class:`Key` with settings.

Validation lives here: strings only, stripped, no duplicates, not empty; errors name the
position of the bad entry and never its value.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Union

__all__ = ["Key", "KeyLike", "fingerprint", "mask", "normalize_keys", "split_keys"]


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


_CLIENT_OPTIONS = frozenset({
    "timeout", "default_headers", "default_query", "websocket_base_url", "http_client",
})


@dataclass(frozen=True)
class Key:
    """An API key with the settings that go with it.  Everywhere a key is accepted, a plain
    string is the same as ``Key(string)``.

    :param key: the API key.
    :param base_url: where to send this key's requests (Azure and other OpenAI-compatible
        services); default: the ``openai`` client's own (``OPENAI_BASE_URL`` or OpenAI).
    :param organization: sent as ``OpenAI-Organization`` by the pooled client.
    :param project: sent as ``OpenAI-Project`` by the pooled client.
    :param pool: keys that share one budget (same organization and project on OpenAI) are
        one pool: a rate limit on one cools them all.  Learned from the server when not given.
    :param weight: how much of the concurrent load this key takes relative to the others.
    :param rpm: a requests-per-minute budget to pace this key's pool to, client-side.
    :param tpm: a tokens-per-minute budget to pace this key's pool to, client-side.
    :param client_options: more arguments for the pooled ``openai.OpenAI``/``AsyncOpenAI``
        (``timeout``, ``default_headers``, ``default_query``).
    """

    key: str
    base_url: str | None = None
    organization: str | None = None
    project: str | None = None
    pool: str | None = None
    weight: float = 1.0
    rpm: int | None = None
    tpm: int | None = None
    client_options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        _check_key_text(self.key, "key")
        object.__setattr__(self, "key", self.key.strip())
        for name in ("base_url", "organization", "project", "pool"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise TypeError(f"Key({name}=...) must be a non-empty string or None")
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise TypeError("Key(weight=...) must be a number")
        if not (math.isfinite(weight) and 0.01 <= weight <= 1000):
            raise ValueError("Key(weight=...) must be between 0.01 and 1000")
        for name in ("rpm", "tpm"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Key({name}=...) must be an int or None")
            if not 1 <= value <= 10**12:
                raise ValueError(f"Key({name}=...) must be between 1 and 10**12")
        if not isinstance(self.client_options, Mapping):
            raise TypeError("Key(client_options=...) must be a mapping")
        unknown = sorted(set(self.client_options) - _CLIENT_OPTIONS)
        if unknown:
            raise ValueError(
                f"Key(client_options=...) has unknown option(s) {unknown}; "
                f"allowed: {sorted(_CLIENT_OPTIONS)}"
            )
        object.__setattr__(self, "client_options", MappingProxyType(dict(self.client_options)))

    def __repr__(self) -> str:
        settings = "".join(
            f", {name}={getattr(self, name)!r}"
            for name in ("base_url", "organization", "project", "pool", "rpm", "tpm")
            if getattr(self, name) is not None
        )
        if self.weight != 1.0:
            settings += f", weight={self.weight!r}"
        return f"Key({mask(self.key)!r}{settings})"


KeyLike = Union[str, Key]


def _check_key_text(key: object, where: str) -> None:
    if not isinstance(key, str):
        raise TypeError(f"{where} is {type(key).__name__}; keys must be str or Key")
    text = key.strip()
    if not text:
        raise ValueError(f"{where} is empty")
    if any(char.isspace() for char in text):
        raise ValueError(f"{where} contains whitespace inside the key")
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"{where} contains a character that cannot go in an HTTP header")


def normalize_keys(api_keys: object, name: str = "api_keys") -> list[Key]:
    """Validate a list of keys (``str`` or :class:`Key`): stripped, without duplicates (the
    first wins), not empty.  Errors name the position of the bad entry, never its value."""
    if isinstance(api_keys, (str, bytes)):
        raise TypeError(f"{name} must be a list of keys, not a single string: use [key]")
    if isinstance(api_keys, (dict, Key)) or not isinstance(api_keys, Iterable):
        raise TypeError(f"{name} must be a list of keys, not {type(api_keys).__name__}")
    keys: list[Key] = []
    seen: set[str] = set()
    for position, raw in enumerate(api_keys):
        if isinstance(raw, Key):
            key = raw
        else:
            _check_key_text(raw, f"{name}[{position}]")
            key = Key(str(raw).strip())
        if key.key not in seen:
            seen.add(key.key)
            keys.append(key)
    if not keys:
        raise ValueError(f"{name} is empty: give at least one API key")
    return keys


_QUOTES = "\"'"


def split_keys(raw: str, name: str = "OPENAI_API_KEYS") -> list[str]:
    """The keys of an environment variable as people write them: separated by commas,
    semicolons or white space, or a JSON list; the whole value or each key in quotes (a
    docker ``--env-file`` keeps them).  A malformed JSON list is an error that shows no key."""
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        text = text[1:-1].strip()
    parts: list[object]
    if text.startswith("["):
        try:
            parsed = json.loads(text)
        except ValueError:
            raise ValueError(f"{name} starts with '[' but is not a JSON list of strings") from None
        if not isinstance(parsed, list):
            raise ValueError(f"{name} must be a JSON list of strings")
        parts = parsed
    else:
        parts = list(re.split(r"[\s,;]+", text))
    keys = []
    for part in parts:
        if not isinstance(part, str):
            raise ValueError(f"{name}: every key of its JSON list must be a string")
        key = part.strip().strip(_QUOTES).strip()
        if any(mark in key for mark in "[]{}\"'"):
            raise ValueError(
                f"{name}: a key has brackets or quotes in it; write the keys separated by "
                "commas, or as a JSON list of strings"
            )
        if key:
            keys.append(key)
    return keys
