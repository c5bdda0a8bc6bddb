"""Pooled clients, keys with settings, pools learned from the server, pacing, fair waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from wire import made_up_keys

from stable_openai import AllKeysCoolingError, CallTimeoutError, Key, KeyManager, stable
from stable_openai._budget import Bucket, estimate_tokens, read_headers
from stable_openai._ring import KeyRing
from stable_openai._waiting import Turns, wait_turn, wait_turn_async
from stable_openai.simulator import (
    Faults,
    ModelLimits,
    ProjectLimits,
    SimKey,
    Simulator,
    SimulatorConfig,
    echo_answer,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def simulator(keys: list[SimKey], window: float = 1.0, **limits: Any) -> Simulator:
    projects = {key.project: ProjectLimits(**limits) for key in keys}
    return Simulator(SimulatorConfig(keys=tuple(keys), projects=projects, window=window))


# -- keys with settings ---------------------------------------------------------------------
def test_key_settings_are_validated_without_echoing_the_key() -> None:
    secret = made_up_keys(1, "settings")[0]
    for bad, error in [
        ({"weight": 0}, ValueError), ({"weight": "2"}, TypeError), ({"rpm": 0}, ValueError),
        ({"tpm": 1.5}, TypeError), ({"base_url": ""}, TypeError),
        ({"client_options": {"max_retries": 3}}, ValueError),
        ({"client_options": ["timeout"]}, TypeError),
    ]:
        with pytest.raises(error) as caught:
            Key(secret, **bad)
        assert secret not in str(caught.value)
    assert secret not in repr(Key(secret, rpm=60))


def test_plain_strings_and_keys_mix() -> None:
    a, b = made_up_keys(2)
    manager = KeyManager([a, Key(b, pool="team", rpm=600)])
    assert [row["pool"] for row in manager.stats()][1] == "team"
    assert len(manager) == 2


def test_weight_shares_concurrent_load() -> None:
    a, b = made_up_keys(2)
    ring = KeyRing([Key(a, weight=2), Key(b)])
    chosen = [ring.choose() for _ in range(6)]
    assert [state.key for state in chosen if state].count(a) == 4


# -- pooled clients ---------------------------------------------------------------------------
def test_one_pooled_client_per_key_reused_across_calls_and_threads() -> None:
    keys = made_up_keys(2)
    with simulator([SimKey(k, project=f"p{i}") for i, k in enumerate(keys)]) as sim:
        KeyManager([Key(k, base_url=sim.base_url) for k in keys])
        seen: list[openai.OpenAI] = []
        lock = threading.Lock()

        @stable
        def ask(prompt: str, client: openai.OpenAI) -> str:
            with lock:
                seen.append(client)
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )
            return answer.choices[0].message.content or ""

        threads = [threading.Thread(target=lambda: [ask(str(i)) for i in range(5)])
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        assert ask("x") == echo_answer("x")
        assert len({id(client) for client in seen}) == 2
        assert all(isinstance(client, openai.OpenAI) for client in seen)
        assert all(client.max_retries == 0 for client in seen)
        assert {client.api_key for client in seen} == set(keys)
        for state in KeyManager()._ring:
            state.clients["sync"].close()  # type: ignore[attr-defined]


def test_api_key_and_client_together() -> None:
    (key,) = made_up_keys(1)
    with simulator([SimKey(key)]) as sim:
        KeyManager([Key(key, base_url=sim.base_url)])

        @stable
        def ask(api_key: str, client: openai.OpenAI) -> bool:
            return client.api_key == api_key

        assert ask()
        next(iter(KeyManager()._ring)).clients["sync"].close()  # type: ignore[attr-defined]


def test_async_functions_get_async_clients_one_per_loop() -> None:
    (key,) = made_up_keys(1)
    with simulator([SimKey(key)]) as sim:
        KeyManager([Key(key, base_url=sim.base_url)])
        seen: list[Any] = []

        @stable
        async def ask(prompt: str, client: openai.AsyncOpenAI) -> str:
            seen.append(client)
            answer = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )
            return answer.choices[0].message.content or ""

        async def main() -> list[str]:
            answers = await asyncio.gather(*(ask(str(i)) for i in range(10)))
            await seen[-1].close()
            return list(answers)

        assert asyncio.run(main()) == [echo_answer(str(i)) for i in range(10)]
        assert asyncio.run(main()) == [echo_answer(str(i)) for i in range(10)]
        assert all(isinstance(client, openai.AsyncOpenAI) for client in seen)
        assert all(client.max_retries == 0 for client in seen)
        assert len({id(client) for client in seen}) == 2  # one per event loop


# -- learning from the server ----------------------------------------------------------------
def test_reset_headers_of_every_duration_form_are_read() -> None:
    for text, seconds in [("1s", 1.0), ("6m0s", 360.0), ("12ms", 0.012), ("9.816s", 9.816),
                          ("1m30.5s", 90.5)]:
        budget = read_headers({"x-ratelimit-remaining-requests": "0",
                               "x-ratelimit-reset-requests": text,
                               "x-ratelimit-limit-requests": "60"})
        assert budget.requests_reset == pytest.approx(seconds)
        assert budget.requests_left == 0
        assert budget.requests_limit == 60
    assert read_headers({"x-ratelimit-remaining-requests": "lots"}).requests_left is None
    assert read_headers({}).organization is None


def test_keys_of_one_project_form_a_pool_that_stops_before_its_budget_is_spent() -> None:
    keys = made_up_keys(3)
    sim_keys = [SimKey(keys[0], project="shared"), SimKey(keys[1], project="shared"),
                SimKey(keys[2], project="alone")]
    with simulator(sim_keys, window=1.0, rpm=4) as sim:
        KeyManager([Key(k, base_url=sim.base_url) for k in keys])

        @stable
        def ask(prompt: str, client: openai.OpenAI) -> str:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}]
            )
            return answer.choices[0].message.content or ""

        answers = [ask(str(i)) for i in range(14)]
        assert answers == [echo_answer(str(i)) for i in range(14)]
        pools = {row["pool"] for row in KeyManager().stats()}
        assert "org-sim/shared" in pools and "org-sim/alone" in pools
        # the budget is read from the server's headers: the pool stops at its remainder
        assert sim.stats()["totals"]["rate_limited"] <= 2
        for state in KeyManager()._ring:
            state.clients["sync"].close()  # type: ignore[attr-defined]


def test_budget_bookkeeping_returns_to_zero_after_faults_and_cancelled_calls() -> None:
    keys = made_up_keys(2)
    config = SimulatorConfig(
        keys=tuple(SimKey(k, project=f"p{i}") for i, k in enumerate(keys)),
        projects={"p0": ProjectLimits(tpm=100_000), "p1": ProjectLimits(tpm=100_000)},
        window=1.0, latency=0.05, faults=Faults(error_500=0.2, drop=0.1), seed=7,
    )
    with Simulator(config) as sim:
        KeyManager([Key(k, base_url=sim.base_url, tpm=600_000) for k in keys])

        @stable(backoff=0.001, attempts=20)
        async def ask(prompt: str, client: openai.AsyncOpenAI) -> str:
            answer = await client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}],
                max_tokens=20,
            )
            return answer.choices[0].message.content or ""

        async def main() -> None:
            tasks = [asyncio.ensure_future(ask(str(i))) for i in range(40)]
            await asyncio.sleep(0.02)
            for task in tasks[::4]:
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            for index, result in enumerate(results):
                if index % 4:
                    assert result == echo_answer(str(index))
                else:
                    assert isinstance(result, asyncio.CancelledError)
            for state in KeyManager()._ring:
                for client in list(state.clients.get("async", {}).values()):  # type: ignore[attr-defined]
                    await client.close()

        asyncio.run(main())
        ring = KeyManager()._ring
        assert all(state.in_flight == 0 for state in ring)
        assert all(pool.in_flight == 0 and not pool.outstanding for pool in ring.pools())


# -- pacing ------------------------------------------------------------------------------------
def test_request_pacing_spaces_a_pool_to_its_rpm() -> None:
    clock = FakeClock()
    (key,) = made_up_keys(1)
    ring = KeyRing([Key(key, rpm=60)], clock=clock)
    first = ring.choose()
    assert first is not None
    ring.succeed(first)
    assert ring.choose() is None  # one request a second
    assert ring.next_ready_in() == pytest.approx(1.0)
    clock.advance(1.0)
    assert ring.choose() is not None


def test_token_pacing_charges_a_call_its_cost_when_it_ends() -> None:
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 400 + b'"}], "max_tokens": 50}'
    assert estimate_tokens(body) == 150
    levels = []
    for cost in (150.0, 30.0):  # as estimated; as the answer's usage corrected it
        clock = FakeClock()
        (key,) = made_up_keys(1)
        ring = KeyRing([Key(key, tpm=6000)], clock=clock)  # 100 tokens a second
        state = ring.choose()
        assert state is not None
        ring.sent(state)
        ring.succeed(state, cost)
        bucket = state.pool.token_bucket
        assert isinstance(bucket, Bucket)
        levels.append(bucket.level)
        if cost > 100:  # 50 tokens of debt to repay, then a full bucket (100) to gather
            assert ring.choose() is None
            assert ring.next_ready_in() == pytest.approx(1.5)
        else:
            assert ring.choose() is not None
    assert levels == [100 - 150, 100 - 30]


# -- fair waiting --------------------------------------------------------------------------------
def _fifo_attempt(
    order: list[int], index: int, ready: list[bool]
) -> Callable[[bool, float, Any], tuple[int | None, float]]:
    """A try that succeeds for the head once ``ready``; records who was served, in order."""

    def attempt(head: bool, budget: float, pick: Any) -> tuple[int | None, float]:
        if head and ready[0]:
            order.append(index)
            return index, 0.0
        return None, 3600.0 if head else budget

    return attempt


def _wait_until(predicate: Any) -> None:
    deadline = time.monotonic() + 10
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_waiting_threads_are_served_in_arrival_order() -> None:
    turns, lock = Turns(), threading.Lock()
    served: list[int] = []
    ready = [False]
    threads = []
    for index in range(6):
        attempt = _fifo_attempt(served, index, ready)
        thread = threading.Thread(
            target=wait_turn, args=(turns, lock, attempt, 7200.0), daemon=True
        )
        thread.start()
        _wait_until(lambda n=index: len(turns) == n + 1)
        threads.append(thread)
    with lock:
        ready[0] = True
        turns.notify()
    for thread in threads:
        thread.join(timeout=10)
    assert served == list(range(6))
    assert len(turns) == 0


def test_waiting_coroutines_are_served_in_arrival_order() -> None:
    turns, lock = Turns(), threading.Lock()
    served: list[int] = []
    ready = [False]

    async def main() -> list[tuple[int, float]]:
        tasks = []
        for index in range(6):
            attempt = _fifo_attempt(served, index, ready)
            tasks.append(asyncio.ensure_future(wait_turn_async(turns, lock, attempt, 7200.0)))
            while len(turns) < index + 1:
                await asyncio.sleep(0.001)
        with lock:
            ready[0] = True
            turns.notify()
        return await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)

    results = asyncio.run(main())
    assert [key for key, _ in results] == list(range(6))
    assert served == list(range(6))
    assert len(turns) == 0


def test_a_caller_that_gives_up_leaves_its_place_to_the_next() -> None:
    turns, lock = Turns(), threading.Lock()
    served: list[int] = []
    ready = [False]

    async def main() -> int:
        first = asyncio.ensure_future(
            wait_turn_async(turns, lock, _fifo_attempt(served, 0, ready), 7200.0)
        )
        second = asyncio.ensure_future(
            wait_turn_async(turns, lock, _fifo_attempt(served, 1, ready), 7200.0)
        )
        while len(turns) < 2:
            await asyncio.sleep(0.001)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert len(turns) == 1
        with lock:
            ready[0] = True
            turns.notify()
        key, _ = await asyncio.wait_for(second, timeout=10)
        return key

    assert asyncio.run(main()) == 1
    assert served == [1]
    assert len(turns) == 0


def test_a_new_caller_does_not_jump_the_queue() -> None:
    (key,) = made_up_keys(1)
    manager = KeyManager([key])
    manager.set_ttl(key, 3600)
    thread = threading.Thread(target=manager._acquire, args=(None, 7200.0), daemon=True)
    thread.start()
    _wait_until(lambda: len(manager._turns) == 1)
    with manager._lock:
        manager._ring.set_cooldown(manager._ring.find(key), 0)  # type: ignore[arg-type]
        assert manager._take() is None  # someone is waiting: they go first
        manager._notify()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture(autouse=True)
def _no_stray_clients() -> Iterator[None]:
    yield
    manager = KeyManager.current()
    if manager is not None:
        for state in manager._ring:
            client = state.clients.pop("sync", None)
            if isinstance(client, openai.OpenAI):
                client.close()


def test_close_leaves_the_users_own_http_client_open() -> None:
    """A key given ``client_options={"http_client": ...}`` is called through the user's
    client, which the user may use elsewhere: close() and aclose() drop the pooled clients
    on it without closing it; the library's own pooled clients are closed."""
    own_key, plain_key = made_up_keys(2, "own-http")
    with simulator([SimKey(own_key, project="a"), SimKey(plain_key, project="b")]) as sim:
        mine = openai.DefaultHttpxClient()
        mine_async = openai.DefaultAsyncHttpxClient()
        manager = KeyManager([
            Key(own_key, base_url=sim.base_url, client_options={"http_client": mine}),
            Key(plain_key, base_url=sim.base_url),
        ])

        @stable
        def ask(client: openai.OpenAI) -> str:
            reply = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
            )
            return str(reply.choices[0].message.content)

        for _ in range(4):  # both keys are used, each through its pooled client
            ask()
        ours = next(s.clients["sync"] for s in manager._ring if s.key == plain_key)
        manager.close()
        assert not mine.is_closed
        assert ours._client.is_closed  # type: ignore[attr-defined]
        mine.close()

        async def main() -> None:
            manager = KeyManager.create([
                Key(own_key, base_url=sim.base_url, client_options={"http_client": mine_async})
            ])

            @stable(manager=manager)
            async def ask_async(client: openai.AsyncOpenAI) -> None:
                await client.models.list()

            await ask_async()
            await manager.aclose()
            assert not mine_async.is_closed
            await mine_async.aclose()

        asyncio.run(main())


def test_asyncio_run_again_and_again_does_not_keep_a_loop_and_client_each_time() -> None:
    """Each asyncio.run() ends with its loop closed, and the loop's pooled async clients
    closed with it; they are then let go (they held their loops alive, and their sockets,
    until then)."""
    import gc
    import os

    (key,) = made_up_keys(1, "runs")
    with simulator([SimKey(key, project="a")]) as sim:
        KeyManager([Key(key, base_url=sim.base_url)])

        @stable
        async def ask(client: openai.AsyncOpenAI) -> str:
            return (await client.models.list()).data[0].id

        def descriptors() -> int:
            return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0

        asyncio.run(ask())
        before = descriptors()
        for _ in range(20):
            asyncio.run(ask())
        gc.collect()  # (an unclosed socket would be an error here: warnings are errors)
        # (type(), not isinstance(): older openai keeps lazy proxies whose __class__ imports)
        alive = [o for o in gc.get_objects() if type(o) is openai.AsyncOpenAI]
        assert len(alive) <= 2  # the last loop's, at most one more
        assert descriptors() - before <= 6  # 20 runs kept 40 before


def test_keys_that_leave_close_their_pooled_clients() -> None:
    """delete_key(), a reconfiguration without the key, and KeyManager.reset() close the
    pooled clients of the keys that leave (they were dropped unclosed: ResourceWarning)."""
    first, second, third = made_up_keys(3, "leave")
    with simulator([SimKey(k, project=k[-4:]) for k in (first, second, third)]) as sim:
        KeyManager([Key(k, base_url=sim.base_url) for k in (first, second, third)])

        @stable
        def ask(client: openai.OpenAI) -> str:
            return client.models.list().data[0].id

        for _ in range(6):
            ask()
        clients = {s.key: s.clients["sync"] for s in KeyManager()._ring}
        assert len(clients) == 3
        KeyManager().delete_key(first)
        assert clients[first]._client.is_closed  # type: ignore[attr-defined]
        KeyManager([Key(third, base_url=sim.base_url)])  # second leaves
        assert clients[second]._client.is_closed  # type: ignore[attr-defined]
        assert not clients[third]._client.is_closed  # type: ignore[attr-defined]
        KeyManager.reset()
        assert clients[third]._client.is_closed  # type: ignore[attr-defined]


def test_close_during_traffic_fails_no_call_and_closes_every_client_it_let_go() -> None:
    """close() from one thread while others call through pooled clients: no call fails
    ('client has been closed') or hangs on a socket closed under it; the client a call was
    holding when close() ran is closed once its key has no call in flight, and new calls
    get a new client."""
    keys = made_up_keys(2, "busy")
    config = SimulatorConfig(
        keys=tuple(SimKey(k, project=k[-4:]) for k in keys), window=1.0, latency=0.02
    )
    with Simulator(config) as sim:
        KeyManager([Key(k, base_url=sim.base_url) for k in keys])
        seen: list[openai.OpenAI] = []
        errors: list[BaseException] = []
        inside, gate = threading.Event(), threading.Event()
        held: list[openai.OpenAI] = []

        @stable
        def ask(client: openai.OpenAI) -> str:
            seen.append(client)
            if not inside.is_set():  # the first call holds its client across close()
                held.append(client)
                inside.set()
                gate.wait(10)
            return client.models.list().data[0].id

        def worker() -> None:
            for _ in range(6):
                try:
                    ask()
                except BaseException as exc:  # the test reports it
                    errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for thread in threads:
            thread.start()
        assert inside.wait(10)
        KeyManager().close()  # while that call holds its client, and others run
        gate.set()
        time.sleep(0.05)
        KeyManager().close()
        for thread in threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        current = {id(s.clients.get("sync")) for s in KeyManager()._ring}
        let_go = {id(c): c for c in seen if id(c) not in current}
        assert id(held[0]) in let_go  # close() let it go while a call used it ...
        assert all(c._client.is_closed for c in let_go.values())  # type: ignore[attr-defined]
        KeyManager().close()  # ... and every client it let go is closed by now


def test_a_key_given_again_with_another_base_url_calls_there() -> None:
    """KeyManager([Key(k, base_url=new)]) and add_keys() with new settings for a key already
    present: the next calls go to the new endpoint (they kept going to the old one)."""
    (key,) = made_up_keys(1, "moved")
    with simulator([SimKey(key, project="a")]) as old, simulator(
        [SimKey(key, project="a")]
    ) as new:
        KeyManager([Key(key, base_url=old.base_url)])

        @stable
        def ask(client: openai.OpenAI) -> str:
            return client.models.list().data[0].id

        ask()
        KeyManager([Key(key, base_url=new.base_url)])
        ask()
        KeyManager().add_keys([Key(key, base_url=old.base_url)])
        ask()
        served = [sim.stats()["totals"]["requests"] for sim in (old, new)]
        assert served == [2, 1]
        KeyManager().close()


def test_close_while_async_calls_are_in_flight_fails_none_of_them() -> None:
    """close() lets the running loop's async clients go without closing them under calls
    still using them: they close when their loop shuts down."""
    (key,) = made_up_keys(1, "abusy")
    config = SimulatorConfig(keys=(SimKey(key, project="a"),), window=1.0, latency=0.1)
    with Simulator(config) as sim:
        manager = KeyManager([Key(key, base_url=sim.base_url)])

        @stable
        async def ask(client: openai.AsyncOpenAI) -> str:
            return (await client.models.list()).data[0].id

        async def main() -> list[Any]:
            calls = [asyncio.ensure_future(ask()) for _ in range(6)]
            await asyncio.sleep(0.03)  # their requests are out
            manager.close()
            return await asyncio.gather(*calls, return_exceptions=True)

        results = asyncio.run(main())
        assert all(isinstance(result, str) for result in results), results


def test_timeout_bounds_each_request_of_a_pooled_client() -> None:
    """The server takes 1 s to answer: a call with timeout=0.3 gets its request cut by the
    pooled client (openai's own timeout, given what is left of the call's), sync and async,
    and raises CallTimeoutError — while a call without a timeout gets its answer."""
    (key,) = made_up_keys(1, "deadline")
    config = SimulatorConfig(keys=(SimKey(key, project="a"),), window=1.0, latency=1.0)
    with Simulator(config) as sim:
        KeyManager([Key(key, base_url=sim.base_url)])

        @stable(timeout=0.3)
        def ask(client: openai.OpenAI) -> str:
            return client.models.list().data[0].id

        @stable(timeout=0.3)
        async def ask_async(client: openai.AsyncOpenAI) -> str:
            return (await client.models.list()).data[0].id

        @stable
        def patient(client: openai.OpenAI) -> str:
            return client.models.list().data[0].id

        with pytest.raises(CallTimeoutError) as caught:
            ask()
        assert isinstance(caught.value.__cause__, openai.APITimeoutError)

        async def main() -> None:
            with pytest.raises(CallTimeoutError):
                await ask_async()
            await KeyManager().aclose()

        asyncio.run(main())
        assert isinstance(patient(), str)
        assert sum(r["in_flight"] for r in KeyManager().stats()) == 0


def test_pooled_clients_of_many_keys_share_one_set_of_tls_settings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Loading the certificate authorities is nearly all a pooled client costs (~50 ms and
    ~0.85 MiB each): the clients of six keys, sync and async, make one SSL context in all —
    before, one each (``benchmarks/many_keys.py`` measures the difference)."""
    import ssl

    from stable_openai import _clients

    made: list[object] = []
    original = ssl.SSLContext.__new__

    def counted(cls: type, *args: Any, **kwargs: Any) -> Any:
        made.append(cls)
        return original(cls, *args, **kwargs)

    keys = made_up_keys(6, "tls")
    config = SimulatorConfig(keys=tuple(SimKey(key, project=key[-4:]) for key in keys))
    with Simulator(config) as sim:
        KeyManager([Key(key, base_url=sim.base_url) for key in keys])
        monkeypatch.setattr(ssl.SSLContext, "__new__", staticmethod(counted))
        monkeypatch.setattr(_clients, "_tls", None)

        @stable
        def ask(client: openai.OpenAI) -> str:
            return client.models.list().data[0].id

        @stable
        async def ask_async(client: openai.AsyncOpenAI) -> str:
            return (await client.models.list()).data[0].id

        for _ in keys:
            ask()

        async def main() -> None:
            for _ in keys:
                await ask_async()
            await KeyManager().aclose()

        asyncio.run(main())
        assert all(row["successes"] == 2 for row in KeyManager().stats())
        assert len(made) == 1


def _three_requests_a_call(sim: Simulator, *, is_async: bool, calls: int = 24) -> list[Any]:
    """``calls`` calls of a function that makes three requests through its pooled client, from
    8 threads (or as many coroutines at a time): the answers, or the errors."""
    if is_async:
        @stable(max_wait=60)
        async def job_async(index: int, client: openai.AsyncOpenAI) -> list[str]:
            parts = []
            for part in range(3):
                answer = await client.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"{index}.{part}"}])
                parts.append(answer.choices[0].message.content or "")
            return parts

        async def main() -> list[Any]:
            gate = asyncio.Semaphore(8)

            async def one(index: int) -> Any:
                async with gate:
                    return await job_async(index)

            results = await asyncio.gather(*(one(i) for i in range(calls)),
                                           return_exceptions=True)
            await KeyManager().aclose()
            return list(results)

        return asyncio.run(main())

    @stable(max_wait=60)
    def job(index: int, client: openai.OpenAI) -> list[str]:
        parts = []
        for part in range(3):
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": f"{index}.{part}"}])
            parts.append(answer.choices[0].message.content or "")
        return parts

    results: list[Any] = [None] * calls

    def worker(first: int) -> None:
        for index in range(first, calls, 8):
            try:
                results[index] = job(index)
            except Exception as exc:
                results[index] = exc

    threads = [threading.Thread(target=worker, args=(first,)) for first in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_several_requests_a_call_are_paced_per_request_under_a_rate_limit(
    is_async: bool,
) -> None:
    """24 calls of 3 requests each, 8 at a time, on one key of 10 requests a second: each
    request spends the pool's budget (the pooled client sees them all), so every call
    succeeds and few requests are repeated.  Before: the budget was spent once a call — 1,600
    requests, 720 of them 429s, and every call failed."""
    (key,) = made_up_keys(1, "multi")
    config = SimulatorConfig(keys=(SimKey(key, project="p"),),
                             projects={"p": ProjectLimits(rpm=10)}, window=1.0, latency=0.02)
    with Simulator(config) as sim:
        KeyManager([Key(key, base_url=sim.base_url)])
        results = _three_requests_a_call(sim, is_async=is_async)
        assert all(isinstance(result, list) for result in results), results
        assert [result[0] for result in results] == [f"echo: {i}.0" for i in range(24)]
        totals = sim.stats()["totals"]
        # 72 requests are needed; a 429 repeats at most the two requests before it.
        assert totals["ok"] <= 72 + 2 * totals["rate_limited"]
        assert totals["rate_limited"] <= 8, totals


# -- the model of a call, from its request's body --------------------------------------------
@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_pooled_clients_call_is_held_and_paced_by_the_model_its_body_names(
    is_async: bool,
) -> None:
    """A function taking ``client`` and no ``model`` argument, on one key whose project
    allows gpt-4o one request a second and gpt-4o-mini plenty: the model is read from each
    call's request body, so once the key has served both, gpt-4o's 429 holds and paces
    gpt-4o only — the key stays ready for gpt-4o-mini — and the next gpt-4o calls wait for
    their slot in its pace (in the hook, before the request leaves).  Before, the 429 paced
    the whole pool and cooled the key for both models."""
    import time
    (key,) = made_up_keys(1, "bodymodel")
    limits = ProjectLimits(per_model=(ModelLimits(("gpt-4o",), rpm=1),
                                      ModelLimits(("gpt-4o-mini",), rpm=1000)))
    config = SimulatorConfig(keys=(SimKey(key, project="p"),), projects={"p": limits},
                             window=1.0, latency=0.0)

    def chat(name: str) -> dict[str, Any]:
        return {"model": name, "messages": [{"role": "user", "content": name}]}

    @stable(max_wait=10)
    def ask(name: str, client: openai.OpenAI) -> str:
        answer = client.chat.completions.create(**chat(name))
        return str(answer.choices[0].message.content)

    @stable(max_wait=10)
    async def ask_async(name: str, client: openai.AsyncOpenAI) -> str:
        answer = await client.chat.completions.create(**chat(name))
        return str(answer.choices[0].message.content)

    with Simulator(config) as sim:
        manager = KeyManager([Key(key, base_url=sim.base_url)])

        def call(name: str) -> str:
            return asyncio.run(ask_async(name)) if is_async else ask(name)

        def rate_limited() -> int:
            return int(sim.stats()["totals"]["rate_limited"])

        assert call("gpt-4o-mini") == "echo: gpt-4o-mini"
        assert call("gpt-4o") == "echo: gpt-4o"  # the key has served both models
        assert call("gpt-4o") == "echo: gpt-4o"  # a 429 (1 a second), held, then served
        assert rate_limited() == 1
        (seen,) = manager.stats()
        assert seen["state"] == "ready" and seen["rate_limits"] == 1  # not the key: the model
        assert call("gpt-4o-mini") == "echo: gpt-4o-mini"
        for _ in range(2):  # each waits for its slot in gpt-4o's pace (1 s / 0.97)
            began = time.monotonic()
            assert call("gpt-4o") == "echo: gpt-4o"
            assert time.monotonic() - began > 0.8  # (behaviour: it waited in the hook)
        (seen,) = manager.stats()
        assert seen["state"] == "ready"


def _one_key_two_models(tag: str, gpt_4o_rpm: int) -> tuple[str, SimulatorConfig]:
    """A made-up key whose project allows gpt-4o ``gpt_4o_rpm`` requests a second, beside
    plenty of gpt-4o-mini; the simulator's config for it."""
    (key,) = made_up_keys(1, tag)
    limits = ProjectLimits(per_model=(ModelLimits(("gpt-4o",), rpm=gpt_4o_rpm),
                                      ModelLimits(("gpt-4o-mini",), rpm=1000)))
    return key, SimulatorConfig(keys=(SimKey(key, project="p"),), projects={"p": limits},
                                window=1.0, latency=0.0)


@stable(max_wait=10)
def _ask_model(name: str, client: openai.OpenAI) -> str:
    answer = client.chat.completions.create(
        model=name, messages=[{"role": "user", "content": name}])
    return str(answer.choices[0].message.content)


@pytest.mark.parametrize("is_async", [False, True], ids=["sync", "async"])
def test_a_pooled_clients_answers_hold_their_model_once_its_headers_show_it_spent(
    is_async: bool,
) -> None:
    """One key whose project allows gpt-4o two requests a second beside gpt-4o-mini: once
    the key has served both, each answer's headers tell gpt-4o's budget there, and the
    answer that shows it spent holds gpt-4o for one request's refill (half a second) and
    paces it — the next gpt-4o call waits in the hook instead of meeting a 429 (before: a
    429, then held), and gpt-4o-mini goes on at once."""
    import time
    key, config = _one_key_two_models("modelheaders", gpt_4o_rpm=2)
    ask = _ask_model

    @stable(max_wait=10)
    async def ask_async(name: str, client: openai.AsyncOpenAI) -> str:
        answer = await client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": name}])
        return str(answer.choices[0].message.content)

    with Simulator(config) as sim:
        manager = KeyManager([Key(key, base_url=sim.base_url)])

        def call(name: str) -> str:
            return asyncio.run(ask_async(name)) if is_async else ask(name)

        assert call("gpt-4o-mini") == "echo: gpt-4o-mini"
        time.sleep(1.0)  # gpt-4o's bucket is empty again
        assert call("gpt-4o") == "echo: gpt-4o"  # the key has served both models
        began = time.monotonic()
        assert call("gpt-4o") == "echo: gpt-4o"  # its headers: none left
        state = manager._ring.find(key)
        assert state is not None
        assert manager._ring.lane_held(state, "gpt-4o") > 0
        assert manager._ring.lane_held(state, "gpt-4o-mini") == 0
        assert call("gpt-4o-mini") == "echo: gpt-4o-mini"
        assert call("gpt-4o") == "echo: gpt-4o"  # waited for its slot, then served
        assert time.monotonic() - began > 0.4  # (behaviour: it waited in the hook)
        assert sim.stats()["totals"]["rate_limited"] == 0


def test_a_models_day_spent_in_a_pool_of_two_models_raises_at_once_not_after_a_refill(
) -> None:
    """gpt-4o's day (3 requests, beside plenty of gpt-4o-mini) is spent: the answer of its
    third request shows the day's budget, none left, a refill 480 s away — that paces
    nothing (a minute's reset is never so far), so the next gpt-4o call meets the server's
    per-day 429 and raises ``AllKeysCoolingError`` at once, as a program needs.  (Found by
    the daily benchmark: the model was held 480 s as a minute's limit, and the call waited
    for it; here its 5-s timeout makes it raise, but not for a day's hold.)"""
    (key,) = made_up_keys(1, "modelday")
    limits = ProjectLimits(per_model=(ModelLimits(("gpt-4o",), rpm=100, rpd=3),
                                      ModelLimits(("gpt-4o-mini",), rpm=1000)))
    config = SimulatorConfig(keys=(SimKey(key, project="p"),), projects={"p": limits},
                             window=1.0, latency=0.0)

    @stable(max_wait=1000, timeout=5)
    def ask(model: str, client: openai.OpenAI) -> str:
        answer = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": model}])
        return str(answer.choices[0].message.content)

    with Simulator(config) as sim:
        KeyManager([Key(key, base_url=sim.base_url)])
        for model in ("gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o", "gpt-4o"):
            assert ask(model) == f"echo: {model}"
        with pytest.raises(AllKeysCoolingError) as raised:
            ask("gpt-4o")
        assert raised.value.reasons == {"gpt-4o held (429, per day)": 1}
        assert raised.value.retry_after > 100  # the server's wait for the day's refill
        assert ask("gpt-4o-mini") == "echo: gpt-4o-mini"


def test_a_users_own_backend_written_to_the_protocol_keeps_working_with_pooled_clients(
) -> None:
    """A backend a user wrote by subclassing ``StateBackend``, overriding ``answered(state,
    budget)`` as documented: pooled calls of two models run through it, and an answer that
    shows a model's requests spent reaches the protocol's ``pace_lane`` (here its default,
    which does nothing) — the manager passes nothing it does not declare.  (Found by a
    review: the first version of model pacing passed ``answered`` a third argument.)"""
    from stable_openai._budget import ServerBudget
    from stable_openai._ring import KeyState
    from stable_openai.backends import StateBackend

    class Mine(StateBackend):
        shared = False

        def __init__(self) -> None:
            self.budgets: list[ServerBudget | None] = []

        def answered(self, state: KeyState, budget: ServerBudget | None) -> None:
            self.budgets.append(budget)

    key, config = _one_key_two_models("ownbackend", gpt_4o_rpm=1)
    mine = Mine()
    with Simulator(config) as sim:
        KeyManager([Key(key, base_url=sim.base_url)], backend=mine)
        for name in ("gpt-4o-mini", "gpt-4o", "gpt-4o-mini", "gpt-4o"):
            assert _ask_model(name) == f"echo: {name}"
    assert len(mine.budgets) >= 4
    assert any(budget is not None and budget.requests_left == 0 for budget in mine.budgets)


def test_a_429s_budget_headers_hold_the_pool_until_their_reset() -> None:
    """Someone the library does not see spends the key's bucket (10 a second); the pooled
    client's call meets a 429 to try again in 100 ms, whose headers say the bucket is empty
    only in about a second: the pool is held for that second (before: for the 100 ms, and
    processes sharing a key unseen retried into a server that counts rejected requests)."""
    (key,) = made_up_keys(1, "spent429")
    config = SimulatorConfig(keys=(SimKey(key, project="p"),),
                             projects={"p": ProjectLimits(rpm=10)}, window=1.0, latency=0.0)
    with Simulator(config) as sim:
        manager = KeyManager([Key(key, base_url=sim.base_url)])
        unseen = openai.OpenAI(api_key=key, base_url=sim.base_url, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            for _ in range(20):
                unseen.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "x"}])

        @stable(max_wait=0)
        def ask(client: openai.OpenAI) -> str:
            answer = client.chat.completions.create(
                model="gpt-4o-mini", messages=[{"role": "user", "content": "y"}])
            return str(answer.choices[0].message.content)

        with pytest.raises((openai.RateLimitError, AllKeysCoolingError)):
            ask()
        (seen,) = manager.stats()
        assert seen["rate_limits"] == 1
        assert seen["seconds_left"] > 0.5, seen
        unseen.close()


def test_a_429_holds_the_model_of_the_request_it_answered_and_each_request_waits_for_its_own(
) -> None:
    """A call that asks gpt-4o-mini, then gpt-4o (one a second on this key): gpt-4o's 429
    holds gpt-4o, the model of the request it answered — not gpt-4o-mini, the call's first
    — and when the call runs again, its gpt-4o request waits in the hook for the hold
    instead of meeting a second 429; the key stays ready throughout."""
    (key,) = made_up_keys(1, "lastmodel")
    limits = ProjectLimits(per_model=(ModelLimits(("gpt-4o",), rpm=1),
                                      ModelLimits(("gpt-4o-mini",), rpm=1000)))
    config = SimulatorConfig(keys=(SimKey(key, project="p"),), projects={"p": limits},
                             window=1.0, latency=0.0)

    def chat(client: openai.OpenAI, name: str) -> str:
        answer = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": name}])
        return str(answer.choices[0].message.content)

    @stable(max_wait=10)
    def one(name: str, client: openai.OpenAI) -> str:
        return chat(client, name)

    @stable(max_wait=10)
    def both(client: openai.OpenAI) -> list[str]:
        return [chat(client, "gpt-4o-mini"), chat(client, "gpt-4o")]

    with Simulator(config) as sim:
        manager = KeyManager([Key(key, base_url=sim.base_url)])
        assert one("gpt-4o-mini") == "echo: gpt-4o-mini"
        assert one("gpt-4o") == "echo: gpt-4o"  # the key has served both models
        assert both() == ["echo: gpt-4o-mini", "echo: gpt-4o"]  # a 429, held, then served
        assert sim.stats()["totals"]["rate_limited"] == 1
        (seen,) = manager.stats()
        assert seen["state"] == "ready" and seen["rate_limits"] == 1
        state = manager._ring.find(key)
        assert state is not None
        assert manager._owner.lane_held(state, "gpt-4o-mini") == 0
