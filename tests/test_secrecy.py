"""No whole key in anything the library writes: logs, repr, stats, its own errors."""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import wire
from wire import made_up_keys

from stable_openai import KeyManager, stable
from stable_openai._ring import mask

FAILURES: list[Callable[[], BaseException]] = [
    wire.rate_limited, wire.too_large, wire.no_quota, wire.revoked, wire.forbidden,
    wire.server_error, wire.connection_error, wire.timeout_error, wire.bad_request,
    lambda: ValueError("user bug"),
]


def test_every_failure_path_with_debug_logging_leaks_no_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    keys = made_up_keys(len(FAILURES) + 1, "secret")
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        manager = KeyManager(keys)
        for key, failure in zip(keys, FAILURES):
            calls = 0

            @stable(attempts=2, max_wait=0.05, backoff=0.001)
            def ask(api_key: str) -> str:
                nonlocal calls
                calls += 1
                if calls == 1:
                    raise failure()  # noqa: B023 - used within the loop iteration
                return "ok"

            manager.set_ttl(key, 0)
            try:
                texts.append(ask())
            except Exception as exc:
                texts.append(f"{exc!r} {exc} {exc.__cause__!r}")
        for key in keys:  # everything disabled or cooling: the library's own errors
            manager._ring.disable(manager._ring.find(key), "revoked (401 invalid_api_key)")  # type: ignore[arg-type]
        try:
            stable(lambda api_key: api_key)()
        except Exception as exc:
            texts.append(f"{exc!r} {exc}")
        texts += [repr(manager), str(manager.stats()), repr(manager._ring.find(keys[0]))]
    texts.append(caplog.text)
    everything = "\n".join(texts)
    assert "disabled" in everything
    for key in keys:
        assert key not in everything
        assert key[6:] not in everything  # not even the key without its prefix


@pytest.mark.parametrize("key", ["", "a", "sk-1234", "sk-12345678", "sk-" + "x" * 45 + "WXYZ"])
def test_mask_never_shows_a_whole_key(key: str) -> None:
    masked = mask(key)
    assert key == "" or key not in masked
    assert len(masked) <= 8
