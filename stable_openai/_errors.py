"""The library's own exceptions.

::

    openai.OpenAIError
     └── StableOpenAIError            anything stable_openai itself decides to raise
          ├── NoKeysError              no key configured (also a ValueError)
          ├── AllKeysDisabledError     every key is disabled (revoked, deleted by the server)
          ├── AllKeysCoolingError      every key is cooling past the call's wait budget
          └── CallTimeoutError         a call ran past its ``timeout`` (also a TimeoutError)

They subclass ``openai.OpenAIError`` so that code written as ``except openai.OpenAIError``
keeps catching everything a decorated call can raise. Failures of the wrapped call itself
(``openai.BadRequestError``, a 403 on every key, ...) are re-raised unchanged, never wrapped.
No message here ever contains a key: only masked forms and counts.
"""

from __future__ import annotations

from collections.abc import Mapping

import openai


class StableOpenAIError(openai.OpenAIError):
    """Base class of the errors raised by stable_openai itself."""


class NoKeysError(StableOpenAIError, ValueError):
    """No API key is configured, or every key was deleted."""


class AllKeysDisabledError(StableOpenAIError):
    """Every key is disabled; waiting will not help.

    ``reasons`` maps each reason (e.g. ``"revoked (401 invalid_api_key)"``) to how many keys
    were disabled for it; ``recheck_in``, the seconds until the first of them is tried again
    (``None`` when none will be: see ``@stable(revoked_cooldown=...)``).
    """

    def __init__(self, reasons: Mapping[str, int], recheck_in: float | None = None) -> None:
        self.reasons = dict(reasons)
        self.recheck_in = recheck_in
        total = sum(self.reasons.values())
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        again = ""
        if recheck_in is not None:
            again = f"; the first is tried again in {duration(recheck_in)}"
        super().__init__(
            f"all {total} API key(s) are disabled ({why}){again}; "
            "pass working keys to KeyManager(...) or KeyManager().add_keys(...)"
        )


def duration(seconds: float) -> str:
    """``seconds`` as people read them: ``12.4s``, ``0.05s``, ``2m30s``, ``1h``, ``24h``."""
    if seconds != seconds or seconds == float("inf"):
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.3g}s" if seconds >= 0.001 else "0s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{value}{unit}" for value, unit in ((hours, "h"), (minutes, "m"), (secs, "s"))
             if value]
    return "".join(parts)


class AllKeysCoolingError(StableOpenAIError):
    """Every usable key is cooling for longer than the call may wait.

    ``retry_after`` is the number of seconds until the first key is ready again.
    """

    def __init__(self, retry_after: float, cooling: int, reasons: Mapping[str, int]) -> None:
        self.retry_after = max(0.0, retry_after)
        self.reasons = dict(reasons)
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(self.reasons.items()))
        super().__init__(
            f"all {cooling} usable API key(s) are cooling ({why}); the first is ready in "
            f"{duration(self.retry_after)}, beyond this call's wait budget"
        )


class CallTimeoutError(StableOpenAIError, TimeoutError):
    """A call ran past the ``timeout`` given to ``@stable``: no further try was made.

    ``timeout`` is that limit in seconds; the call's last failure, if it had one, is the
    ``__cause__``.
    """

    def __init__(self, timeout: float, last: BaseException | None = None) -> None:
        self.timeout = timeout
        after = "" if last is None else f"; its last try failed with {type(last).__name__}"
        super().__init__(
            f"the call ran past its timeout of {duration(timeout)} (@stable(timeout=...)){after}"
        )
