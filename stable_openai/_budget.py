"""Budgets: what a pool of keys may still send, from its own pacing and from the server.

Pure helpers for the ring: a debt-allowing token bucket for client-side pacing, the parse of
``x-ratelimit-*`` headers, and a token estimate of a request body.  No I/O, no clock of their
own: every method takes ``now``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._policy import parse_duration

__all__ = [
    "Bucket", "ServerBudget", "estimate_tokens", "organization_in", "read_headers", "read_request",
]

#: Tokens a chat request is assumed to ask for when it gives no max_tokens (as OpenAI does
#: for its rate limiter, a request is charged its prompt plus the completion it may get).
DEFAULT_COMPLETION_TOKENS = 16


class Bucket:
    """A token bucket refilled at ``per_minute / 60`` per second.

    It may go into debt (a request's real size is known only after it was sent): while the
    level is below what the next request needs, :meth:`ready_in` says how long to wait.
    The capacity is small (one second of budget) so that the flow is smooth: a server that
    counts in fixed windows never sees more than its limit in any window.
    """

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float, now: float) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate)
        self.level = self.capacity
        self.stamp = now

    def set_rate(self, per_minute: float) -> None:
        """Refill at ``per_minute / 60`` per second from now on (the level is kept, within
        the new capacity)."""
        rate = per_minute / 60.0
        if rate != self.rate:
            self.rate = rate
            self.capacity = max(1.0, rate)
            self.level = min(self.level, self.capacity)

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, amount: float, now: float) -> None:
        self._refill(now)
        self.level -= amount

    def ready_in(self, now: float, need: float = 1.0) -> float:
        """Seconds until ``need`` can be taken without debt (0 if now)."""
        self._refill(now)
        need = min(need, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


@dataclass(frozen=True)
class ServerBudget:
    """What one response's ``x-ratelimit-*`` headers say about its pool's budget."""

    requests_limit: int | None = None
    requests_left: int | None = None
    requests_reset: float | None = None
    tokens_limit: int | None = None
    tokens_left: int | None = None
    tokens_reset: float | None = None
    organization: str | None = None
    project: str | None = None

    @property
    def pool(self) -> str | None:
        """The pool the response names: ``organization/project``, or the organization."""
        if not self.organization:
            return None
        return f"{self.organization}/{self.project}" if self.project else self.organization


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        return None
    return number if number >= 0 else None


def read_headers(headers: Mapping[str, str]) -> ServerBudget:
    """Parse the rate-limit headers of a response; missing or malformed ones are ``None``."""

    def get(name: str) -> str | None:
        value = headers.get(name)
        return value if isinstance(value, str) else None

    def reset(name: str) -> float | None:
        value = get(name)
        return None if value is None else parse_duration(value)

    organization = (get("openai-organization") or "").strip() or None
    project = (get("openai-project") or "").strip() or None
    return ServerBudget(
        _int(get("x-ratelimit-limit-requests")), _int(get("x-ratelimit-remaining-requests")),
        reset("x-ratelimit-reset-requests"), _int(get("x-ratelimit-limit-tokens")),
        _int(get("x-ratelimit-remaining-tokens")), reset("x-ratelimit-reset-tokens"),
        organization, project,
    )


_ORGANIZATION = re.compile(r"\bin organization (org-[A-Za-z0-9_-]+)")


def organization_in(message: str) -> str | None:
    """The organization a 429 message names ("... in organization org-XXXX on ...")."""
    match = _ORGANIZATION.search(message)
    return match.group(1) if match else None


def _text_length(value: Any) -> int:
    """Characters of text in a message ``content`` or an embeddings ``input``: strings, and
    the ``text`` of content parts (images and the like are not counted)."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(item) for item in value)
    if isinstance(value, dict):
        return _text_length(value.get("text"))
    return 0


def _messages_length(messages: Any) -> int:
    if not isinstance(messages, list):
        return 0
    return sum(_text_length(m.get("content")) for m in messages if isinstance(m, dict))


def estimate_tokens(body: bytes) -> float:
    """Tokens a request will be charged by a rate limiter: about 4 characters a token for
    the prompt, plus the completion it may ask for.  0 for a body that is not JSON."""
    return read_request(body)[0]


def read_request(body: bytes) -> tuple[float, str | None]:
    """What a request's body says for pacing: its tokens (:func:`estimate_tokens`) and the
    model it asks for (``None`` when it names none)."""
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        return 0.0, None
    if not isinstance(data, dict):
        return 0.0, None
    model = data.get("model")
    return _tokens(data), model if isinstance(model, str) and model else None


def _tokens(data: dict[str, Any]) -> float:
    if "messages" in data:
        prompt = _messages_length(data.get("messages"))
        completion = data.get("max_completion_tokens") or data.get("max_tokens")
        if not isinstance(completion, int) or isinstance(completion, bool) or completion < 0:
            completion = DEFAULT_COMPLETION_TOKENS
        return float(math.ceil(prompt / 4) + completion)
    if "input" in data:
        return float(math.ceil(_text_length(data.get("input")) / 4))
    return 0.0


def usage_tokens(body: bytes) -> float | None:
    """``usage.total_tokens`` of a JSON response body, if it has one."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    total = usage.get("total_tokens") if isinstance(usage, dict) else None
    return float(total) if isinstance(total, (int, float)) and not isinstance(total, bool) else None
