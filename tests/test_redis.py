"""The Redis backend: key state shared by processes, against real ``redis-server`` processes.

A session fixture starts ``redis-server`` on a free loopback port (``REDIS_SERVER`` names the
binary; the tests are skipped, saying why, when there is none).  Tests that kill and restart
Redis start their own.  Other processes are real ones (``subprocess``, never ``fork``) running
the worker script below against the simulator, which runs in this process on loopback.  Every
test uses a namespace of its own.  Only made-up keys.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from redisserver import NO_REDIS, RedisServer, free_port
from redisserver import redis_binary as find_redis_binary
from wire import made_up_keys

from stable_openai import Key, KeyManager, stable
from stable_openai.backends import (
    MemoryBackend,
    RedisBackend,
    StateBackend,
    backend_from_url,
)
from stable_openai.simulator import Faults, ProjectLimits, SimKey, Simulator, SimulatorConfig

redis = pytest.importorskip("redis", reason='needs redis-py: pip install "stable-openai[redis]"')

MODEL = "gpt-4o-mini"
StartSimulator = Callable[[SimulatorConfig], Simulator]


# --------------------------------------------------------------------------- redis-server


@pytest.fixture(scope="session")
def redis_binary() -> str:
    binary = find_redis_binary()
    if binary is None:
        pytest.skip(NO_REDIS)
    return binary


@pytest.fixture(scope="session")
def redis_server(redis_binary: str) -> Iterator[RedisServer]:
    server = RedisServer(redis_binary).start()
    yield server
    server.kill()


@pytest.fixture
def namespace() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def redis_url(redis_server: RedisServer, namespace: str) -> str:
    return f"{redis_server.url}?namespace={namespace}"


@pytest.fixture(autouse=True)
def _close_manager() -> Iterator[None]:
    """Close the pooled clients and the backend of the test's manager."""
    yield
    manager = KeyManager.current()
    if manager is not None:
        manager.close()


# --------------------------------------------------------------------------- helpers


def sim_config(keys: list[SimKey], rpm: int | None = None, window: float = 1.0,
               latency: float = 0.0) -> SimulatorConfig:
    projects = {key.project: ProjectLimits(rpm=rpm) for key in keys}
    return SimulatorConfig(keys=tuple(keys), projects=projects, window=window, latency=latency)


def good_and_bad(tag: str) -> tuple[list[str], dict[str, str]]:
    """Three good keys, one revoked, one out of quota: the keys, and the bad ones by kind."""
    keys = made_up_keys(5, tag)
    return keys, {"revoked": keys[3], "no_quota": keys[4]}


def sim_keys(keys: list[str], bad: dict[str, str]) -> list[SimKey]:
    status = {key: kind for kind, key in bad.items()}
    return [SimKey(key, project=f"p{i}", status=status.get(key, "ok"))
            for i, key in enumerate(keys)]


WORKER = r'''
import asyncio, json, sys, threading, time
from stable_openai import KeyManager, stable
from stable_openai.backends import RedisBackend

args = json.loads(sys.argv[1])
backend = RedisBackend(args["url"], namespace=args["namespace"],
                       lease_seconds=args.get("lease", 60.0))
manager = KeyManager(args["keys"], backend=backend)
for key, ttl in args.get("set_ttl", {}).items():
    manager.set_ttl(key, ttl)
mode = args["mode"]
ok = failed = 0

@stable(max_wait=30)
def ask(text, client):
    answer = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
    return answer.choices[0].message.content

@stable(max_wait=30)
async def ask_async(text, client):
    answer = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": text}])
    return answer.choices[0].message.content

if mode == "calls":
    for i in range(args["calls"]):
        try:
            ok += ask(f"call {i}") == f"echo: call {i}"
        except Exception as exc:
            failed += 1
elif mode == "async":
    async def main():
        results = await asyncio.gather(
            *(ask_async(f"call {i}") for i in range(args["calls"])), return_exceptions=True)
        await manager.aclose()
        return results
    for i, result in enumerate(asyncio.run(main())):
        if result == f"echo: call {i}":
            ok += 1
        else:
            failed += 1
elif mode == "hang":
    @stable
    def hang(api_key):
        time.sleep(3600)
    for _ in range(args["threads"]):
        threading.Thread(target=hang, daemon=True).start()
    while sum(row["in_flight"] for row in manager.stats()) < args["threads"]:
        time.sleep(0.01)
    print("in flight", flush=True)
    time.sleep(3600)
print(json.dumps({"ok": ok, "failed": failed, "stats": manager.stats()},
                 default=str), flush=True)
manager.close()
'''


def run_worker(sim: Simulator | None, timeout: float = 90.0, **args: Any) -> dict[str, Any]:
    """Run the worker script in a process of its own; its JSON result."""
    env = dict(os.environ)
    if sim is not None:
        env["OPENAI_BASE_URL"] = sim.base_url
    done = subprocess.run(
        [sys.executable, "-c", WORKER, json.dumps(args)], env=env, capture_output=True,
        text=True, timeout=timeout, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def dump_redis(client: Any) -> list[str]:
    """Every key name and every value in Redis, whatever its type, as text."""
    texts = []
    for name in client.scan_iter(count=1000):
        texts.append(name)
        kind = client.type(name)
        if kind == "string":
            texts.append(client.get(name))
        elif kind == "hash":
            for field, value in client.hgetall(name).items():
                texts += [field, value]
        elif kind == "zset":
            for member, score in client.zrange(name, 0, -1, withscores=True):
                texts += [member, repr(score)]
        elif kind == "set":
            texts += list(client.smembers(name))
        elif kind == "list":
            texts += client.lrange(name, 0, -1)
        else:
            raise AssertionError(f"unexpected Redis type {kind} for {name}")
    return texts


def records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "stable_openai" and r.levelno == level]


# --------------------------------------------------------------------------- validation


def test_backend_argument_is_validated() -> None:
    keys = made_up_keys(2, "valid")
    with pytest.raises(ValueError, match="unknown backend URL scheme 'mysql'"):
        KeyManager(keys, backend="mysql://localhost/0")
    with pytest.raises(ValueError, match="unknown backend URL scheme"):
        KeyManager(keys, backend="localhost:6379")
    with pytest.raises(TypeError, match="backend must be None, a URL"):
        KeyManager(keys, backend=6379)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="namespace"):
        RedisBackend("redis://127.0.0.1:1/0", namespace="has space")
    with pytest.raises(ValueError, match="lease_seconds"):
        RedisBackend("redis://127.0.0.1:1/0", lease_seconds=0)
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisBackend("http://127.0.0.1:1/0")
    assert isinstance(backend_from_url("memory://"), MemoryBackend)
    assert isinstance(backend_from_url("redis://127.0.0.1:1/0"), StateBackend)
    KeyManager.reset()
    manager = KeyManager(keys, backend="memory://")
    assert isinstance(manager.backend, MemoryBackend) and not manager.backend.available()


def test_the_memory_backend_shares_nothing_and_the_ring_chooses() -> None:
    from stable_openai._policy import Action, Fate, Verdict
    from stable_openai._ring import KeyRing

    keys = made_up_keys(2, "mem")
    ring = KeyRing(keys)
    backend = MemoryBackend()
    backend.bind(ring)
    assert isinstance(backend, StateBackend) and not backend.shared
    assert not backend.available() and backend.choose(None) is None  # the ring chooses
    assert backend.snapshot(list(ring)) is None  # the ring is the state
    KeyManager.reset()
    manager = KeyManager(keys)  # the default, driven through the same calls as any backend
    first, second = manager._acquire(None, 0.0)[0], manager._acquire(None, 0.0)[0]
    assert {first, second} == set(manager._ring)
    manager._owner.succeeded(first)
    cool = Verdict(Fate.COOL, Action.RETRY_ELSEWHERE, 60.0, "rate limited (429)", pooled=True)
    manager._fail(second, cool)
    manager.set_ttl(first.key, 30.0)
    rows = {row["key"]: row for row in manager.stats()}
    assert {row["reason"] for row in rows.values()} == {"set_ttl", "rate limited (429)"}
    assert all(row["in_flight"] == 0 for row in rows.values())


def test_a_password_in_the_url_is_never_shown() -> None:
    backend = RedisBackend("redis://user:hunter2-secret@127.0.0.1:1/0")
    assert "hunter2" not in repr(backend) and "hunter2" not in backend.url
    backend.close()


def test_without_redis_py_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # makes "import redis" fail
    with pytest.raises(ImportError, match=r'pip install "stable-openai\[redis\]"'):
        KeyManager(made_up_keys(1, "noredis"), backend="redis://localhost:6379/0")


def test_fingerprints_are_keyed_hmacs() -> None:
    key = made_up_keys(1, "fp")[0]
    one = RedisBackend("redis://127.0.0.1:1/0", namespace="app-one")
    two = RedisBackend("redis://127.0.0.1:1/0", namespace="app-two")
    secret = RedisBackend("redis://127.0.0.1:1/0", namespace="app-one", secret="s3cret")
    expected = hmac.new(b"app-one", key.encode(), hashlib.sha256).hexdigest()[:32]
    assert one.fingerprint(key) == expected
    assert len({one.fingerprint(key), two.fingerprint(key), secret.fingerprint(key)}) == 3
    for backend in (one, two, secret):
        backend.close()


# --------------------------------------------------------------------------- fallback


def test_unreachable_redis_from_the_start_one_warning_and_every_call_succeeds(
    start_simulator: StartSimulator, caplog: pytest.LogCaptureFixture,
) -> None:
    keys = made_up_keys(3, "down")
    sim = start_simulator(sim_config([SimKey(k, project=f"p{i}") for i, k in enumerate(keys)]))
    caplog.set_level(logging.DEBUG, logger="stable_openai")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    KeyManager(keys, backend=RedisBackend(dead, retry_first=0.01, retry_max=0.05))
    client = openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0)

    @stable
    def ask(text: str, api_key: str) -> str:
        answer = client.with_options(api_key=api_key).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}])
        return str(answer.choices[0].message.content)

    try:
        for i in range(30):
            assert ask(f"q{i}") == f"echo: q{i}"
            time.sleep(0.005)  # let the backoff pass: Redis is tried again, and fails again
    finally:
        client.close()
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "Redis" in warnings[0].getMessage()
    assert len(records(caplog, logging.DEBUG)) >= 2  # later failures stay quiet
    assert sum(row["calls"] for row in KeyManager().stats()) == 30  # the local ring's count
    for record in caplog.records:
        assert not any(key in record.getMessage() for key in keys)


# --------------------------------------------------------------------------- sharing


@pytest.mark.redis
def test_a_revoked_key_found_by_one_process_is_never_tried_by_the_others(
    start_simulator: StartSimulator, redis_server: RedisServer, namespace: str,
) -> None:
    keys, bad = good_and_bad("revoke")
    sim = start_simulator(sim_config(sim_keys(keys, bad)))
    common = {"url": redis_server.url, "namespace": namespace, "keys": keys, "mode": "calls"}
    first = run_worker(sim, calls=12, **common)
    assert (first["ok"], first["failed"]) == (12, 0)
    assert sim.key_stats(bad["revoked"])["requests"] == 1
    assert sim.key_stats(bad["no_quota"])["requests"] == 1
    results = [run_worker(sim, calls=12, **common) for _ in range(2)]
    assert all((r["ok"], r["failed"]) == (12, 0) for r in results)
    # Found once, by the first process; the others knew from Redis.
    assert sim.key_stats(bad["revoked"])["requests"] == 1
    assert sim.key_stats(bad["no_quota"])["requests"] == 1
    states = sorted(row["state"] for row in results[-1]["stats"])
    assert states == ["cooling", "disabled", "ready", "ready", "ready"]


@pytest.mark.redis
def test_keys_disabled_in_the_shared_state_are_told_at_start_and_tried_again(
    start_simulator: StartSimulator, redis_url: str, caplog: pytest.LogCaptureFixture,
) -> None:
    """A 401 incident disables every key in Redis; a worker started after the provider
    recovered finds them disabled — it says so in one WARNING at start, and tries them again
    once ``revoked_cooldown`` has passed, as the process that disabled them does (before:
    disabled for good, and silently)."""
    from stable_openai import AllKeysDisabledError

    keys = made_up_keys(2, "incident")
    sim = start_simulator(sim_config([SimKey(k, project=f"p{i}") for i, k in enumerate(keys)]))
    client = openai.OpenAI(base_url=sim.base_url, api_key="unused", max_retries=0)

    def asker(manager: KeyManager) -> Callable[[str], str]:
        @stable(manager=manager, revoked_cooldown=0.6)
        def ask(text: str, api_key: str) -> str:
            answer = client.with_options(api_key=api_key).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": text}])
            return str(answer.choices[0].message.content)

        return ask

    first = KeyManager.create(keys, backend=redis_url)
    try:
        for key in keys:
            sim.set_key_status(key, "revoked")
        with pytest.raises(AllKeysDisabledError):
            asker(first)("during")
        for key in keys:
            sim.set_key_status(key, "ok")  # the provider recovered
        caplog.set_level(logging.WARNING, logger="stable_openai")
        caplog.clear()
        later = KeyManager.create(keys, backend=redis_url)  # a worker started now
        try:
            with pytest.raises(AllKeysDisabledError) as caught:
                asker(later)("too soon")
            assert caught.value.recheck_in is not None and caught.value.recheck_in <= 0.6
            told = [r.getMessage() for r in records(caplog, logging.WARNING)
                    if "shared state" in r.getMessage()]
            assert len(told) == 1 and told[0].startswith("2 of 2 API key(s) are disabled"), told
            assert "tried again in" in told[0]
            assert not any(key in told[0] for key in keys)
            time.sleep(0.7)
            assert asker(later)("after") == "echo: after"
            assert asker(first)("after") == "echo: after"
            assert {row["state"] for row in later.stats()} == {"ready"}
        finally:
            later.close()
    finally:
        first.close()
        client.close()


@pytest.mark.redis
def test_concurrent_processes_share_one_revocation(
    start_simulator: StartSimulator, redis_server: RedisServer, namespace: str,
) -> None:
    keys, bad = good_and_bad("race")
    sim = start_simulator(sim_config(sim_keys(keys, bad), latency=0.005))
    common = {"url": redis_server.url, "namespace": namespace, "keys": keys, "mode": "calls"}
    results: list[dict[str, Any]] = []
    workers = [threading.Thread(target=lambda: results.append(run_worker(sim, calls=30, **common)))
               for _ in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert [(r["ok"], r["failed"]) for r in results] == [(30, 0)] * 3
    # Each process could have chosen the revoked key before the first 401 was reported;
    # after that, none does.
    assert sim.key_stats(bad["revoked"])["requests"] <= 3
    before = sim.key_stats(bad["revoked"])["requests"]
    assert run_worker(sim, calls=10, **common)["ok"] == 10
    assert sim.key_stats(bad["revoked"])["requests"] == before


@pytest.mark.redis
def test_a_cooldown_set_in_one_process_is_honoured_by_the_others(
    start_simulator: StartSimulator, redis_server: RedisServer, namespace: str,
) -> None:
    keys = made_up_keys(3, "cool")
    sim = start_simulator(sim_config([SimKey(k, project=f"p{i}") for i, k in enumerate(keys)]))
    common = {"url": redis_server.url, "namespace": namespace, "keys": keys, "mode": "calls"}
    # An hour: what the other process sees is that cooldown, less the seconds its start took
    # (a loaded machine took 12 s to start one when this was a minute).
    run_worker(sim, calls=0, set_ttl={keys[0]: 3600.0}, **common)
    result = run_worker(sim, calls=20, **common)
    assert (result["ok"], result["failed"]) == (20, 0)
    assert sim.key_stats(keys[0])["requests"] == 0
    row = next(r for r in result["stats"] if r["fingerprint"] == _local_fp(keys[0]))
    assert row["state"] == "cooling" and 3000 < float(row["seconds_left"]) <= 3600
    assert row["reason"] == "set_ttl"
    # And made ready again from a third process.
    run_worker(sim, calls=0, set_ttl={keys[0]: 0}, **common)
    result = run_worker(sim, calls=9, **common)
    assert sim.key_stats(keys[0])["requests"] == 3


def _local_fp(key: str) -> str:
    from stable_openai._keys import fingerprint

    return fingerprint(key)


@pytest.mark.redis
def test_the_leases_of_a_killed_process_expire(
    redis_server: RedisServer, namespace: str,
) -> None:
    keys = made_up_keys(2, "lease")
    process = subprocess.Popen(
        [sys.executable, "-c", WORKER, json.dumps({
            "url": redis_server.url, "namespace": namespace, "keys": keys, "mode": "hang",
            "threads": 3, "lease": 1.0,
        })],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "in flight"
        manager = KeyManager(keys, backend=f"{redis_server.url}?namespace={namespace}")
        assert sum(row["in_flight"] for row in manager.stats()) == 3  # seen from here
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        deadline = time.monotonic() + 10
        while sum(row["in_flight"] for row in manager.stats()) and time.monotonic() < deadline:
            time.sleep(0.1)
        rows = manager.stats()
        assert sum(row["in_flight"] for row in rows) == 0
        assert sum(row["calls"] for row in rows) == 3
        assert time.monotonic() < deadline
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


@pytest.mark.redis
def test_stats_count_every_process(
    start_simulator: StartSimulator, redis_server: RedisServer, namespace: str,
) -> None:
    keys = made_up_keys(3, "stats")
    sim = start_simulator(sim_config([SimKey(k, project=f"p{i}") for i, k in enumerate(keys)]))
    common = {"url": redis_server.url, "namespace": namespace, "keys": keys, "mode": "calls"}
    for _ in range(2):
        run_worker(sim, calls=7, **common)
    manager = KeyManager(keys, backend=f"{redis_server.url}?namespace={namespace}")
    rows = manager.stats()
    assert sum(row["calls"] for row in rows) == 14
    assert sum(row["successes"] for row in rows) == 14
    assert all(row["in_flight"] == 0 for row in rows)
    assert {row["pool"] for row in rows} == {"org-sim/p0", "org-sim/p1", "org-sim/p2"}


# --------------------------------------------------------------------------- sync and async


@pytest.mark.redis
def test_sync_and_async_clients_share_one_redis(
    start_simulator: StartSimulator, redis_server: RedisServer, namespace: str,
    redis_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys, bad = good_and_bad("mixed")
    sim = start_simulator(sim_config(sim_keys(keys, bad)))
    # Another process, asyncio only, finds the bad keys.
    other = run_worker(sim, calls=20, url=redis_server.url, namespace=namespace, keys=keys,
                       mode="async")
    assert (other["ok"], other["failed"]) == (20, 0)
    tried = {kind: sim.key_stats(key)["requests"] for kind, key in bad.items()}
    # Each bad key got calls before its first answer came: how many depends on how fast the
    # process builds its clients (a pool starts probing once its key's client is made, and
    # then cools between its first calls), not only on the 20 calls split over 5 keys.
    assert tried["revoked"] >= 1 and tried["no_quota"] >= 1

    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    manager = KeyManager(keys, backend=redis_url)

    @stable
    def ask(text: str, client: openai.OpenAI) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}])
        return str(answer.choices[0].message.content)

    @stable
    async def ask_async(text: str, client: openai.AsyncOpenAI) -> str:
        answer = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}])
        return str(answer.choices[0].message.content)

    async def main() -> list[str]:
        backend = manager.backend
        assert isinstance(backend, RedisBackend)
        answers = await asyncio.gather(*(ask_async(f"a{i}") for i in range(15)))
        assert asyncio.get_running_loop() in backend._loops  # redis.asyncio, this loop's own
        await manager.aclose()
        return answers

    assert [ask(f"s{i}") for i in range(15)] == [f"echo: s{i}" for i in range(15)]
    assert asyncio.run(main()) == [f"echo: a{i}" for i in range(15)]
    # This process, sync and async, never tried what the other process found bad.
    assert {kind: sim.key_stats(key)["requests"] for kind, key in bad.items()} == tried
    rows = manager.stats()
    assert sum(row["successes"] for row in rows) == 50
    assert all(row["in_flight"] == 0 for row in rows)


@pytest.mark.redis
def test_an_event_loop_blocked_while_redis_answers_is_no_redis_failure(
    redis_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Code that blocks the event loop (building an ``AsyncOpenAI`` client does, for tens of
    milliseconds) while a command is out, past the backend's timeout, with Redis's answer
    arriving meanwhile: the answer counts, Redis is not taken for down, and what the calls
    report reaches it.  (A deadline on the loop's clock cancelled the reader of that answer:
    the call fell back on the ring, and its report, a disabled key, was dropped.)"""
    from redis.asyncio.connection import AbstractConnection

    from stable_openai.backends._base import Pick

    keys = made_up_keys(2, "stall")
    backend = RedisBackend(redis_url, timeout=0.1)
    KeyManager(keys, backend=backend)
    caplog.set_level(logging.DEBUG, logger="stable_openai")
    blocking = False
    send = AbstractConnection.send_packed_command

    async def send_then_block(self: Any, *args: Any, **kwargs: Any) -> None:
        await send(self, *args, **kwargs)
        if blocking:  # the loop's next callback blocks it, the answer on its way
            asyncio.get_running_loop().call_soon(time.sleep, 0.4)

    monkeypatch.setattr(AbstractConnection, "send_packed_command", send_then_block)

    async def main() -> list[Pick | None]:
        nonlocal blocking
        picks = [await backend.choose_async(None)]  # connected, the scripts loaded
        blocking = True
        picks.append(await backend.choose_async(None))
        assert picks[-1] is not None and picks[-1].state is not None
        backend.report(picks[-1].state, "failed", _disable())  # sent by a task of the loop
        picks.append(await backend.choose_async(None))  # after that report
        blocking = False
        return picks

    first, disabled, last = asyncio.run(main())
    assert backend.available()
    assert not [r.getMessage() for r in records(caplog, logging.WARNING)]
    assert first is not None and disabled is not None and last is not None
    assert disabled.state is not None and last.state is not disabled.state
    for pick in (first, last):
        assert pick.state is not None
        backend.report(pick.state, "abandoned")
    rows = backend.snapshot([state for state in (disabled.state, last.state) if state])
    assert rows is not None and rows[disabled.state].where == "disabled"
    assert all(row.in_flight == 0 for row in rows.values())


# --------------------------------------------------------------------------- Redis fails


@pytest.mark.redis
def test_redis_killed_mid_run_and_restarted_no_call_fails_and_sharing_resumes(
    redis_binary: str, start_simulator: StartSimulator, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch, namespace: str,
) -> None:
    server = RedisServer(redis_binary).start()
    keys = made_up_keys(4, "restart")
    sim = start_simulator(sim_config([SimKey(k, project=f"p{i}") for i, k in enumerate(keys)],
                                     latency=0.002))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    caplog.set_level(logging.INFO, logger="stable_openai")
    backend = RedisBackend(server.url, namespace=namespace, retry_first=0.05, retry_max=0.2)
    manager = KeyManager(keys, backend=backend)

    @stable
    def ask(text: str, client: openai.OpenAI) -> str:
        answer = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": text}])
        return str(answer.choices[0].message.content)

    stop = threading.Event()
    outcomes: list[bool] = []
    errors: list[BaseException] = []

    def loop(n: int) -> None:
        i = 0
        while not stop.is_set():
            text = f"t{n}-{i}"
            try:
                outcomes.append(ask(text) == f"echo: {text}")
            except BaseException as exc:  # any failure fails the test
                errors.append(exc)
            i += 1

    threads = [threading.Thread(target=loop, args=(n,)) for n in range(8)]
    try:
        for thread in threads:
            thread.start()
        time.sleep(0.5)
        shared_before = sum(row["calls"] for row in manager.stats())
        assert shared_before > 0
        server.kill()
        time.sleep(0.7)  # calls carry on with the in-process ring
        during = len(outcomes)
        time.sleep(0.3)
        assert len(outcomes) > during
        server.start()  # same port, empty: every key must be registered again
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            rows = backend.snapshot(list(manager._ring))
            if rows and sum(row.calls for row in rows.values()) >= 20:
                break
            time.sleep(0.05)
        else:
            raise AssertionError("sharing did not resume")
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
        server.kill()
    assert not errors, errors[:3]
    assert outcomes and all(outcomes)
    warnings = records(caplog, logging.WARNING)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    infos = [r for r in records(caplog, logging.INFO) if "again" in r.getMessage()]
    assert len(infos) == 1


@pytest.mark.redis
def test_the_same_url_again_keeps_the_backend_and_close_reconnects(redis_url: str) -> None:
    keys = made_up_keys(2, "again")
    manager = KeyManager(keys, backend=redis_url)
    backend = manager.backend
    assert KeyManager(keys, backend=redis_url).backend is backend
    manager.close()  # connections closed; the next call connects again
    assert manager.get_key() in keys
    assert sum(row["calls"] for row in manager.stats()) == 0  # get_key() gave it back
    assert backend.available()


@pytest.mark.redis
def test_scripts_flushed_from_redis_are_sent_again(
    redis_server: RedisServer, redis_url: str,
) -> None:
    keys = made_up_keys(2, "flush")
    KeyManager(keys, backend=redis_url)

    @stable
    def noop(api_key: str) -> str:
        return api_key[-4:]

    noop()
    redis_server.client().script_flush()
    noop()
    assert sum(row["calls"] for row in KeyManager().stats()) == 2
    assert KeyManager().backend.available()


# --------------------------------------------------------------------------- secrecy, expiry


@pytest.mark.redis
def test_nothing_in_redis_contains_a_key_and_everything_expires(
    start_simulator: StartSimulator, redis_server: RedisServer, namespace: str,
    redis_url: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    keys, bad = good_and_bad("secret")
    sim = start_simulator(sim_config(sim_keys(keys, bad), rpm=3))
    common = {"url": redis_server.url, "namespace": namespace, "keys": keys}
    run_worker(sim, calls=15, mode="calls", **common)  # with rate limits: pools, budgets
    run_worker(sim, calls=10, mode="async", **common)
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    manager = KeyManager(keys, backend=redis_url)
    manager.set_ttl(keys[0], 5)
    manager.stats()
    client = redis_server.client()
    texts = dump_redis(client)
    assert texts, "nothing in Redis?"
    for key in keys:
        # Neither the key nor any part of it long enough to tell it from another key.
        secret_part = key.split("-", 2)[2]
        assert not any(key in text or secret_part in text for text in texts), key
    names = list(client.scan_iter(count=1000))  # every test's namespace is in there too
    # Every name carries its namespace as a hash tag (one Cluster slot), and expires.
    assert any(name.startswith(f"{{{namespace}}}:") for name in names)
    for name in names:
        assert name.startswith("{t-") and 0 < client.ttl(name) <= 86400, name
    client.close()


@pytest.mark.redis
def test_every_failure_path_on_redis_with_debug_logging_leaks_no_key(
    start_simulator: StartSimulator, redis_server: RedisServer, redis_url: str,
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The secrecy sweep again, with the state in Redis: 401, 429 no quota, 403, 429 rate
    limit, 500 and a Redis that cannot be reached, logged at DEBUG; then every Redis value,
    the logs, repr and stats() are searched for any key."""
    keys = made_up_keys(6, "redsweep")
    status = ["ok", "ok", "revoked", "no_quota", "forbidden", "ok"]
    sim = start_simulator(sim_config(
        [SimKey(key, project=f"p{i}", status=state) for i, (key, state)
         in enumerate(zip(keys, status))], rpm=2,
    ))
    monkeypatch.setenv("OPENAI_BASE_URL", sim.base_url)
    texts: list[str] = []
    with caplog.at_level(logging.DEBUG):
        manager = KeyManager(keys, backend=redis_url)

        @stable(backoff=0.001, attempts=3, max_wait=0.5)
        def ask(prompt: str, client: openai.OpenAI) -> str | None:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )
            return answer.choices[0].message.content

        for index in range(12):  # 401, 429 quota, 403 and the rpm=2 limits on the way
            try:
                texts.append(repr(ask(f"sweep {index}")))
            except Exception as exc:
                texts.append(f"{exc!r} {exc} {exc.__cause__!r}")
        sim.configure(dataclasses.replace(sim.config, faults=Faults(error_500=1.0)))
        try:
            ask("server error")
        except Exception as exc:
            texts.append(f"{exc!r} {exc}")
        texts += [repr(manager), repr(manager.backend), str(manager.stats())]  # (data is
        # the original API's {key: seconds}: it hands the caller its own keys by design)
        manager.close()
        KeyManager.reset()
        unreachable = f"redis://127.0.0.1:{free_port()}/0?namespace=gone"
        lonely = KeyManager(keys[:2], backend=unreachable)
        sim.configure(dataclasses.replace(sim.config, faults=Faults()))
        patient = stable(max_wait=10)(ask.__wrapped__)  # type: ignore[attr-defined]
        texts.append(repr(patient("no redis")))  # one WARNING, and the call still succeeds
        assert texts[-1] == repr("echo: no redis")
        texts += [repr(lonely.backend), str(lonely.stats())]
    texts.append("\n".join(
        f"{r.name} {r.getMessage()}" for r in caplog.records
        if r.name.split(".")[0] == "stable_openai"
    ))
    client = redis_server.client()
    texts += dump_redis(client)
    client.close()
    assert any("disabled" in text for text in texts)
    assert any(r.levelno == logging.WARNING and "redis" in r.getMessage().lower()
               for r in caplog.records if r.name.startswith("stable_openai"))
    everything = "\n".join(texts)
    for key in keys:
        assert key not in everything
        assert key.split("-", 2)[2] not in everything


# --------------------------------------------------------------------------- the scripts


@pytest.mark.redis
def test_the_choice_spreads_load_and_honours_avoid(redis_url: str) -> None:
    keys = made_up_keys(3, "spread")
    manager = KeyManager(keys, backend=redis_url)
    backend = manager.backend
    states = list(manager._ring)
    first = [backend.choose(None) for _ in range(3)]
    assert {pick.state for pick in first if pick is not None} == set(states)
    again = backend.choose({states[0], states[1]})
    assert again is not None and again.state is states[2]
    only = backend.choose(set(states))  # every key avoided: one is chosen all the same
    assert only is not None and only.state in states
    for pick in [*first, again, only]:
        assert pick is not None and pick.state is not None
        backend.report(pick.state, "abandoned")
    assert all(row["in_flight"] == 0 for row in manager.stats())


@pytest.mark.redis
def test_a_learned_budget_cools_the_pool_until_the_reset(redis_url: str) -> None:
    from stable_openai._budget import ServerBudget

    keys = made_up_keys(1, "budget")
    manager = KeyManager(keys, backend=redis_url)
    backend = manager.backend
    pick = backend.choose(None)
    assert pick is not None and pick.state is not None
    backend.answered(pick.state, ServerBudget(requests_limit=10, requests_left=1,
                                             requests_reset=30.0, organization="org-b"))
    backend.report(pick.state, "succeeded")
    assert backend.choose(None).state is pick.state  # type: ignore[union-attr]
    backend.report(pick.state, "succeeded")
    none = backend.choose(None)
    assert none is not None and none.state is None
    assert none.wait is not None and 25 < none.wait <= 30
    assert none.cooling == {"budget spent (RPM)": 1}
    (row,) = manager.stats()
    assert row["pool"] == "org-b" and row["state"] == "cooling"


@pytest.mark.redis
def test_pacing_to_a_pools_rpm_is_shared_by_processes(redis_url: str) -> None:
    from stable_openai import Key
    from stable_openai._ring import KeyRing

    (key,) = made_up_keys(1, "paced")
    # Two processes' worth: each its own ring and backend, one Redis.
    one, two = (backend_from_url(redis_url) for _ in range(2))
    rings = [KeyRing([Key(key, pool="shared-project", rpm=120)]) for _ in range(2)]
    for backend, ring in zip((one, two), rings):
        backend.bind(ring)
    picks = [one.choose(None), two.choose(None)]  # 2 per second: one second's worth at once
    assert all(pick is not None and pick.state is not None for pick in picks)
    paced = one.choose(None)
    assert paced is not None and paced.state is None
    assert paced.cooling == {"paced (rpm)": 1} and paced.wait is not None and paced.wait <= 0.5
    for backend, pick in zip((one, two), picks):
        backend.report(pick.state, "succeeded")  # type: ignore[union-attr, arg-type]
        backend.close()


@pytest.mark.redis
def test_no_key_ready_waits_for_the_shared_deadline_then_says_why(redis_url: str) -> None:
    from stable_openai import AllKeysCoolingError, AllKeysDisabledError

    keys = made_up_keys(2, "wait")
    manager = KeyManager(keys, backend=redis_url)
    manager.set_ttl(keys[0], 0.3)
    manager.set_ttl(keys[1], 60)
    start = time.monotonic()
    state, waited = manager._acquire(None, 5.0)
    assert state.key == keys[0] and 0.1 < waited < 2.0 and time.monotonic() - start < 2.0
    manager._abandon(state)
    manager.set_ttl(keys[0], 60)
    with pytest.raises(AllKeysCoolingError) as cooling:
        manager._acquire(None, 1.0)
    assert cooling.value.reasons == {"set_ttl": 2} and cooling.value.retry_after > 50
    backend = manager.backend
    assert isinstance(backend, RedisBackend)
    for key in keys:
        backend.report(manager._ring.find(key), "failed", _disable())  # type: ignore[arg-type]
    with pytest.raises(AllKeysDisabledError) as disabled:
        manager._acquire(None, 1.0)
    assert disabled.value.reasons == {"revoked (test)": 2}


def _disable() -> Any:
    from stable_openai._policy import Action, Fate, Verdict

    return Verdict(Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason="revoked (test)")


# --------------------------------------------------------------------------- lean and safe


def _commands(client: Any) -> dict[str, int]:
    """Redis's own count of the commands it ran, by command (INFO itself left out)."""
    return {name: row["calls"] for name, row in client.info("commandstats").items()
            if name != "cmdstat_info"}


def _commands_per_call(client: Any, calls: int, call: Callable[[], object]) -> float:
    before = _commands(client)
    for _ in range(calls):
        call()
    after = _commands(client)
    return sum(after[name] - before.get(name, 0) for name in after) / calls


@pytest.mark.redis
def test_a_call_costs_at_most_12_redis_commands_and_leaves_no_key_behind(
    start_simulator: StartSimulator, redis_server: RedisServer, namespace: str,
) -> None:
    """Choose and report together, counted by Redis itself (INFO commandstats, which counts
    the commands a script runs as well as the script call): in api_key mode, and with pooled
    clients whose answers carry budget headers.  And the namespace stays three Redis keys,
    however many calls went through it."""
    keys = made_up_keys(8, "lean")
    sim = start_simulator(sim_config([SimKey(k, project=f"p{i}") for i, k in enumerate(keys)],
                                     rpm=100_000))
    manager = KeyManager.create(
        keys, backend=RedisBackend(redis_server.url, namespace=namespace))
    client = redis_server.client()
    try:
        @stable(manager=manager)
        def noop(api_key: str) -> int:
            return 1

        @stable(manager=manager)
        def ask(client: openai.OpenAI) -> str | None:
            answer = client.with_options(base_url=sim.base_url).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}])
            return answer.choices[0].message.content

        for _ in range(40):  # registration, and each key's first answers (joining its pool)
            ask()
        assert _commands_per_call(client, 200, noop) <= 12
        assert _commands_per_call(client, 100, ask) <= 12
        assert sorted(client.scan_iter(match=f"{{{namespace}}}:*")) == sorted(
            f"{{{namespace}}}:{name}" for name in
            ("state", "load", f"ring:{manager.backend._ring_id}")  # type: ignore[union-attr]
        )
    finally:
        client.close()
        manager.close()


_BUSY = """
local t = redis.call('TIME')
local start = tonumber(t[1]) + tonumber(t[2]) / 1e6
local now = start
while now - start < tonumber(ARGV[1]) do
  t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1e6
end
return 1
"""


def _wait_until_busy(port: int) -> None:
    """Return once Redis runs the busy script: a PING on a fresh connection goes unanswered."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as probe:
            probe.settimeout(0.05)
            probe.sendall(b"PING\r\n")
            try:
                probe.recv(16)
            except socket.timeout:  # TimeoutError from Python 3.10
                return
        time.sleep(0.01)
    raise AssertionError("Redis never got busy")


@pytest.mark.redis
def test_a_lease_whose_choose_reply_was_lost_is_released_at_the_next_call(
    redis_server: RedisServer, namespace: str,
) -> None:
    """Redis is too slow for the client's timeout (a script keeps it busy): the choose runs
    late and its lease is granted, but the reply is lost and the call carries on with this
    process's own ring.  The next script call says the lease is lost and Redis releases it:
    in the time of one call, not the 60 s of ``lease_seconds``."""
    import redis

    keys = made_up_keys(2, "lost")
    backend = RedisBackend(redis_server.url, namespace=namespace, timeout=0.2,
                           retry_first=0.05, lease_seconds=60)
    manager = KeyManager.create(keys, backend=backend)
    busy = redis.Redis(port=redis_server.port, socket_timeout=10)
    raw = redis_server.client()
    try:
        @stable(manager=manager)
        def noop(api_key: str) -> int:
            return 1

        noop()  # registered
        blocker = threading.Thread(target=busy.eval, args=(_BUSY, 0, "2"))
        blocker.start()
        _wait_until_busy(redis_server.port)
        assert noop() == 1  # its choose times out: the call is served from the ring
        blocker.join()
        records = [json.loads(value) for name, value in raw.hgetall(
            f"{{{namespace}}}:state").items() if name.startswith("k:")]
        assert sum(record["n"] for record in records) == 1  # granted, the reply lost
        time.sleep(0.1)  # past retry_first: Redis is asked again
        assert noop() == 1
        rows = manager.stats()
        assert sum(row["in_flight"] for row in rows) == 0
        assert sum(row["calls"] for row in rows) == 2  # the lost one was never made
    finally:
        busy.close()
        raw.close()
        manager.close()


def test_every_script_touches_only_the_keys_it_declares() -> None:
    """Cluster-ready: every Redis command in the scripts names one of the declared keys
    (KEYS[1..3], all with the namespace's hash tag), never a name built in the script."""
    import re
    from importlib import resources

    folder = resources.files("stable_openai.backends").joinpath("lua")
    calls = 0
    for name in ("common", "choose", "report", "register", "control"):
        text = folder.joinpath(f"{name}.lua").read_text("utf-8")
        for match in re.finditer(r"(?:redis\.call|chunked)\('(\w+)'(?:,\s*([^,)]+))?", text):
            calls += 1
            command, first = match.group(1), match.group(2)
            assert command == "TIME" or first in ("STATE", "LOAD", "RING", "key"), match.group(0)
    assert calls > 10
    assert "KEYS[1], KEYS[2], KEYS[3]" in folder.joinpath("common.lua").read_text("utf-8")


@pytest.mark.redis
def test_a_stale_index_entry_never_hands_out_a_disabled_key(
    redis_server: RedisServer, namespace: str,
) -> None:
    """The state hash and the load set expire and can be evicted apart: an entry of the load
    set that no longer matches its key's record (here, a disabled key under a pool name it no
    longer has, at the best score) is dropped, not trusted."""
    from stable_openai._cause import Cause
    from stable_openai._manager import lease
    from stable_openai._policy import Action, Fate, Verdict

    keys = made_up_keys(2, "stale")
    backend = RedisBackend(redis_server.url, namespace=namespace)
    manager = KeyManager.create(keys, backend=backend)
    raw = redis_server.client()
    try:
        revoked = Verdict(Fate.DISABLE, Action.RETRY_ELSEWHERE, math.inf, reason="revoked (test)",
                          cause=Cause.REVOKED)
        taken, _ = lease(manager, None, 1.0)
        assert taken.key == keys[0]
        taken.fail(revoked)
        raw.zadd(f"{{{namespace}}}:load", {f"{backend.fingerprint(keys[0])}|gone-pool": 0})
        for _ in range(4):
            state, _ = manager._acquire(None, 1.0)
            assert state.key == keys[1]
            manager._owner.succeeded(state)
        assert raw.zscore(f"{{{namespace}}}:load", f"{backend.fingerprint(keys[0])}|gone-pool") \
            is None
    finally:
        raw.close()
        manager.close()


@pytest.mark.redis
def test_several_requests_a_call_spend_the_shared_budget(
    start_simulator: StartSimulator, redis_url: str,
) -> None:
    """A function that makes three requests per call, on Redis: each further request spends
    the pool's budget there too (another process would see it), and the run goes as on the
    memory store — every call succeeds, few requests repeated."""
    from test_pooling import _three_requests_a_call

    (key,) = made_up_keys(1, "rmulti")
    sim = start_simulator(sim_config([SimKey(key, project="p")], rpm=10, latency=0.02))
    KeyManager([Key(key, base_url=sim.base_url)], backend=redis_url)
    results = _three_requests_a_call(sim, is_async=False, calls=16)
    assert all(isinstance(result, list) for result in results), results
    totals = sim.stats()["totals"]
    assert totals["ok"] <= 48 + 2 * totals["rate_limited"]
    assert totals["rate_limited"] <= 8, totals
    shared = KeyManager().stats()[0]
    assert (shared["calls"], shared["in_flight"]) == (16 + totals["rate_limited"], 0)
