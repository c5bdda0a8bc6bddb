"""Many threads through @stable with injected failures: right answers, sound key states."""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

import openai
import pytest
import wire
from wire import made_up_keys

from stable_openai import KeyManager, StableOpenAIError, stable
from stable_openai._ring import KeyRing, KeyState, Where

THREADS = 64
CALLS = 200


@pytest.fixture
def checked_choose(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap the ring's marking of the key it chose, so that any cooling or disabled key
    handed out is recorded (checked before the call's own spending may cool it: a pool paced
    from its 429s cools as each call leaves)."""
    violations: list[str] = []
    original = KeyRing._mark_taken

    def mark_taken(self: KeyRing, state: KeyState, ready: bool) -> None:
        if state.where is not Where.READY or state.cool_until > self.clock():
            violations.append(f"{state!r} handed out while {state.where.value}")
        original(self, state, ready)

    monkeypatch.setattr(KeyRing, "_mark_taken", mark_taken)
    return violations


def test_64_threads_by_200_calls_over_8_keys_with_injected_failures(
    checked_choose: list[str],
) -> None:
    keys = made_up_keys(8, "stress")
    revoked = keys[7]
    KeyManager(keys)
    rng = random.Random(1234)
    rng_lock = threading.Lock()
    kinds = Counter[str]()

    @stable(backoff=0.001, max_backoff=0.01, max_wait=60)
    def ask(thread: int, index: int, api_key: str) -> str:
        if api_key == revoked:
            raise wire.revoked()
        with rng_lock:
            roll = rng.random()
        if roll < 0.05:
            # (a 429 whose headers show budget left, as a server's spurious one may: it
            # cools the key, and teaches no pace that would hold the run back)
            raise wire.rate_limited(
                "20ms", {"retry-after-ms": "20", "x-ratelimit-remaining-requests": "5000"}
            )
        if roll < 0.08:
            raise wire.server_error(500)
        if roll < 0.10:
            raise wire.connection_error()
        return f"{thread}:{index}"

    outcomes: dict[int, list[str]] = {}

    def worker(thread: int) -> None:
        results = []
        for index in range(CALLS):
            try:
                answer = ask(thread, index)
            except (openai.OpenAIError, StableOpenAIError) as exc:
                kinds[type(exc).__name__] += 1
                results.append(f"error:{type(exc).__name__}")
                continue
            assert answer == f"{thread}:{index}", answer
            results.append(answer)
        outcomes[thread] = results

    threads = [threading.Thread(target=worker, args=(t,), daemon=True) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not any(thread.is_alive() for thread in threads), "the run did not end: deadlock?"
    assert len(outcomes) == THREADS
    answers = [a for results in outcomes.values() for a in results]
    assert len(answers) == THREADS * CALLS
    assert None not in answers
    assert sum(kinds.values()) < len(answers) * 0.01, kinds  # retries absorb almost every failure
    assert checked_choose == []
    stats = {row["key"]: row for row in KeyManager().stats()}
    assert sum(row["in_flight"] for row in stats.values()) == 0
    assert [row["state"] for row in stats.values()].count("disabled") == 1
    disabled = next(row for row in stats.values() if row["state"] == "disabled")
    assert disabled["calls"] <= THREADS  # the revoked key is dropped after its first failures
    assert sum(row["successes"] for row in stats.values()) == len(answers) - sum(kinds.values())


@pytest.mark.parametrize("yields", [100, 0])
def test_a_call_that_finds_the_lock_taken_gets_its_key_once_the_holder_lets_go(
    monkeypatch: pytest.MonkeyPatch, yields: int
) -> None:
    """The hot path yields to the lock's holder a few times, then blocks (``yields`` 0: at
    once); either way it takes the lock when the holder releases it, and only then."""
    from stable_openai import _manager

    monkeypatch.setattr(_manager, "_YIELDS", yields)
    manager = KeyManager.create(made_up_keys(2, "contended"))
    got: list[Any] = []
    manager._lock.acquire()
    try:
        worker = threading.Thread(target=lambda: got.append(_manager.take_lease(manager)))
        worker.start()
        worker.join(0.2)
        assert worker.is_alive() and not got  # waiting for the lock, not past it
    finally:
        manager._lock.release()
    worker.join(10)
    assert not worker.is_alive() and got and got[0] is not None
    got[0].succeed()
    assert all(row["in_flight"] == 0 for row in manager.stats())
    manager.close()
