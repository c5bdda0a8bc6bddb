"""Hardening: chaos, cancellation and interruption, bad input, secrecy, process lifecycle.

Everything runs against the local simulator with the real ``openai`` client, on loopback,
with made-up keys.  Runs are bounded (join and subprocess timeouts); no assertion is about
speed, only about outcomes and about every run ending.  Figures are printed: ``pytest -s``
shows them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import wire
from clients import AsyncClients
from wire import made_up_keys

from stable_openai import (
    AllKeysCoolingError,
    AllKeysDisabledError,
    Key,
    KeyManager,
    NoKeysError,
    StableOpenAIError,
    stable,
)
from stable_openai._budget import ServerBudget, read_headers
from stable_openai._demo import demo_config
from stable_openai._policy import MAX_HINT_SECONDS, Verdict, classify
from stable_openai.simulator import (
    Faults,
    ProjectLimits,
    SimKey,
    Simulator,
    SimulatorConfig,
    echo_answer,
)

try:  # openai >= 3 ships on httpx2; older releases on httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover - depends on the installed openai
    import httpx  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt-4o-mini"
UNREACHABLE = "http://127.0.0.1:9/v1"
StartSimulator = Callable[[SimulatorConfig], Simulator]


# --------------------------------------------------------------------------- helpers


class Clients:
    """One ``openai.OpenAI`` per key, shared by threads, closed at teardown."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self._clients: dict[str, openai.OpenAI] = {}
        self._lock = threading.Lock()

    def get(self, api_key: str) -> openai.OpenAI:
        with self._lock:
            client = self._clients.get(api_key)
            if client is None:
                client = openai.OpenAI(api_key=api_key, base_url=self.base_url, max_retries=0)
                self._clients[api_key] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def in_flight(manager: KeyManager) -> int:
    return sum(row["in_flight"] for row in manager.stats())


def assert_released(manager: KeyManager) -> None:
    """No call holds a key: per key, per pool, and nobody is queued for one."""
    assert in_flight(manager) == 0, manager.stats()
    pools = {pool.name: pool.in_flight for pool in manager._ring.pools()}
    assert all(count == 0 for count in pools.values()), pools
    assert len(manager._turns) == 0


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


async def async_wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def sim_in_flight(sim: Simulator) -> int:
    return int(sim.stats()["totals"]["in_flight"])


def child_env(**extra: str) -> dict[str, str]:
    """A child's environment: none of our OPENAI_* and a base URL that goes nowhere."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")}
    env["OPENAI_BASE_URL"] = UNREACHABLE
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


# =========================================================================== chaos

CHAOS_FAULTS = Faults(
    rate_limit=0.05, error_500=0.05, error_503=0.05, slow=0.02, slow_seconds=0.2, drop=0.03
)
CHAOS_THREADS = 100
CHAOS_CALLS_PER_THREAD = 6
CHAOS_COROUTINES = 200
CHAOS_CALLS_PER_COROUTINE = 3


def test_chaos_threads_and_coroutines_get_right_answers_or_documented_errors(
    start_simulator: StartSimulator,
) -> None:
    names = ["a1", "a2", "b", "c", "d", "revoked"]
    k = dict(zip(names, made_up_keys(len(names), "chaos")))
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["a1"], project="a", organization="org-a"),
                SimKey(k["a2"], project="a", organization="org-a"),
                SimKey(k["b"], project="b", organization="org-b"),
                SimKey(k["c"], project="c", organization="org-c"),
                SimKey(k["d"], project="d", organization="org-d"),
                SimKey(k["revoked"], project="e", organization="org-e"),
            ),
            projects={name: ProjectLimits(rpm=40) for name in "abcde"},
            window=1.0,
            latency=0.005,
            faults=CHAOS_FAULTS,
            seed=20261125,
        )
    )
    manager = KeyManager(list(k.values()))
    clients = Clients(sim.base_url)
    results: list[tuple[str, object]] = []
    lock = threading.Lock()

    @stable(backoff=0.01, max_backoff=0.1, max_wait=30)
    def ask(prompt: str, api_key: str) -> str | None:
        response = clients.get(api_key).chat.completions.create(
            model=MODEL, messages=messages(prompt)
        )
        return response.choices[0].message.content

    def record(prompt: str, outcome: object) -> None:
        with lock:
            results.append((prompt, outcome))

    def worker(thread: int) -> None:
        for index in range(CHAOS_CALLS_PER_THREAD):
            prompt = f"thread {thread} call {index}"
            try:
                outcome: object = ask(prompt)
            except Exception as exc:
                outcome = exc
            record(prompt, outcome)

    def coroutines() -> None:
        pool = AsyncClients(sim.base_url)

        @stable(backoff=0.01, max_backoff=0.1, max_wait=30)
        async def ask_async(prompt: str, api_key: str) -> str | None:
            response = await pool.get(api_key).chat.completions.create(
                model=MODEL, messages=messages(prompt)
            )
            return response.choices[0].message.content

        async def one(number: int) -> None:
            for index in range(CHAOS_CALLS_PER_COROUTINE):
                prompt = f"coroutine {number} call {index}"
                try:
                    outcome: object = await ask_async(prompt)
                except Exception as exc:
                    outcome = exc
                record(prompt, outcome)

        async def main() -> None:
            try:
                await asyncio.wait_for(
                    asyncio.gather(*(one(n) for n in range(CHAOS_COROUTINES))), timeout=120
                )
            finally:
                await pool.aclose()

        asyncio.run(main())

    total = CHAOS_THREADS * CHAOS_CALLS_PER_THREAD + CHAOS_COROUTINES * CHAOS_CALLS_PER_COROUTINE
    start = time.monotonic()
    threads = [
        threading.Thread(target=worker, args=(t,), daemon=True) for t in range(CHAOS_THREADS)
    ]
    threads.append(threading.Thread(target=coroutines, daemon=True, name="chaos-asyncio"))
    try:
        for thread in threads:
            thread.start()
        wait_until(lambda: len(results) >= total // 4, timeout=60)
        sim.set_key_status(k["revoked"], "revoked")  # a key dies mid-run
        deadline = time.monotonic() + 150  # one bound for the whole run, not per thread
        for thread in threads:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
    finally:
        alive = [thread.name for thread in threads if thread.is_alive()]
        if not alive:
            clients.close()
    elapsed = time.monotonic() - start
    assert not alive, f"the run did not end: {len(alive)} threads still running"

    successes = 0
    failures: Counter[str] = Counter()
    for prompt, outcome in results:
        if isinstance(outcome, BaseException):
            assert isinstance(outcome, openai.OpenAIError), (prompt, repr(outcome))
            failures[type(outcome).__name__] += 1
        else:
            assert outcome == echo_answer(prompt), (prompt, outcome)  # never None, never another's
            successes += 1
    assert len(results) == total
    assert len({prompt for prompt, _ in results}) == total

    server = sim.stats()["totals"]
    rows = manager.stats()
    print(
        f"\nchaos: {total} calls ({CHAOS_THREADS} threads x {CHAOS_CALLS_PER_THREAD}, "
        f"{CHAOS_COROUTINES} coroutines x {CHAOS_CALLS_PER_COROUTINE}), {successes} right "
        f"answers, failures {dict(failures) or 'none'}, {elapsed:.1f}s; server: "
        f"{server['requests']} requests, {server['ok']} ok, {server['rate_limited']} rate-limited, "
        f"{server['faults']} faults, {server['unauthorized']} unauthorized, "
        f"max {server['max_in_flight']} in flight"
    )
    assert server["ok"] == successes == sum(row["successes"] for row in rows)
    assert server["in_flight"] == 0
    assert_released(manager)
    revoked = next(row for row in rows if row["key"] == f"{k['revoked'][:3]}…{k['revoked'][-4:]}")
    assert sim.key_stats(k["revoked"])["unauthorized"] >= 1
    assert revoked["state"] == "disabled"
    # Once disabled the key is not tried again: only calls already under way saw the 401.
    assert sim.key_stats(k["revoked"])["unauthorized"] <= CHAOS_THREADS + CHAOS_COROUTINES


# =========================================================================== cancellation


def slow_setup(
    start_simulator: StartSimulator, tag: str, latency: float = 3.0
) -> tuple[Simulator, list[str], KeyManager]:
    keys = made_up_keys(2, tag)
    sim = start_simulator(
        SimulatorConfig(
            keys=(SimKey(keys[0], project="a"), SimKey(keys[1], project="b")), latency=latency
        )
    )
    return sim, keys, KeyManager(keys)


def test_cancelled_async_call_in_flight_releases_its_key(
    start_simulator: StartSimulator,
) -> None:
    sim, _, manager = slow_setup(start_simulator, "cancel")
    pool = AsyncClients(sim.base_url)

    @stable
    async def ask(prompt: str, api_key: str) -> str | None:
        response = await pool.get(api_key).chat.completions.create(
            model=MODEL, messages=messages(prompt)
        )
        return response.choices[0].message.content

    async def main() -> None:
        try:
            task = asyncio.ensure_future(ask("slow"))
            await async_wait_until(lambda: sim_in_flight(sim) == 1)
            assert in_flight(manager) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert_released(manager)
        finally:
            await pool.aclose()

    asyncio.run(main())
    assert_released(manager)


def test_wait_for_timeout_releases_its_key(start_simulator: StartSimulator) -> None:
    sim, _, manager = slow_setup(start_simulator, "waitfor")
    pool = AsyncClients(sim.base_url)

    @stable
    async def ask(prompt: str, api_key: str) -> str | None:
        response = await pool.get(api_key).chat.completions.create(
            model=MODEL, messages=messages(prompt)
        )
        return response.choices[0].message.content

    async def main() -> None:
        try:
            # wait_for's timeout fires once the request is at the server (not after a fixed
            # time, which a loaded machine or a slow first import may not meet).
            task = asyncio.ensure_future(ask("slow"))
            await async_wait_until(lambda: sim_in_flight(sim) == 1)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(task, timeout=0.05)
            assert task.cancelled()
            assert_released(manager)
        finally:
            await pool.aclose()

    asyncio.run(main())
    assert sim.stats()["totals"]["requests"] == 1
    assert_released(manager)


def test_cancelled_while_queued_for_a_key_leaves_the_queue() -> None:
    (key,) = made_up_keys(1, "queued")
    manager = KeyManager([key])
    manager.set_ttl(key, 60)

    @stable
    async def ask(api_key: str) -> str:
        return api_key[-4:]

    async def main() -> None:
        task = asyncio.ensure_future(ask())
        await async_wait_until(lambda: len(manager._turns) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert_released(manager)
        manager.set_ttl(key, 0)
        # Nobody left in the queue ahead of the next caller: it is served at once.
        assert await asyncio.wait_for(ask(), timeout=5) == key[-4:]

    asyncio.run(main())
    assert_released(manager)


def test_keyboard_interrupt_while_a_thread_waits_for_a_key_hands_the_turn_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    (key,) = made_up_keys(1, "kbdwait")
    manager = KeyManager([key])
    manager.set_ttl(key, 0.3)
    original_wait = threading.Condition.wait
    victim: dict[str, int] = {}
    outcomes: dict[str, object] = {}

    def wait(self: threading.Condition, timeout: float | None = None) -> bool:
        if self._lock is manager._lock and threading.get_ident() == victim.get("id"):  # type: ignore[attr-defined]
            # Hold the head of the queue until another caller queues behind, then Ctrl-C.
            deadline = time.monotonic() + 10
            while len(manager._turns) < 2 and time.monotonic() < deadline:
                original_wait(self, 0.01)
            raise KeyboardInterrupt
        return original_wait(self, timeout)

    monkeypatch.setattr(threading.Condition, "wait", wait)

    @stable(max_wait=30)
    def ask(api_key: str) -> str:
        return api_key[-4:]

    def run_victim() -> None:
        victim["id"] = threading.get_ident()
        try:
            outcomes["victim"] = ask()
        except KeyboardInterrupt:
            outcomes["victim"] = "interrupted"

    def run_other() -> None:
        try:
            outcomes["other"] = ask()
        except BaseException as exc:  # pragma: no cover - reported by the assertion below
            outcomes["other"] = exc

    first = threading.Thread(target=run_victim, daemon=True)
    first.start()
    wait_until(lambda: len(manager._turns) == 1)
    second = threading.Thread(target=run_other, daemon=True)
    second.start()
    first.join(timeout=20)
    second.join(timeout=20)
    assert not first.is_alive() and not second.is_alive()
    assert outcomes == {"victim": "interrupted", "other": key[-4:]}
    assert_released(manager)


def test_keyboard_interrupt_raised_by_the_function_releases_its_key() -> None:
    keys = made_up_keys(2, "kbdfunc")
    manager = KeyManager(keys)

    @stable
    def sync_call(api_key: str) -> str:
        raise KeyboardInterrupt

    @stable
    async def async_call(api_key: str) -> str:
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    @stable
    def sync_stream(first: bool, api_key: str) -> Iterator[str]:
        if first:
            raise KeyboardInterrupt
        yield "one"
        raise KeyboardInterrupt

    @stable
    async def async_stream(first: bool, api_key: str) -> AsyncIterator[str]:
        if first:
            raise KeyboardInterrupt
        yield "one"
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sync_call()
    assert_released(manager)
    for first in (True, False):
        with pytest.raises(KeyboardInterrupt):
            list(sync_stream(first))
        assert_released(manager)

    async def main() -> list[str]:
        caught = []
        try:
            await async_call()
        except KeyboardInterrupt:
            caught.append("call")
        for first in (True, False):
            stream = async_stream(first)
            try:
                async for _ in stream:
                    pass
            except KeyboardInterrupt:
                caught.append(f"stream first={first}")
            finally:
                await stream.aclose()
        return caught

    assert asyncio.run(main()) == ["call", "stream first=True", "stream first=False"]
    assert_released(manager)
    assert all(row["state"] == "ready" for row in manager.stats())


def test_keyboard_interrupt_during_a_backoff_sleep_releases_everything(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys = made_up_keys(2, "kbdsleep")
    manager = KeyManager(keys)

    @stable(backoff=5.0)
    def ask(api_key: str) -> str:
        raise wire.server_error(500)

    def interrupted_sleep(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupted_sleep)
    with pytest.raises(KeyboardInterrupt):
        ask()
    monkeypatch.undo()
    assert_released(manager)


def test_a_stream_called_with_wrong_arguments_releases_its_key() -> None:
    manager = KeyManager(made_up_keys(2, "badargs"))

    @stable
    def sync_stream(prompt: str, api_key: str) -> Iterator[str]:
        yield prompt

    @stable
    async def async_stream(prompt: str, api_key: str) -> AsyncIterator[str]:
        yield prompt

    with pytest.raises(TypeError, match="prompt"):
        list(sync_stream())  # a caller's mistake: raised unchanged...
    assert_released(manager)  # ...and no key stays marked in flight

    async def main() -> None:
        with pytest.raises(TypeError, match="prompt"):
            async for _ in async_stream():
                pass

    asyncio.run(main())
    assert_released(manager)


def stream_setup(start_simulator: StartSimulator, tag: str) -> tuple[Simulator, KeyManager]:
    keys = made_up_keys(2, tag)
    sim = start_simulator(
        SimulatorConfig(keys=(SimKey(keys[0], project="a"), SimKey(keys[1], project="b")))
    )
    return sim, KeyManager(keys)


PROMPT = "a long enough prompt to be streamed in several chunks"


def test_exception_in_a_sync_stream_consumer_releases_the_key(
    start_simulator: StartSimulator,
) -> None:
    sim, manager = stream_setup(start_simulator, "consumer")
    clients = Clients(sim.base_url)

    @stable
    def stream(prompt: str, api_key: str) -> Iterator[str]:
        with clients.get(api_key).chat.completions.create(
            model=MODEL, messages=messages(prompt), stream=True
        ) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    def consume() -> None:
        for _ in stream(PROMPT):
            assert in_flight(manager) == 1
            raise RuntimeError("consumer bug")

    try:
        with pytest.raises(RuntimeError, match="consumer bug"):
            consume()
        assert_released(manager)
        assert "".join(stream(PROMPT)) == echo_answer(PROMPT)  # the keys still work
    finally:
        clients.close()
    assert_released(manager)
    wait_until(lambda: sim_in_flight(sim) == 0)


@pytest.mark.parametrize("close", ["explicit aclose", "left to the event loop"])
def test_exception_in_an_async_stream_consumer_releases_the_key(
    start_simulator: StartSimulator, close: str
) -> None:
    sim, manager = stream_setup(start_simulator, "aconsumer")
    pool = AsyncClients(sim.base_url)

    @stable
    async def stream(prompt: str, api_key: str) -> AsyncIterator[str]:
        chunks = await pool.get(api_key).chat.completions.create(
            model=MODEL, messages=messages(prompt), stream=True
        )
        async with chunks:
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    async def consume() -> None:
        pieces = stream(PROMPT)
        try:
            async for _ in pieces:
                assert in_flight(manager) == 1
                raise RuntimeError("consumer bug")
        finally:
            if close == "explicit aclose":
                await pieces.aclose()

    async def main() -> None:
        try:
            with pytest.raises(RuntimeError, match="consumer bug"):
                await consume()
            if close == "explicit aclose":
                assert_released(manager)
            assert "".join([p async for p in stream(PROMPT)]) == echo_answer(PROMPT)
        finally:
            await pool.aclose()

    asyncio.run(main())
    assert_released(manager)
    wait_until(lambda: sim_in_flight(sim) == 0)


@pytest.mark.parametrize("how", ["delete_key", "KeyManager(other keys)"])
def test_a_call_ending_after_its_key_left_keeps_the_pool_count_right(how: str) -> None:
    a, b = made_up_keys(2, "leaving")
    manager = KeyManager([Key(a, pool="shared"), Key(b, pool="shared")])
    started, finish = threading.Event(), threading.Event()

    @stable
    def hold(api_key: str) -> str:
        started.set()
        finish.wait(10)
        return api_key

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert started.wait(10)
    held = next(row for row in manager.stats() if row["in_flight"])
    held_key = a if held["key"] == f"{a[:3]}…{a[-4:]}" else b
    other = b if held_key == a else a
    if how == "delete_key":
        manager.delete_key(held_key)
    else:
        KeyManager([Key(other, pool="shared")])
    finish.set()
    holder.join(10)
    assert not holder.is_alive()
    pools = {pool.name: pool.in_flight for pool in manager._ring.pools()}
    assert pools == {"shared": 0}  # the call that ended belonged to a key no longer there
    assert_released(manager)


# =========================================================================== bad input

SECRET = "sk-hardening-SECRET-0123456789abcdefWXYZ"
OTHER = "sk-hardening-OTHER0-0123456789abcdefWXYZ"


def _manager(*keys: str) -> KeyManager:
    return KeyManager(list(keys) or [SECRET, OTHER])


def _decorate(**options: Any) -> Any:
    return stable(**options)(lambda api_key: api_key)


@dataclasses.dataclass(frozen=True)
class Bad:
    """One wrong input: the call, the error it must raise (``None``: it is accepted), and
    a pattern the message must contain."""

    name: str
    call: Callable[[], object]
    error: type[BaseException] | None
    match: str = ""


NAN, INF = math.nan, math.inf

BAD_API: list[Bad] = [
    # KeyManager(...)
    Bad("KeyManager(str)", lambda: KeyManager(SECRET), TypeError, "single string"),
    Bad("KeyManager(bytes)", lambda: KeyManager(SECRET.encode()), TypeError, "single string"),
    Bad("KeyManager(dict)", lambda: KeyManager({SECRET: 1}), TypeError, "dict"),
    Bad("KeyManager(int)", lambda: KeyManager(123), TypeError, "int"),
    Bad("KeyManager(Key)", lambda: KeyManager(Key(SECRET)), TypeError, "Key"),
    Bad("KeyManager([None])", lambda: KeyManager([SECRET, None]), TypeError, r"api_keys\[1\]"),
    Bad("KeyManager([ints])", lambda: KeyManager([1, 2]), TypeError, r"api_keys\[0\]"),
    Bad("KeyManager([bytes])", lambda: KeyManager([SECRET.encode()]), TypeError, "bytes"),
    Bad("KeyManager([])", lambda: KeyManager([]), ValueError, "empty"),
    Bad("KeyManager([''])", lambda: KeyManager([""]), ValueError, "empty"),
    Bad("KeyManager(['   '])", lambda: KeyManager(["   "]), ValueError, "empty"),
    Bad("KeyManager(inner space)", lambda: KeyManager([SECRET[:10] + " " + SECRET[10:]]),
        ValueError, "whitespace"),
    Bad("KeyManager(inner newline)", lambda: KeyManager([SECRET[:10] + "\n" + SECRET[10:]]),
        ValueError, "whitespace"),
    Bad("KeyManager(non-ASCII key)", lambda: KeyManager([SECRET[:10] + "é" + SECRET[10:]]),
        ValueError, r"api_keys\[0\]"),
    Bad("KeyManager(NUL in key)", lambda: KeyManager([SECRET[:10] + "\x00" + SECRET[10:]]),
        ValueError, r"api_keys\[0\]"),
    Bad("KeyManager(10,000-char key)", lambda: KeyManager(["sk-" + "x" * 9997]), None),
    Bad("KeyManager(10,000 keys)",
        lambda: KeyManager([f"sk-many-{i:06d}-{'x' * 20}" for i in range(10_000)]), None),
    Bad("KeyManager(unknown option)", lambda: KeyManager([SECRET], colour=1), TypeError,
        "colour"),
    Bad("KeyManager(clock=5)", lambda: KeyManager([SECRET], clock=5), TypeError, "clock"),
    # its methods
    Bad("set_ttl(123, 1)", lambda: _manager().set_ttl(123, 1), TypeError, "key"),
    Bad("set_ttl(None, 1)", lambda: _manager().set_ttl(None, 1), TypeError, "key"),
    Bad("set_ttl(key, 'x')", lambda: _manager().set_ttl(SECRET, "x"), TypeError, "ttl"),
    Bad("set_ttl(key, nan)", lambda: _manager().set_ttl(SECRET, NAN), (TypeError, ValueError),
        "ttl"),
    Bad("set_ttl(key, True)", lambda: _manager().set_ttl(SECRET, True), TypeError, "ttl"),
    Bad("set_ttl(key, None)", lambda: _manager().set_ttl(SECRET, None), TypeError, "ttl"),
    Bad("set_ttl(key, inf)", lambda: _manager().set_ttl(SECRET, INF), None),
    Bad("set_ttl(key, -1)", lambda: _manager().set_ttl(SECRET, -1), None),
    Bad("set_ttl(unknown key, 1)", lambda: _manager().set_ttl("sk-unknown-0000000000", 1), None),
    Bad("delete_key(None)", lambda: _manager().delete_key(None), TypeError, "key"),
    Bad("delete_key(123)", lambda: _manager().delete_key(123), TypeError, "key"),
    Bad("delete_key(bytes)", lambda: _manager().delete_key(SECRET.encode()), TypeError, "key"),
    Bad("add_keys('sk')", lambda: _manager().add_keys("sk"), TypeError, "single string"),
    Bad("add_keys(key str)", lambda: _manager().add_keys(SECRET), TypeError, "single string"),
    Bad("add_keys([])", lambda: _manager().add_keys([]), ValueError, "empty"),
    Bad("add_keys(None)", lambda: _manager().add_keys(None), TypeError, "NoneType"),
    Bad("add_keys([None])", lambda: _manager().add_keys([None]), TypeError, r"\[0\]"),
    Bad("add_keys([''])", lambda: _manager().add_keys([""]), ValueError, "empty"),
    Bad("add_keys({key})", lambda: _manager().add_keys({SECRET: 1}), TypeError, "dict"),
    # stable(...)
    Bad("stable(attempts='3')", lambda: stable(attempts="3"), TypeError, "attempts"),
    Bad("stable(attempts=1.5)", lambda: stable(attempts=1.5), TypeError, "attempts"),
    Bad("stable(attempts=True)", lambda: stable(attempts=True), TypeError, "attempts"),
    Bad("stable(attempts=0)", lambda: stable(attempts=0), ValueError, "attempts"),
    Bad("stable(attempts=-1)", lambda: stable(attempts=-1), ValueError, "attempts"),
    Bad("stable(attempts=nan)", lambda: stable(attempts=NAN), TypeError, "attempts"),
    Bad("stable(attempts=inf)", lambda: stable(attempts=INF), TypeError, "attempts"),
    Bad("stable(attempts=None)", lambda: stable(attempts=None), TypeError, "attempts"),
    Bad("stable(attempts=10**9)", lambda: _decorate(attempts=10**9), None),
    *[
        bad
        for option in (
            "max_wait", "cooldown", "quota_cooldown", "forbidden_cooldown", "backoff",
            "max_backoff",
        )
        for bad in (
            Bad(f"stable({option}='1')", lambda o=option: stable(**{o: "1"}), TypeError, option),
            Bad(f"stable({option}=None)", lambda o=option: stable(**{o: None}), TypeError,
                option),
            Bad(f"stable({option}=True)", lambda o=option: stable(**{o: True}), TypeError,
                option),
            Bad(f"stable({option}=-1)", lambda o=option: stable(**{o: -1}), ValueError, option),
            Bad(f"stable({option}=-inf)", lambda o=option: stable(**{o: -INF}), ValueError,
                option),
            Bad(f"stable({option}=nan)", lambda o=option: stable(**{o: NAN}), ValueError, option),
            Bad(f"stable({option}=inf)", lambda o=option: _decorate(**{o: INF}), None),
            Bad(f"stable({option}=0)", lambda o=option: _decorate(**{o: 0}), None),
        )
    ],
    Bad("stable(manager='x')", lambda: stable(manager="x"), TypeError, "manager"),
    Bad("stable(unknown option)", lambda: stable(retries=3), TypeError, "retries"),
    Bad("stable(123)", lambda: stable(123), TypeError, "int"),
    Bad("stable('func')", lambda: stable("func"), TypeError, "str"),
    Bad("stable(positional option)", lambda: stable(None, 3), TypeError, ""),
    Bad("@stable without api_key", lambda: stable(lambda prompt: prompt), TypeError, "api_key"),
    Bad("@stable positional-only api_key",
        lambda: stable(eval("lambda api_key, /: api_key")), TypeError, "api_key"),
    Bad("caller passes api_key", lambda: _decorate()(api_key=SECRET), TypeError, "api_key"),
    # Key(...)
    Bad("Key(123)", lambda: Key(123), TypeError, "key"),
    Bad("Key(None)", lambda: Key(None), TypeError, "key"),
    Bad("Key('')", lambda: Key(""), ValueError, "empty"),
    Bad("Key('  ')", lambda: Key("  "), ValueError, "empty"),
    Bad("Key(inner space)", lambda: Key(SECRET[:10] + " " + SECRET[10:]), ValueError,
        "whitespace"),
    Bad("Key(non-ASCII)", lambda: Key(SECRET[:10] + "é" + SECRET[10:]), ValueError, "key"),
    Bad("Key(control char)", lambda: Key(SECRET[:10] + "\x7f" + SECRET[10:]), ValueError, "key"),
    Bad("Key(unknown field)", lambda: Key(SECRET, colour="red"), TypeError, "colour"),
    *[
        Bad(f"Key({field}={value!r})", lambda f=field, v=value: Key(SECRET, **{f: v}),
            TypeError, field)
        for field in ("base_url", "organization", "project", "pool")
        for value in (123, "", "   ", b"x")
    ],
    Bad("Key(weight='1')", lambda: Key(SECRET, weight="1"), TypeError, "weight"),
    Bad("Key(weight=True)", lambda: Key(SECRET, weight=True), TypeError, "weight"),
    Bad("Key(weight=None)", lambda: Key(SECRET, weight=None), TypeError, "weight"),
    Bad("Key(weight=0)", lambda: Key(SECRET, weight=0), ValueError, "weight"),
    Bad("Key(weight=-1)", lambda: Key(SECRET, weight=-1), ValueError, "weight"),
    Bad("Key(weight=nan)", lambda: Key(SECRET, weight=NAN), ValueError, "weight"),
    Bad("Key(weight=inf)", lambda: Key(SECRET, weight=INF), ValueError, "weight"),
    Bad("Key(weight=1001)", lambda: Key(SECRET, weight=1001), ValueError, "weight"),
    *[
        bad
        for field in ("rpm", "tpm")
        for bad in (
            Bad(f"Key({field}='60')", lambda f=field: Key(SECRET, **{f: "60"}), TypeError, field),
            Bad(f"Key({field}=1.5)", lambda f=field: Key(SECRET, **{f: 1.5}), TypeError, field),
            Bad(f"Key({field}=True)", lambda f=field: Key(SECRET, **{f: True}), TypeError, field),
            Bad(f"Key({field}=nan)", lambda f=field: Key(SECRET, **{f: NAN}), TypeError, field),
            Bad(f"Key({field}=0)", lambda f=field: Key(SECRET, **{f: 0}), ValueError, field),
            Bad(f"Key({field}=-1)", lambda f=field: Key(SECRET, **{f: -1}), ValueError, field),
            Bad(f"Key({field}=10**13)", lambda f=field: Key(SECRET, **{f: 10**13}), ValueError,
                field),
        )
    ],
    Bad("Key(client_options=list)", lambda: Key(SECRET, client_options=["timeout"]), TypeError,
        "client_options"),
    Bad("Key(client_options=None)", lambda: Key(SECRET, client_options=None), TypeError,
        "client_options"),
    Bad("Key(client_options max_retries)",
        lambda: Key(SECRET, client_options={"max_retries": 3}), ValueError, "max_retries"),
    Bad("Key(client_options api_key)", lambda: Key(SECRET, client_options={"api_key": OTHER}),
        ValueError, "api_key"),
    Bad("Key(every setting)",
        lambda: Key(SECRET, base_url="http://127.0.0.1:9/v1", organization="org-x",
                    project="proj-x", pool="p", weight=2.5, rpm=60, tpm=10**6,
                    client_options={"timeout": 5.0}),
        None),
    # the simulator's configuration
    Bad("from_dict(list)", lambda: SimulatorConfig.from_dict([]), TypeError, "config"),
    Bad("from_dict(unknown field)", lambda: SimulatorConfig.from_dict({"colour": 1}),
        ValueError, "colour"),
    Bad("from_dict(keys=str)", lambda: SimulatorConfig.from_dict({"keys": SECRET}), TypeError,
        "keys"),
    Bad("from_dict(keys=[123])", lambda: SimulatorConfig.from_dict({"keys": [123]}), TypeError,
        r"keys\[0\]"),
    Bad("from_dict(bad status)",
        lambda: SimulatorConfig.from_dict({"keys": [{"key": SECRET, "status": "bad"}]}),
        ValueError, r"keys\[0\]\.status"),
    Bad("from_dict(status=1)",
        lambda: SimulatorConfig.from_dict({"keys": [{"key": SECRET, "status": 1}]}),
        TypeError, r"keys\[0\]\.status"),
    Bad("from_dict(unknown key field)",
        lambda: SimulatorConfig.from_dict({"keys": [{"key": SECRET, "colour": "x"}]}),
        ValueError, "colour"),
    Bad("from_dict(key missing)",
        lambda: SimulatorConfig.from_dict({"keys": [{"project": "p"}]}), ValueError,
        r"keys\[0\]\.key"),
    Bad("from_dict(empty key)", lambda: SimulatorConfig.from_dict({"keys": [""]}), ValueError,
        r"keys\[0\]"),
    Bad("from_dict(key with space)",
        lambda: SimulatorConfig.from_dict({"keys": [SECRET[:10] + " " + SECRET[10:]]}),
        ValueError, r"keys\[0\]"),
    Bad("from_dict(duplicate key)",
        lambda: SimulatorConfig.from_dict({"keys": [SECRET, SECRET]}), ValueError, "duplicate"),
    Bad("from_dict(window=-1)", lambda: SimulatorConfig.from_dict({"window": -1}), ValueError,
        "window"),
    Bad("from_dict(window=0)", lambda: SimulatorConfig.from_dict({"window": 0}), ValueError,
        "window"),
    Bad("from_dict(window='1')", lambda: SimulatorConfig.from_dict({"window": "1"}), TypeError,
        "window"),
    Bad("from_dict(window=nan)", lambda: SimulatorConfig.from_dict({"window": NAN}), ValueError,
        "window"),
    Bad("from_dict(window=inf)", lambda: SimulatorConfig.from_dict({"window": INF}), ValueError,
        "window"),
    Bad("from_dict(latency=-1)", lambda: SimulatorConfig.from_dict({"latency": -1}), ValueError,
        "latency"),
    Bad("from_dict(projects=list)", lambda: SimulatorConfig.from_dict({"projects": []}),
        TypeError, "projects"),
    Bad("from_dict(project=5)", lambda: SimulatorConfig.from_dict({"projects": {"p": 5}}),
        TypeError, "projects"),
    Bad("from_dict(rpm=0)", lambda: SimulatorConfig.from_dict({"projects": {"p": {"rpm": 0}}}),
        ValueError, "rpm"),
    Bad("from_dict(rpm='x')",
        lambda: SimulatorConfig.from_dict({"projects": {"p": {"rpm": "x"}}}), TypeError, "rpm"),
    Bad("from_dict(tpm=1.5)",
        lambda: SimulatorConfig.from_dict({"projects": {"p": {"tpm": 1.5}}}), TypeError, "tpm"),
    Bad("from_dict(unknown limit)",
        lambda: SimulatorConfig.from_dict({"projects": {"p": {"burst": 1}}}), ValueError,
        "burst"),
    Bad("from_dict(empty project name)",
        lambda: SimulatorConfig.from_dict({"projects": {"": {"rpm": 1}}}), ValueError,
        "projects"),
    Bad("from_dict(faults error_500=2)",
        lambda: SimulatorConfig.from_dict({"faults": {"error_500": 2}}), ValueError,
        "error_500"),
    Bad("from_dict(faults drop='x')",
        lambda: SimulatorConfig.from_dict({"faults": {"drop": "x"}}), TypeError, "drop"),
    Bad("from_dict(faults unknown)",
        lambda: SimulatorConfig.from_dict({"faults": {"boom": 1}}), ValueError, "boom"),
    Bad("from_dict(slow_seconds=-1)",
        lambda: SimulatorConfig.from_dict({"faults": {"slow_seconds": -1}}), ValueError,
        "slow_seconds"),
    Bad("from_dict(faults=list)", lambda: SimulatorConfig.from_dict({"faults": []}), TypeError,
        "faults"),
    Bad("from_dict(retry_after_ms='yes')",
        lambda: SimulatorConfig.from_dict({"retry_after_ms": "yes"}), TypeError,
        "retry_after_ms"),
    Bad("from_dict(seed=1.5)", lambda: SimulatorConfig.from_dict({"seed": 1.5}), TypeError,
        "seed"),
    Bad("from_dict(seed=True)", lambda: SimulatorConfig.from_dict({"seed": True}), TypeError,
        "seed"),
    Bad("Faults(rate_limit=nan)", lambda: Faults(rate_limit=NAN), ValueError, "rate_limit"),
    Bad("SimKey(status='gone')", lambda: SimKey(SECRET, status="gone"), ValueError, "status"),
    Bad("Simulator(config='x')", lambda: Simulator("x"), TypeError, "config"),
    Bad("Simulator(host=0.0.0.0)", lambda: Simulator(host="0.0.0.0"), ValueError, "loopback"),
    Bad("Simulator(port=-1)", lambda: Simulator(port=-1), ValueError, "port"),
    Bad("set_key_status(unknown key)",
        lambda: Simulator(SimulatorConfig(keys=(SimKey(OTHER),))).set_key_status(SECRET, "ok"),
        KeyError, "unknown key"),
    Bad("set_key_status(bad status)",
        lambda: Simulator(SimulatorConfig(keys=(SimKey(SECRET),))).set_key_status(SECRET, "x"),
        ValueError, "status"),
]


@pytest.mark.parametrize("bad", BAD_API, ids=[bad.name for bad in BAD_API])
def test_bad_input_to_the_api_is_a_clear_error_without_the_key(bad: Bad) -> None:
    if bad.error is None:
        bad.call()
        return
    with pytest.raises(bad.error) as info:
        bad.call()
    text = f"{info.value} {info.value!r}"
    assert re.search(bad.match, str(info.value)), f"message does not name it: {text}"
    for key in (SECRET, OTHER):
        assert key not in text
        assert key[10:] not in text  # not even most of it


def _response(status: int, body: bytes, headers: dict[str, str] | None = None) -> Any:
    return httpx.Response(
        status, headers={"content-type": "application/json", **(headers or {})}, content=body,
        request=wire.request(),
    )


def _error(status: int, body: bytes, headers: dict[str, str] | None = None) -> Exception:
    return wire._CLIENT._make_status_error_from_response(_response(status, body, headers))


RATE_LIMIT = {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}
SERVER_DATA: dict[str, Callable[[], Exception]] = {
    "retry-after: soon": lambda: wire.rate_limited("20s", {"retry-after": "soon"}),
    "retry-after: -5": lambda: wire.status_error(429, RATE_LIMIT, {"retry-after": "-5"}),
    "retry-after: nan": lambda: wire.status_error(429, RATE_LIMIT, {"retry-after": "nan"}),
    "retry-after: 400 digits": lambda: wire.status_error(429, RATE_LIMIT,
                                                          {"retry-after": "9" * 400}),
    "retry-after: year 99999": lambda: wire.status_error(
        429, RATE_LIMIT, {"retry-after": "Fri, 31 Dec 99999 23:59:59 GMT"}),
    "retry-after: year 9999": lambda: wire.status_error(
        429, RATE_LIMIT, {"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}),
    "retry-after: bad date": lambda: wire.status_error(
        429, RATE_LIMIT, {"retry-after": "Mon, 99 Foo 2024 99:99:99 XYZ"}),
    "retry-after-ms: abc": lambda: wire.status_error(429, RATE_LIMIT, {"retry-after-ms": "abc"}),
    "retry-after-ms: -1": lambda: wire.status_error(429, RATE_LIMIT, {"retry-after-ms": "-1"}),
    "x-ratelimit-reset-requests: -1s": lambda: wire.status_error(
        429, RATE_LIMIT,
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "-1s"}),
    "x-ratelimit-reset-requests: 400 digits": lambda: wire.status_error(
        429, RATE_LIMIT,
        {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "9" * 400 + "s"}),
    "x-ratelimit-reset-tokens: 1h1h1h": lambda: wire.status_error(
        429, RATE_LIMIT,
        {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1h" * 99}),
    "garbage openai-organization": lambda: wire.rate_limited(
        "1s", {"openai-organization": "\x01<script>" * 500}),
    "try again in 10**30h": lambda: wire.rate_limited("1" + "0" * 30 + "h"),
    "non-JSON error body": lambda: wire.status_error(429, "<html>Too Many Requests</html>"),
    "non-JSON 500 body": lambda: wire.status_error(500, "<html>oops</html>"),
    "body is a list": lambda: _error(429, b"[1, 2, 3]"),
    "body is null": lambda: _error(429, b"null"),
    "body is a string": lambda: _error(429, b'"slow down"'),
    "error is a string": lambda: _error(429, b'{"error": "slow down"}'),
    "error is null": lambda: _error(401, b'{"error": null}'),
    "error fields of wrong types": lambda: _error(
        429, json.dumps({"error": {"message": 123, "code": ["x"], "type": {"a": 1}}}).encode()),
    "code insufficient_quota in a list": lambda: _error(
        429, json.dumps({"error": {"code": ["insufficient_quota"]}}).encode()),
    "truncated JSON body": lambda: _error(429, b'{"error": {"message": "Rate limit'),
    "429 without body": lambda: wire.status_error(429),
    "403 without body": lambda: wire.status_error(403),
    "401 without body": lambda: wire.status_error(401),
    "418 teapot": lambda: wire.status_error(418, "I'm a teapot"),
    "599 unknown server error": lambda: wire.status_error(599),
    "a 1 MB error message": lambda: wire.status_error(
        429, {"message": "x" * 1_000_000, "code": "rate_limit_exceeded"}),
}


@pytest.mark.parametrize("name", list(SERVER_DATA))
def test_malformed_server_data_is_classified_safely(name: str) -> None:
    exc = SERVER_DATA[name]()
    verdict = classify(exc)
    assert isinstance(verdict, Verdict)
    assert 0 <= verdict.seconds <= MAX_HINT_SECONDS
    headers = exc.response.headers  # type: ignore[attr-defined]
    budget = read_headers(headers)
    assert isinstance(budget, ServerBudget)
    for value in (budget.requests_reset, budget.tokens_reset):
        assert value is None or value >= 0  # an absurd reset is capped where it is used


HEADERS: dict[str, dict[str, Any]] = {
    "reset -1s": {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "-1s"},
    "remaining -5": {"x-ratelimit-remaining-requests": "-5", "x-ratelimit-limit-requests": "-1"},
    "limit 1e9": {"x-ratelimit-limit-requests": "1e9", "x-ratelimit-limit-tokens": "lots"},
    "reset nan/inf": {"x-ratelimit-reset-requests": "nan", "x-ratelimit-reset-tokens": "inf"},
    "reset huge": {"x-ratelimit-reset-requests": "9" * 400 + "h"},
    "reset empty": {"x-ratelimit-reset-requests": "", "x-ratelimit-reset-tokens": "   "},
    "values not str": {"x-ratelimit-remaining-requests": 5, "openai-organization": b"org-x",
                       "x-ratelimit-reset-requests": None},
    "garbage organization": {"openai-organization": "\x00\n<script>" * 1000,
                             "openai-project": "\t"},
    "only whitespace organization": {"openai-organization": "   "},
    "retry-after soon": {"retry-after": "soon"},
    "empty": {},
}


@pytest.mark.parametrize("name", list(HEADERS))
def test_malformed_budget_headers_are_ignored_safely(name: str) -> None:
    budget = read_headers(HEADERS[name])
    for value in (budget.requests_limit, budget.requests_left, budget.tokens_limit,
                  budget.tokens_left):
        assert value is None or (isinstance(value, int) and value >= 0)
    for value in (budget.requests_reset, budget.tokens_reset):
        assert value is None or value >= 0  # an absurd reset is capped where it is used
    assert budget.organization is None or budget.organization.strip() == budget.organization


# -- the command line ------------------------------------------------------------------------

# In a child process: under a 1.5 GB address-space limit, so that a huge value fails fast
# instead of eating the machine's memory.
_CLI_PRELUDE = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_AS, (1536 * 2**20, 1536 * 2**20)); "
    "runpy.run_module('stable_openai', run_name='__main__', alter_sys=True)"
)

# name: (arguments, what the message must name, run in a child process rather than in-process)
BAD_CLI: dict[str, tuple[list[str], str, bool]] = {
    "demo --calls x": (["demo", "--calls", "x"], "--calls", True),
    "demo --calls 0": (["demo", "--calls", "0"], "--calls", False),
    "demo --calls -5": (["demo", "--calls", "-5"], "--calls", False),
    "demo --calls 10**20": (["demo", "--calls", "1" + "0" * 20], "--calls", True),
    "demo --threads 0": (["demo", "--threads", "0"], "--threads", False),
    "demo --concurrency 0": (["demo", "--concurrency", "0"], "--concurrency", False),
    "demo --rpm 0": (["demo", "--rpm", "0"], "--rpm", False),
    "demo --window 0": (["demo", "--window", "0"], "--window", False),
    "demo --window nan": (["demo", "--window", "nan"], "--window", False),
    "demo --window -1": (["demo", "--window", "-1"], "--window", False),
    "demo --latency -1": (["demo", "--latency", "-1"], "--latency", False),
    "demo unknown option": (["demo", "--colour", "red"], "--colour", False),
    "check --timeout -1": (["check", SECRET, "--timeout", "-1"], "--timeout", False),
    "check --timeout nan": (["check", SECRET, "--timeout", "nan"], "--timeout", False),
    "check --timeout x": (["check", SECRET, "--timeout", "x"], "--timeout", False),
    "check --file missing": (["check", "--file", "{missing_keys}"], "missing-keys.txt", False),
    "check key with a space in a file": (["check", "--file", "{spaced}"], "whitespace", False),
    "check non-ASCII key": (["check", SECRET[:10] + "é" + SECRET[10:]], "keys[0]", True),
    "check unknown option": (["check", SECRET, "--colour"], "--colour", False),
    "simulate --config missing": (["simulate", "--config", "{missing}"], "missing.json", False),
    "simulate --config bad JSON": (["simulate", "--config", "{bad_json}"], "not valid JSON",
                                   True),
    "simulate --config unknown field": (["simulate", "--config", "{unknown}"], "colour", False),
    "simulate --config top-level list": (["simulate", "--config", "{listed}"], "JSON object",
                                         False),
    "simulate --config bad status": (["simulate", "--config", "{status}"], "status", False),
    "simulate --window 0": (["simulate", "--key", SECRET, "--window", "0"], "window", False),
    "simulate --window x": (["simulate", "--key", SECRET, "--window", "x"], "--window", False),
    "simulate --key bad status": (["simulate", "--key", f"{SECRET}:p:gone"], "status", False),
    "simulate --key empty part": (["simulate", "--key", f"{SECRET}::ok"], "KEY[:PROJECT",
                                  False),
    "simulate --host public": (["simulate", "--key", SECRET, "--host", "0.0.0.0"], "loopback",
                               False),
    "simulate --port 70000": (["simulate", "--key", SECRET, "--port", "70000"], "port", False),
    "simulate --fault-500 2": (["simulate", "--key", SECRET, "--fault-500", "2"], "error_500",
                               False),
    "simulate --rpm 0": (["simulate", "--key", SECRET, "--rpm", "0"], "rpm", False),
    "simulate without keys": (["simulate"], "no keys", False),
    "unknown command": (["bogus"], "bogus", False),
}


class _ConfigAccepted(Exception):
    """Raised instead of serving when ``simulate`` accepted a configuration."""


def _refuse_to_serve(self: Simulator) -> Simulator:
    raise _ConfigAccepted("simulate accepted the configuration and would serve forever")


def _cli_in_process(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m stable_openai ARGS`` in this process: exit status, stdout, stderr; an
    exception that escapes is printed as the interpreter would print it."""
    from stable_openai.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            traceback.print_exc()
            code = 1
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _cli_in_child(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [sys.executable, "-c", _CLI_PRELUDE, *args], cwd=cwd, env=child_env(),
            capture_output=True, text=True, timeout=60, check=False,
        )
    except subprocess.TimeoutExpired as exc:
        return subprocess.CompletedProcess(args, -9, "", f"timed out after {exc.timeout}s")


@pytest.fixture(scope="module")
def cli_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every bad command line: most in this process (``simulate`` is kept from serving),
    a few in child processes, all of those at once."""
    folder = tmp_path_factory.mktemp("cli")
    files = {
        "spaced": "sk-spaced-0000 0000000000000000WXYZ\n",
        "bad_json": "{bad json",
        "unknown": json.dumps({"keys": [SECRET], "colour": 1}),
        "listed": json.dumps([SECRET]),
        "status": json.dumps({"keys": [{"key": SECRET, "status": "gone"}]}),
    }
    paths = {"missing": folder / "missing.json", "missing_keys": folder / "missing-keys.txt"}
    for name, text in files.items():
        paths[name] = folder / f"{name}.json"
        paths[name].write_text(text, encoding="utf-8")

    def argv(args: list[str]) -> list[str]:
        return [arg.format(**paths) if arg.startswith("{") else arg for arg in args]

    results: dict[str, subprocess.CompletedProcess[str]] = {}
    with ThreadPoolExecutor(max_workers=4) as pool:
        children = {
            name: pool.submit(_cli_in_child, argv(args), folder)
            for name, (args, _, child) in BAD_CLI.items() if child
        }
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OPENAI_BASE_URL", UNREACHABLE)
            patch.delenv("OPENAI_API_KEY", raising=False)
            patch.delenv("OPENAI_API_KEYS", raising=False)
            patch.setattr(Simulator, "start", _refuse_to_serve)
            for name, (args, _, child) in BAD_CLI.items():
                if not child:
                    results[name] = _cli_in_process(argv(args))
        for name, future in children.items():
            results[name] = future.result()
    return results


@pytest.mark.parametrize("name", list(BAD_CLI))
def test_bad_command_line_exits_2_with_one_line_naming_the_problem(
    cli_results: dict[str, subprocess.CompletedProcess[str]], name: str
) -> None:
    done = cli_results[name]
    _, names, _ = BAD_CLI[name]
    output = done.stdout + done.stderr
    assert "Traceback" not in output, done.stderr[-2000:]
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    # argparse prints its usage first; what remains is the message, on one line
    message = [
        line for line in done.stderr.splitlines()
        if line.strip() and not line.startswith(("usage:", " "))
    ]
    assert len(message) == 1, done.stderr
    assert names in message[0], message[0]
    assert SECRET not in output and SECRET[10:] not in output


TINY_WEIGHT = textwrap.dedent(
    """
    import resource, sys
    resource.setrlimit(resource.RLIMIT_AS, (512 * 2**20, 512 * 2**20))
    from stable_openai._keys import Key
    from stable_openai._ring import KeyRing

    try:
        key = Key("sk-weight-0000-MADEUP000000000001", weight=float(sys.argv[1]))
    except ValueError:
        print("rejected")
        sys.exit(0)
    ring = KeyRing([key, "sk-weight-0001-MADEUP000000000002"], clock=lambda: 0.0)
    for _ in range(4):
        ring.choose()
    print("chosen", len(ring._buckets))
    """
)


@pytest.mark.parametrize("weight", ["1e-300"])
def test_a_tiny_weight_is_rejected_or_harmless(weight: str) -> None:
    """``Key(weight=...)`` accepts any weight above 0: choosing the key must not then
    allocate memory in proportion to 1/weight."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", TINY_WEIGHT, weight], cwd=ROOT, env=child_env(),
            capture_output=True, text=True, timeout=30, check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"choosing a key of weight {weight} did not finish in 30 s")
    assert done.returncode == 0, done.stderr[-1500:]
    words = done.stdout.split()
    assert words[0] == "rejected" or int(words[1]) <= 1000, done.stdout


def test_count_of_bad_inputs_tried() -> None:
    count = len(BAD_API) + len(SERVER_DATA) + len(HEADERS) + len(BAD_CLI) + 1  # + the weight
    print(
        f"\nbad inputs tried: {count} ({len(BAD_API)} API, {len(SERVER_DATA)} server errors, "
        f"{len(HEADERS)} header sets, {len(BAD_CLI)} command lines)"
    )
    assert count >= 200


# =========================================================================== secrecy


def test_secrecy_sweep_no_whole_key_anywhere(
    start_simulator: StartSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    names = ["ok1", "ok1b", "ok2", "revoked", "quota", "forbidden", "small", "pooled"]
    k = dict(zip(names, made_up_keys(len(names), "sweep")))
    config = SimulatorConfig(
        keys=(
            SimKey(k["ok1"], project="p1", organization="org-one"),
            SimKey(k["ok1b"], project="p1", organization="org-one"),
            SimKey(k["ok2"], project="p2", organization="org-two"),
            SimKey(k["revoked"], project="p3", status="revoked"),
            SimKey(k["quota"], project="p4", status="no_quota"),
            SimKey(k["forbidden"], project="p5", status="forbidden"),
            SimKey(k["small"], project="tiny"),
            SimKey(k["pooled"], project="p6", organization="org-six"),
        ),
        projects={"p1": ProjectLimits(rpm=2), "tiny": ProjectLimits(tpm=50),
                  "p6": ProjectLimits(rpm=3)},
        window=1.0,
    )
    sim = start_simulator(config)
    clients = Clients(sim.base_url)
    texts: list[str] = []  # everything the library returned, raised or printed
    raised: Counter[str] = Counter()

    def attempt(call: Callable[[], object]) -> None:
        try:
            texts.append(repr(call()))
        except Exception as exc:
            raised[type(exc).__name__] += 1
            texts.append("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
            texts.append(f"{exc} {exc!r} {exc.__cause__!r} {exc.__context__!r}")

    def asker(**options: Any) -> Callable[[str], str | None]:
        @stable(backoff=0.001, **options)
        def ask(prompt: str, api_key: str) -> str | None:
            response = clients.get(api_key).chat.completions.create(
                model=MODEL, messages=messages(prompt)
            )
            return response.choices[0].message.content

        return ask

    def faults(**values: float) -> None:
        sim.configure(dataclasses.replace(sim.config, faults=Faults(**values)))

    loggers = ["stable_openai", "openai", "httpx2", "httpx", "httpcore2"]
    with contextlib.ExitStack() as stack:
        stack.enter_context(caplog.at_level(logging.DEBUG))
        for name in loggers:
            stack.enter_context(caplog.at_level(logging.DEBUG, logger=name))
        manager = KeyManager(
            [k["ok1"], k["ok1b"], k["revoked"], k["quota"], k["forbidden"], k["ok2"]]
        )
        ask = asker()
        for index in range(8):  # 429 on p1 (rpm 2), 401, 429 no quota, 403 on the way
            attempt(lambda i=index: ask(f"sweep {i}"))
        for fault in ("error_500", "error_503", "drop"):  # 500, 503, dropped connection
            faults(**{fault: 1.0})
            attempt(lambda: asker(attempts=2)("fails"))
        faults(rate_limit=1.0)  # every key rate limited past the wait budget
        attempt(lambda: asker(max_wait=0.01)("cooling"))
        faults()
        KeyManager([k["small"]])
        attempt(lambda: asker()("x" * 2000))  # 429 request too large
        KeyManager([k["revoked"]])
        attempt(lambda: asker()("all disabled"))  # AllKeysDisabledError
        KeyManager([k["forbidden"], k["quota"]])
        attempt(lambda: asker(max_wait=0.01)("all benched"))
        manager.delete_key(k["quota"])
        manager.delete_key(k["forbidden"])
        attempt(lambda: asker()("no keys"))  # NoKeysError

        @stable
        def stream(prompt: str, api_key: str) -> Iterator[str]:
            with clients.get(api_key).chat.completions.create(
                model=MODEL, messages=messages(prompt), stream=True
            ) as chunks:
                for chunk in chunks:
                    if chunk.choices and chunk.choices[0].delta.content:
                        yield chunk.choices[0].delta.content

        KeyManager([k["revoked"], k["ok2"]])
        attempt(lambda: "".join(stream("stream after a 401")))

        pooled = Key(k["pooled"], base_url=sim.base_url, organization="org-six", rpm=120)
        KeyManager([pooled, Key(k["revoked"], base_url=sim.base_url)])

        @stable(backoff=0.001)
        def ask_pooled(prompt: str, client: openai.OpenAI) -> str | None:
            response = client.chat.completions.create(model=MODEL, messages=messages(prompt))
            return response.choices[0].message.content

        try:
            for index in range(6):  # p6 allows 3 a window: its budget is learned and paced
                attempt(lambda i=index: ask_pooled(f"pooled {i}"))
        finally:
            for state in manager._ring:
                client = state.clients.pop("sync", None)
                if client is not None:
                    client.close()  # type: ignore[attr-defined]
        everything_ours = [
            repr(manager), str(manager.stats()), repr(list(manager._ring)),
            repr(manager._ring.pools()), repr(pooled), repr(Key(k["ok1"], pool="p")),
            str(sim.stats()), repr(sim.config), repr(sim), repr(config.keys),
        ]
    clients.close()

    env = child_env()
    check = subprocess.run(
        [sys.executable, "-m", "stable_openai", "check", "--base-url", sim.base_url,
         *k.values()],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    demo = subprocess.run(
        [sys.executable, "-m", "stable_openai", "demo", "--calls", "30", "--window", "0.5"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert "revoked" in check.stdout and check.returncode == 1, check.stderr
    assert demo.returncode == 0, demo.stderr[-2000:]

    ours = [r for r in caplog.records if r.name.split(".")[0] == "stable_openai"]
    theirs = [r for r in caplog.records if r.name.split(".")[0] != "stable_openai"]
    log_text = "\n".join(
        f"{r.name} {r.getMessage()} {r.exc_text or ''} {r.stack_info or ''}" for r in ours
    )
    everything = "\n".join([*texts, *everything_ours, log_text, check.stdout, check.stderr,
                            demo.stdout, demo.stderr])
    third_party = "\n".join(f"{r.name} {r.getMessage()}" for r in theirs)
    all_keys = [*k.values(), *(key.key for key in demo_config(10, 1.0, 0.0).keys)]
    leaks_by_them = sum(key in third_party for key in all_keys)
    print(
        f"\nsecrecy sweep: {len(texts)} outcomes, raised {dict(raised)}, {len(ours)} records "
        f"of ours, {len(theirs)} third-party records ({leaks_by_them} keys in them), "
        f"{len(everything)} characters searched"
    )
    for name in ("RateLimitError", "InternalServerError", "APIConnectionError",
                 "AllKeysCoolingError", "AllKeysDisabledError", "NoKeysError"):
        assert raised[name] >= 1, (name, raised)  # every path was really driven
    server = sim.stats()["totals"]
    for outcome in ("rate_limited", "quota", "unauthorized", "forbidden", "faults", "too_large"):
        assert server[outcome] >= 1, (outcome, server)  # 429, 429 quota, 401, 403, 5xx/drop
    assert server["faults"] >= 3 + 1  # 500, 503, a dropped connection, a spurious 429
    assert any("disabled" in r.getMessage() for r in ours)
    for key in all_keys:
        assert key not in everything, f"a whole key ({key[:3]}…{key[-4:]}) leaked"
        assert key[6:] not in everything, f"most of a key ({key[:3]}…{key[-4:]}) leaked"


# =========================================================================== lifecycle

_LIFE_PRELUDE = textwrap.dedent(
    """
    import asyncio, os, sys, threading
    import openai
    from stable_openai import Key, KeyManager, stable

    BASE = os.environ["SIM_BASE_URL"]
    KEYS = os.environ["SIM_KEYS"].split(",")
    MESSAGES = [{"role": "user", "content": "hello"}]
    """
)

LIFECYCLE = {
    "sync threads": """
        KeyManager(KEYS)

        @stable
        def ask(api_key):
            with openai.OpenAI(api_key=api_key, base_url=BASE, max_retries=0) as client:
                return client.chat.completions.create(model="m", messages=MESSAGES)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    """,
    "asyncio": """
        KeyManager(KEYS)

        @stable
        async def ask(api_key):
            async with openai.AsyncOpenAI(api_key=api_key, base_url=BASE, max_retries=0) as c:
                return await c.chat.completions.create(model="m", messages=MESSAGES)

        async def main():
            await asyncio.gather(*(ask() for _ in range(20)))

        asyncio.run(main())
    """,
    "streaming": """
        KeyManager(KEYS)

        @stable
        def stream(api_key):
            client = openai.OpenAI(api_key=api_key, base_url=BASE, max_retries=0)
            with client.chat.completions.create(
                model="m", messages=MESSAGES, stream=True
            ) as chunks:
                yield from chunks

        @stable
        async def astream(api_key):
            async with openai.AsyncOpenAI(api_key=api_key, base_url=BASE, max_retries=0) as c:
                chunks = await c.chat.completions.create(model="m", messages=MESSAGES,
                                                         stream=True)
                async with chunks:
                    async for chunk in chunks:
                        yield chunk

        assert len(list(stream())) > 1
        left_open = stream()
        next(left_open)  # a stream abandoned half-way, never closed

        async def main():
            return [chunk async for chunk in astream()]

        assert len(asyncio.run(main())) > 1
    """,
    "client mode": """
        KeyManager([Key(key, base_url=BASE) for key in KEYS])

        @stable
        def ask(client):
            return client.chat.completions.create(model="m", messages=MESSAGES)

        @stable
        async def aask(client):
            return await client.chat.completions.create(model="m", messages=MESSAGES)

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

        async def main():
            await asyncio.gather(*(aask() for _ in range(8)))

        asyncio.run(main())
    """,
    "a daemon thread waiting for a key": """
        KeyManager(KEYS)
        for key in KEYS:
            KeyManager().set_ttl(key, 3600)

        @stable(max_wait=7200)
        def ask(api_key):
            return api_key

        waiter = threading.Thread(target=ask, daemon=True)
        waiter.start()
        while not KeyManager()._turns:
            threading.Event().wait(0.01)
    """,
}


@pytest.mark.parametrize("mode", list(LIFECYCLE))
def test_the_process_exits_promptly(start_simulator: StartSimulator, mode: str) -> None:
    keys = made_up_keys(3, "life")
    sim = start_simulator(
        SimulatorConfig(keys=tuple(SimKey(key, project=f"p{i}") for i, key in enumerate(keys)))
    )
    code = _LIFE_PRELUDE + textwrap.dedent(LIFECYCLE[mode]) + "\nprint('done', flush=True)\n"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT,
        env=child_env(SIM_BASE_URL=sim.base_url, SIM_KEYS=",".join(keys)),
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "done"
    assert "Traceback" not in done.stderr


def test_the_library_imports_cleanly_in_a_fresh_process() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c",
         "import stable_openai, stable_openai.simulator; print(stable_openai.__version__)"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", done.stdout.strip())


def test_library_errors_are_openai_errors() -> None:
    for error in (AllKeysCoolingError, AllKeysDisabledError, NoKeysError):
        assert issubclass(error, StableOpenAIError)
        assert issubclass(error, openai.OpenAIError)
