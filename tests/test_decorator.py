"""@stable around plain, async and streaming functions that raise real ``openai`` errors."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import openai
import pytest
import wire
from wire import made_up_keys

from stable_openai import (
    AllKeysCoolingError,
    AllKeysDisabledError,
    CallTimeoutError,
    KeyManager,
    StableOpenAIError,
    stable,
)
from stable_openai._model import BLIND_FIRST, MIXED

KEYS = made_up_keys(3)
A, B, C = KEYS


def row(key: str) -> dict[str, Any]:
    masked = f"{key[:3]}…{key[-4:]}"
    return next(r for r in KeyManager().stats() if r["key"] == masked)


def failing_on(
    failures: dict[str, Callable[[], BaseException]],
) -> tuple[Callable[..., str], list[str]]:
    """A function that raises the scripted error for some keys and echoes otherwise."""
    used: list[str] = []

    def ask(prompt: str, api_key: str) -> str:
        used.append(api_key)
        if api_key in failures:
            raise failures[api_key]()
        return f"echo: {prompt}"

    return ask, used


# -- decoration ---------------------------------------------------------------------------------
def test_bare_and_called_forms_keep_name_doc_and_signature() -> None:
    def ask(prompt: str, api_key: str) -> str:
        """Ask."""
        return prompt

    for decorated in (stable(ask), stable()(ask), stable(attempts=3)(ask)):
        assert decorated.__name__ == "ask"
        assert decorated.__doc__ == "Ask."
        # As its callers see it: without the api_key the decorator passes.
        assert str(inspect.signature(decorated)) == "(prompt: 'str') -> 'str'"
        inspect.signature(decorated).bind("hi")


def test_the_signature_leaves_out_what_the_decorator_passes() -> None:
    def pooled(prompt: str, client: Any) -> str:
        return prompt

    def both(prompt: str, client: Any, api_key: str) -> str:
        return prompt

    def loose(prompt: str, **kwargs: Any) -> str:
        return prompt

    def shown(func: Any) -> list[str]:
        return [str(param) for param in inspect.signature(stable(func)).parameters.values()]

    # (Annotations are strings here: from __future__ import annotations.)
    assert shown(pooled) == ["prompt: 'str'"]
    # A caller may pass its own client to a function that takes api_key too.
    assert shown(both) == ["prompt: 'str'", "client: 'Any' = None"]
    assert shown(loose) == ["prompt: 'str'", "**kwargs: 'Any'"]


def test_function_without_api_key_is_a_type_error_that_says_what_to_add() -> None:
    def ask(prompt: str) -> str:
        return prompt

    with pytest.raises(TypeError, match="api_key"):
        stable(ask)


def test_kwargs_instead_of_api_key_is_accepted() -> None:
    KeyManager(KEYS)

    @stable
    def ask(prompt: str, **kwargs: Any) -> str:
        return str(kwargs["api_key"] in KEYS)

    assert ask("x") == "True"


def test_positional_only_api_key_is_rejected() -> None:
    def ask(api_key: str, /) -> str:
        return api_key

    with pytest.raises(TypeError, match="keyword"):
        stable(ask)


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"attempts": 0}, ValueError),
        ({"attempts": 1.5}, TypeError),
        ({"attempts": True}, TypeError),
        ({"max_wait": -1}, ValueError),
        ({"cooldown": "20"}, TypeError),
        ({"quota_cooldown": float("nan")}, ValueError),
        ({"manager": "not a manager"}, TypeError),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="stable"):
        stable(**options)


def test_options_go_by_keyword() -> None:
    with pytest.raises(TypeError, match="keyword"):
        stable(5)  # type: ignore[call-overload]


def test_caller_may_not_pass_api_key() -> None:
    KeyManager(KEYS)
    ask = stable(failing_on({})[0])
    with pytest.raises(TypeError, match="chooses the key itself"):
        ask("x", api_key=A)


def test_without_keys_the_error_says_how_to_configure(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEYS", raising=False)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    ask = stable(failing_on({})[0])
    with pytest.raises(StableOpenAIError, match="OPENAI_API_KEYS"):
        ask("x")


@pytest.mark.parametrize(
    "written",
    [
        "{a},{b}", "{a}, {b}", "{a} {b}", "{a};{b}", "{a}; {b}", " {a}\n{b} ",
        '["{a}", "{b}"]', "'[\"{a}\", \"{b}\"]'", '"{a},{b}"', "'{a} {b}'", '"{a}","{b}"',
    ],
)
def test_keys_from_the_environment_are_read_as_people_write_them(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    """Separated by commas, semicolons or spaces, a JSON list, quoted whole or key by key
    (docker --env-file keeps quotes): quotes and brackets are never taken for key text."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEYS", written.format(a=A, b=B))
    assert sorted(KeyManager().data) == sorted([A, B])


@pytest.mark.parametrize("written", ['["{a}", ', '[1, 2]', '{{"key": "{a}"}}'])
def test_a_malformed_key_list_in_the_environment_says_so_without_showing_a_key(
    monkeypatch: pytest.MonkeyPatch, written: str
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_API_KEYS", written.format(a=A))
    with pytest.raises(ValueError, match="OPENAI_API_KEYS") as info:
        KeyManager()
    assert A not in str(info.value)


# -- the failure table --------------------------------------------------------------------------
def test_rate_limited_key_is_cooled_for_the_server_delay_and_the_call_moves_on() -> None:
    KeyManager([A, B])
    ask, used = failing_on({A: lambda: wire.rate_limited("20s", {"retry-after-ms": "7000"})})
    assert stable(ask)("hi") == "echo: hi"
    assert used == [A, B]
    assert row(A)["state"] == "cooling"
    assert 6 < row(A)["seconds_left"] <= 7
    assert row(A)["rate_limits"] == 1
    assert row(B)["successes"] == 1


def test_rate_limit_without_hints_uses_the_message_then_a_backoff() -> None:
    KeyManager([A, B, C])
    ask, _ = failing_on({A: lambda: wire.rate_limited("1m2.5s")})
    stable(ask)("hi")
    assert 62 < row(A)["seconds_left"] <= 62.5
    bare = wire.status_error(429, {"message": "slow down", "code": "rate_limit_exceeded"})
    ask, used = failing_on({C: lambda: bare})
    stable(cooldown=33)(ask)("hi")
    assert used == [C, B]  # least recently used first
    assert 0.5 < row(C)["seconds_left"] <= BLIND_FIRST  # a first backoff, not the 33 s


def test_cooling_again_keeps_the_later_deadline() -> None:
    KeyManager([A])
    barrier = threading.Barrier(2)
    delays = iter(["50s", "1s"])
    lock = threading.Lock()

    @stable(max_wait=0.5)
    def ask(api_key: str) -> str:
        barrier.wait(timeout=10)  # two calls in flight on the one key
        with lock:
            delay = next(delays)
        raise wire.rate_limited(delay)

    errors: list[BaseException] = []

    def run() -> None:
        try:
            ask()
        except AllKeysCoolingError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(errors) == 2
    assert row(A)["seconds_left"] > 40
    assert row(A)["rate_limits"] == 2


def test_keys_whose_429s_name_one_organization_are_cooled_together() -> None:
    KeyManager(KEYS)
    ask, used = failing_on({
        A: lambda: wire.rate_limited("30s", organization="org-shared"),
        B: lambda: wire.rate_limited("5s", organization="org-shared"),
    })
    assert stable(ask)("hi") == "echo: hi"
    assert used == [A, B, C]
    rows = {r["key"]: r for r in KeyManager().stats()}
    pooled = [r for r in rows.values() if r["pool"] == "org-shared"]
    assert len(pooled) == 2
    assert 25 < row(A)["seconds_left"] <= 30
    assert 4 < row(B)["seconds_left"] <= 5
    manager = KeyManager()
    manager.set_ttl(A, 0)
    manager.set_ttl(B, 0)
    ask, used = failing_on({
        A: lambda: wire.rate_limited("50s", organization="org-shared"), C: wire.revoked,
    })
    with pytest.raises(AllKeysCoolingError):
        stable(max_wait=1)(ask)("again")
    assert used == [C, A]  # B was never tried: a rate limit on A cools B, its pool-mate
    # (At least for the 429's 50 s; here longer, for the pool's pace: one call per 30 s
    # / 0.97 from A's first 429, whose restarted pace A's call ran on credit.)
    assert row(B)["seconds_left"] > 45
    assert row(B)["seconds_left"] == pytest.approx(row(A)["seconds_left"], abs=0.5)


def test_request_too_large_everywhere_is_raised_after_one_try_per_pool_keys_untouched() -> None:
    KeyManager([A, B])
    error = wire.too_large()
    ask, used = failing_on({A: lambda: error, B: lambda: error})
    with pytest.raises(openai.RateLimitError) as caught:
        stable(ask)("hi")
    assert caught.value is error
    assert sorted(used) == sorted([A, B])  # each key's project once: its limit may be larger
    assert all(r["state"] == "ready" for r in KeyManager().stats())


@pytest.mark.parametrize("error", [wire.too_large, wire.model_not_found])
def test_a_request_one_project_cannot_take_goes_to_another_projects_key(
    error: Callable[[], BaseException],
) -> None:
    """A 429 "Request too large" (a low TPM limit) or a 404 model_not_found (model access)
    belongs to the key's project: the call moves to a key of another project — not to the
    failing key's pool-mates, which would answer the same — and no key is penalised."""
    from stable_openai import Key

    KeyManager([Key(A, pool="team"), Key(B, pool="team"), C])
    ask, used = failing_on({A: error, B: error})
    assert stable(ask)("hi") == "echo: hi"
    assert used[-1] == C and len(used) == 2  # A or B, then C
    assert all(r["state"] == "ready" for r in KeyManager().stats())


def test_no_quota_benches_the_key_long_and_the_call_moves_on() -> None:
    KeyManager([A, B])
    ask, used = failing_on({A: wire.no_quota})
    assert stable(quota_cooldown=7200)(ask)("hi") == "echo: hi"
    assert used == [A, B]
    assert 7100 < row(A)["seconds_left"] <= 7200
    assert row(A)["reason"] == "no quota (429 insufficient_quota)"


def test_revoked_key_is_disabled_once_with_one_masked_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    KeyManager([A, B])
    ask, used = failing_on({A: wire.revoked})
    decorated = stable(ask)
    with caplog.at_level(logging.DEBUG, logger="stable_openai"):
        for _ in range(6):
            assert decorated("hi") == "echo: hi"
    assert used.count(A) == 1
    assert row(A)["state"] == "disabled"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].name == "stable_openai"
    assert "sk-…" in warnings[0].getMessage()
    assert A not in caplog.text


def test_revoked_key_comes_back_when_keys_are_reconfigured() -> None:
    KeyManager([A, B])
    ask, _ = failing_on({A: wire.revoked})
    stable(ask)("hi")
    assert row(A)["state"] == "disabled"
    KeyManager([A, B])
    assert row(A)["state"] == "ready"


def test_forbidden_key_is_benched_and_every_key_forbidden_raises_the_403() -> None:
    KeyManager([A, B])
    ask, used = failing_on({A: wire.forbidden})
    assert stable(ask)("hi") == "echo: hi"
    assert 590 < row(A)["seconds_left"] <= 600
    KeyManager.reset()
    KeyManager([A, B])
    ask, used = failing_on({A: wire.forbidden, B: wire.forbidden})
    with pytest.raises(openai.PermissionDeniedError):
        stable(ask)("hi")
    assert sorted(used) == [A, B]


@pytest.mark.parametrize(
    "make",
    [
        lambda: wire.server_error(500),
        lambda: wire.server_error(503),
        lambda: wire.status_error(408, {"message": "timeout"}),
        lambda: wire.status_error(409, {"message": "conflict"}),
        wire.connection_error,
        wire.timeout_error,
    ],
)
def test_transient_errors_back_off_and_retry_on_another_key(make: Callable[[], Exception]) -> None:
    KeyManager([A, B])
    ask, used = failing_on({A: make})
    assert stable(backoff=0.001)(ask)("hi") == "echo: hi"
    assert used == [A, B]
    assert row(A)["state"] == "ready"
    assert row(A)["failures"] == 1


def test_transient_errors_on_the_only_key_are_retried_on_it() -> None:
    KeyManager([A])
    calls = Counter[str]()

    @stable(backoff=0.001)
    def ask(api_key: str) -> str:
        calls[api_key] += 1
        if calls[api_key] < 3:
            raise wire.server_error(502)
        return "ok"

    assert ask() == "ok"
    assert calls[A] == 3


@pytest.mark.parametrize(
    "make",
    [
        wire.bad_request,
        lambda: wire.bad_request(404),
        lambda: wire.bad_request(422),
        lambda: ValueError("user bug"),
        lambda: KeyError("x"),
    ],
)
def test_caller_errors_are_raised_at_once_unchanged(make: Callable[[], Exception]) -> None:
    KeyManager([A, B])
    error = make()
    ask, used = failing_on({A: lambda: error, B: lambda: error})
    with pytest.raises(type(error)) as caught:
        stable(ask)("hi")
    assert caught.value is error
    assert len(used) == 1
    assert all(r["state"] == "ready" for r in KeyManager().stats())


def test_when_attempts_run_out_the_last_real_exception_is_raised() -> None:
    KeyManager([A])
    errors = [wire.server_error(500), wire.server_error(503)]
    count = 0

    @stable(attempts=2, backoff=0.001)
    def ask(api_key: str) -> str:
        nonlocal count
        count += 1
        raise errors[count - 1]

    with pytest.raises(openai.InternalServerError) as caught:
        ask()
    assert caught.value is errors[1]


def test_rate_limits_do_not_use_up_attempts() -> None:
    KeyManager([A])
    calls = 0

    @stable(attempts=1, max_wait=10)
    def ask(api_key: str) -> str:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise wire.rate_limited("10ms")
        return "ok"

    assert ask() == "ok"
    assert calls == 4


def test_a_server_saying_retry_in_zero_cannot_make_a_call_spin() -> None:
    KeyManager([A, B])
    calls = 0

    @stable(max_wait=0.2)
    def ask(api_key: str) -> str:
        nonlocal calls
        calls += 1
        raise wire.rate_limited("0s", {"retry-after-ms": "0"})

    # Out of time: the last 429 itself, or (while waiting for a key) the library's error.
    with pytest.raises((AllKeysCoolingError, openai.RateLimitError)) as caught:
        ask()
    if isinstance(caught.value, AllKeysCoolingError):
        assert isinstance(caught.value.__cause__, openai.RateLimitError)
    assert calls < 200  # each key cooled at least 10 ms per rate limit, over a 0.2 s budget


def test_every_key_disabled_is_a_library_error_with_count_and_reason() -> None:
    KeyManager([A, B])
    ask, _ = failing_on({A: wire.revoked, B: wire.revoked})
    with pytest.raises(AllKeysDisabledError) as caught:
        stable(ask)("hi")
    assert isinstance(caught.value, openai.OpenAIError)
    assert "all 2" in str(caught.value)
    assert "401" in str(caught.value)
    assert isinstance(caught.value.__cause__, openai.AuthenticationError)
    with pytest.raises(AllKeysDisabledError):  # later calls fail at once, nothing is tried
        stable(failing_on({})[0])("hi")


def test_every_key_cooling_past_the_budget_carries_retry_after() -> None:
    KeyManager([A, B])
    ask, used = failing_on(
        {A: lambda: wire.rate_limited("30s"), B: lambda: wire.rate_limited("40s")}
    )
    with pytest.raises(AllKeysCoolingError) as caught:
        stable(max_wait=5)(ask)("hi")
    assert 29 < caught.value.retry_after <= 30
    assert isinstance(caught.value, openai.OpenAIError)
    assert len(used) == 2


def test_a_short_cooldown_is_waited_out_within_the_budget() -> None:
    KeyManager([A])
    calls = 0

    @stable(max_wait=10)
    def ask(api_key: str) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise wire.rate_limited("50ms")
        return "ok"

    assert ask() == "ok"
    assert calls == 2


@pytest.mark.parametrize("empty", [None, "", 0, []])
def test_an_empty_answer_is_an_answer_not_a_retry(empty: object) -> None:
    KeyManager(KEYS)
    calls = 0

    @stable
    def ask(api_key: str) -> object:
        nonlocal calls
        calls += 1
        return empty

    assert ask() == empty
    assert calls == 1


def test_the_key_that_failed_is_the_key_benched_under_threads() -> None:
    KeyManager(KEYS)
    barrier = threading.Barrier(3)
    first_round = iter(range(3))
    lock = threading.Lock()

    @stable
    def ask(api_key: str) -> str:
        with lock:
            first = next(first_round, None) is not None
        if first:
            barrier.wait(timeout=10)  # three calls in flight at once, one per key
        if api_key == B:
            raise wire.revoked()
        return api_key

    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(ask())) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert [r["state"] for r in KeyManager().stats()] == ["ready", "disabled", "ready"]


# -- async ----------------------------------------------------------------------------------
def test_async_function_rotates_and_waits_without_blocking_the_loop() -> None:
    KeyManager([A, B])

    @stable(max_wait=10)
    async def ask(prompt: str, api_key: str) -> str:
        await asyncio.sleep(0)
        if api_key == A:
            raise wire.rate_limited("80ms")
        return f"echo: {prompt}"

    async def main() -> list[str]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.005)

        tick = asyncio.ensure_future(ticker())
        KeyManager().set_ttl(B, 0.2)
        answers = await asyncio.gather(*(ask(str(i)) for i in range(5)))
        tick.cancel()
        assert ticks > 5  # the loop kept running while calls waited for a key
        return answers

    assert asyncio.run(main()) == [f"echo: {i}" for i in range(5)]


def test_five_hundred_coroutines_through_one_async_function() -> None:
    keys = made_up_keys(8)
    KeyManager(keys)
    peak = 0
    running = 0

    @stable
    async def ask(index: int, api_key: str) -> int:
        nonlocal peak, running
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        if index % 50 == 0 and api_key == keys[0]:
            raise wire.rate_limited("10ms")
        return index

    async def main() -> list[int]:
        return await asyncio.gather(*(ask(i) for i in range(500)))

    assert asyncio.run(main()) == list(range(500))
    assert peak > 100
    assert sum(r["in_flight"] for r in KeyManager().stats()) == 0
    assert sum(r["successes"] for r in KeyManager().stats()) == 500


def test_async_calls_from_several_loops_in_several_threads() -> None:
    KeyManager(KEYS)

    @stable
    async def ask(index: int, api_key: str) -> int:
        await asyncio.sleep(0.001)
        return index

    results: list[list[int]] = []

    def run_loop() -> None:
        results.append(asyncio.run(_gather(ask, 50)))

    threads = [threading.Thread(target=run_loop) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert results == [list(range(50))] * 4


async def _gather(ask: Callable[[int], Any], count: int) -> list[int]:
    return list(await asyncio.gather(*(ask(i) for i in range(count))))


def test_cancelled_async_call_releases_its_key() -> None:
    KeyManager([A])

    @stable
    async def ask(api_key: str) -> str:
        await asyncio.sleep(10)
        return "never"

    async def main() -> None:
        task = asyncio.ensure_future(ask())
        await asyncio.sleep(0.01)
        assert row(A)["in_flight"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert row(A)["in_flight"] == 0


# -- streaming ------------------------------------------------------------------------------
def test_stream_failing_before_its_first_item_is_retried_on_another_key() -> None:
    KeyManager([A, B])

    @stable
    def chunks(prompt: str, api_key: str) -> Iterator[str]:
        if api_key == A:
            raise wire.rate_limited("5s")
        yield from prompt.split()

    assert list(chunks("a b c")) == ["a", "b", "c"]
    assert row(A)["state"] == "cooling"
    assert row(B)["successes"] == 1
    assert row(B)["in_flight"] == 0


def test_stream_failing_after_its_first_item_propagates_unchanged() -> None:
    KeyManager([A, B])
    error = wire.server_error(500)
    tried: list[str] = []

    @stable
    def chunks(api_key: str) -> Iterator[str]:
        tried.append(api_key)
        yield "first"
        raise error

    stream = chunks()
    assert next(stream) == "first"
    with pytest.raises(openai.InternalServerError) as caught:
        next(stream)
    assert caught.value is error
    assert len(tried) == 1
    assert sum(r["in_flight"] for r in KeyManager().stats()) == 0


def test_stream_closed_early_or_broken_by_the_consumer_releases_its_key() -> None:
    KeyManager([A])

    @stable
    def chunks(api_key: str) -> Iterator[int]:
        yield from range(100)

    for number in chunks():
        if number == 3:
            break
    assert row(A)["in_flight"] == 0

    def consume() -> None:
        for number in chunks():
            if number == 2:
                raise RuntimeError("consumer bug")

    with pytest.raises(RuntimeError):
        consume()
    assert row(A)["in_flight"] == 0


def test_stream_return_value_passes_through() -> None:
    KeyManager([A])

    @stable
    def chunks(api_key: str) -> Iterator[int]:
        yield 1
        return 7

    def outer() -> Iterator[int]:
        result = yield from chunks()
        yield result

    assert list(outer()) == [1, 7]


def test_async_stream_is_retried_before_its_first_item_only() -> None:
    KeyManager([A, B])

    @stable
    async def chunks(api_key: str) -> AsyncIterator[str]:
        if api_key == A:
            raise wire.rate_limited("5s")
        for part in ("x", "y"):
            await asyncio.sleep(0)
            yield part

    @stable
    async def broken(api_key: str) -> AsyncIterator[str]:
        yield "first"
        raise wire.server_error(500)

    async def main() -> None:
        assert [part async for part in chunks()] == ["x", "y"]
        with pytest.raises(openai.InternalServerError):
            async for _ in broken():
                pass

    asyncio.run(main())
    assert row(A)["state"] == "cooling"
    assert sum(r["in_flight"] for r in KeyManager().stats()) == 0


def test_x_should_retry_false_raises_after_one_request() -> None:
    KeyManager(KEYS)
    error = wire.status_error(
        500, {"message": "boom", "type": "server_error"}, {"x-should-retry": "false"}
    )
    ask, used = failing_on({key: (lambda: error) for key in KEYS})
    with pytest.raises(openai.InternalServerError):
        stable(ask)("hi")
    assert len(used) == 1  # as openai-python alone: one request


def test_dead_keys_do_not_use_up_the_calls_attempts() -> None:
    """Twelve revoked or empty keys before two good ones: the first call still succeeds
    with attempts=3 — each dead key leaves the rotation, and is not a failed attempt."""
    dead = made_up_keys(12, "dead")
    good = made_up_keys(2, "good")
    KeyManager([*dead, *good])
    failures = {
        key: (wire.revoked if index % 2 else wire.no_quota) for index, key in enumerate(dead)
    }
    ask, used = failing_on(failures)
    assert stable(attempts=3)(ask)("hi") == "echo: hi"
    assert used[-1] in good and set(used[:-1]) <= set(dead)


@pytest.mark.parametrize("retry_after", ["0", "1"])
def test_keys_that_keep_answering_429_end_the_call_within_max_wait(retry_after: str) -> None:
    """Two keys answering 429 with a short retry-after, each try taking 0.2 s: the call
    raises the 429 within about max_wait (time inside its tries included) and sends a
    bounded number of requests — before, it never ended."""
    import time

    KeyManager([A, B])
    used: list[str] = []

    def ask(prompt: str, api_key: str) -> str:
        used.append(api_key)
        time.sleep(0.2)
        raise wire.rate_limited("0s", {"retry-after": retry_after})

    outcome: list[BaseException] = []

    def run() -> None:
        try:
            stable(max_wait=2)(ask)("hi")
        except BaseException as exc:
            outcome.append(exc)

    began = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(30)
    assert not worker.is_alive(), f"still running after 30 s, {len(used)} requests sent"
    assert isinstance(outcome[0], (openai.RateLimitError, AllKeysCoolingError))
    # About max_wait, not the six seconds the bound on tries allows (generous: a busy machine).
    assert time.monotonic() - began < 2 + 0.2 + 1 + 1.5
    assert len(used) <= 3 * 10  # the default attempts: three rate-limited tries each, at most


def test_a_function_taking_api_key_keeps_its_callers_own_client() -> None:
    """A 0.1.1 function ``save(prompt, client, api_key)`` whose ``client`` is the caller's
    own object (a database, say): it gets that object, by position or keyword, and a key."""
    KeyManager([A, B])
    mine = object()
    seen: list[tuple[Any, str]] = []

    @stable
    def save(prompt: str, client: Any, api_key: str) -> str:
        seen.append((client, api_key))
        return prompt

    assert save("one", mine) == "one"
    assert save("two", client=mine) == "two"
    assert [client for client, _ in seen] == [mine, mine]
    assert all(key in (A, B) for _, key in seen)
    with pytest.raises(TypeError, match="chooses the key itself"):
        save("three", mine, api_key=A)  # the key is still the library's


def test_coroutines_and_generators_from_any_callable_get_the_right_driver() -> None:
    """An object with ``async def __call__``, a lambda or ``functools.partial`` returning a
    coroutine, a partial of a generator function and a lambda returning an async generator
    are awaited or iterated by the decorator — with rotation on a 401 — instead of handing
    back an un-awaited coroutine."""
    import asyncio
    import functools

    KeyManager([A, B])
    used: list[str] = []

    async def answer(prompt: str, api_key: str) -> str:
        used.append(api_key)
        if api_key == A:
            raise wire.revoked()
        return f"echo: {prompt}"

    def stream(prompt: str, api_key: str) -> Iterator[str]:
        used.append(api_key)
        if api_key == A:
            raise wire.revoked()
        yield prompt

    class Answerer:
        async def __call__(self, prompt: str, api_key: str) -> str:
            return await answer(prompt, api_key)

    for made in (
        Answerer(),
        lambda prompt, api_key: answer(prompt, api_key),
        functools.partial(answer),
    ):
        KeyManager([A, B])  # A enabled again
        ask = stable(made)
        assert asyncio.run(ask("hi")) == "echo: hi"
        assert asyncio.run(ask("again")) == "echo: again"  # later calls go straight there
    KeyManager([A, B])
    assert list(stable(functools.partial(stream))("hi")) == ["hi"]  # known when decorating

    async def astream(prompt: str, api_key: str) -> AsyncIterator[str]:
        used.append(api_key)
        if api_key == A:
            raise wire.revoked()
        yield prompt

    async def collect(stream: Any) -> list[str]:
        return [item async for item in stream]

    KeyManager([A, B])
    late = stable(lambda prompt, api_key: astream(prompt, api_key))
    assert asyncio.run(collect(late("hi"))) == ["hi"]
    assert asyncio.run(collect(late("again"))) == ["again"]
    assert B in used
    assert all(row["in_flight"] == 0 for row in KeyManager().stats())


def test_a_function_returning_a_generator_after_its_request_is_called_once() -> None:
    """A plain function may return a generator (over an answer it already got): that is its
    value, not a call still to be made."""
    KeyManager([A])
    sent: list[str] = []

    @stable
    def words(text: str, api_key: str) -> Iterator[str]:
        sent.append(api_key)
        return (word for word in text.split())

    assert list(words("a b")) == ["a", "b"]
    assert list(words("c")) == ["c"]
    assert len(sent) == 2


def test_an_async_call_outside_asyncio_is_refused_at_once_with_a_clear_error() -> None:
    """Under trio (or anyio on trio) there is no asyncio loop: the call says so at once,
    before taking a key, instead of failing only once it must wait."""
    KeyManager([A])

    @stable
    async def ask(api_key: str) -> str:
        return api_key

    @stable
    async def stream(api_key: str) -> AsyncIterator[str]:
        yield api_key

    coroutine = ask()
    with pytest.raises(RuntimeError, match="need asyncio"):
        coroutine.send(None)  # driven by hand, as a non-asyncio loop would: no asyncio loop
    with pytest.raises(RuntimeError, match="need asyncio"):
        stream().__anext__().send(None)
    assert row(A)["calls"] == 0


def test_stable_above_staticmethod_and_classmethod_keeps_them_what_they_are() -> None:
    KeyManager([A])

    class Service:
        prefix = "svc"

        @stable
        @staticmethod
        def plain(prompt: str, api_key: str) -> str:
            return f"{prompt}:{api_key == A}"

        @stable(attempts=2)
        @classmethod
        def named(cls, prompt: str, api_key: str) -> str:
            return f"{cls.prefix}:{prompt}:{api_key == A}"

    assert Service().plain("hi") == Service.plain("hi") == "hi:True"
    assert Service().named("hi") == Service.named("hi") == "svc:hi:True"


def test_dead_keys_that_come_straight_back_cannot_keep_a_call_going() -> None:
    """forbidden_cooldown=0: a key that answers 403 is ready again at once.  The call still
    ends: at most one dead try per key."""
    KeyManager([A, B])
    ask, used = failing_on({A: wire.forbidden, B: wire.forbidden})
    with pytest.raises(openai.PermissionDeniedError):
        stable(forbidden_cooldown=0, max_wait=1)(ask)("hi")
    assert len(used) <= 3


def test_a_callers_client_by_position_lands_on_client_whatever_the_order() -> None:
    KeyManager([A])
    mine = object()

    @stable
    def save(prompt: str, api_key: str, client: Any) -> tuple[Any, bool]:
        return client, api_key == A

    assert save("one", mine) == (mine, True)
    assert save("two", client=mine) == (mine, True)


def test_a_pool_known_only_by_its_organization_is_not_taken_for_one_project() -> None:
    """Keys a 429's organization put in one pool may be of several projects: a model one
    of them cannot use (404) moves the call to the other key, not out of the pool."""
    KeyManager([A, B])
    calls: Counter[str] = Counter()

    def ask(prompt: str, api_key: str) -> str:
        calls[api_key] += 1
        if calls[api_key] == 1:
            raise wire.rate_limited("10ms", {"retry-after-ms": "10"}, organization="org-two")
        if api_key == A:
            raise wire.model_not_found()
        return "ok"

    assert stable(ask)("hi") == "ok"
    assert {row["pool"] for row in KeyManager().stats()} == {"org-two"}


def test_the_model_argument_tells_the_pool_which_models_its_calls_ask_for() -> None:
    """A pool whose calls ask for two models is not paced from one model's 429s (budgets
    are per pool, not yet per model): the decorator reads a ``model`` argument."""
    manager = KeyManager([A])

    @stable
    def ask(model: str, prompt: str, api_key: str) -> str:
        return f"{model}: {prompt}"

    pool = manager._ring.find(A).pool  # type: ignore[union-attr]
    assert ask("gpt-4o-mini", "hi") == "gpt-4o-mini: hi"
    assert pool.pace_model == "gpt-4o-mini"
    assert ask(prompt="hi", model="gpt-4o-mini") == "gpt-4o-mini: hi"
    assert pool.pace_model == "gpt-4o-mini"
    assert ask("gpt-4o", "hi") == "gpt-4o: hi"
    assert pool.pace_model == MIXED


# -- timeout: one deadline for the whole call ------------------------------------------------
def test_timeout_is_validated() -> None:
    for bad, error in [(0, ValueError), (-1, ValueError), ("1", TypeError), (True, TypeError),
                       (float("nan"), ValueError)]:
        with pytest.raises(error, match="timeout"):
            stable(timeout=bad)  # type: ignore[arg-type]


def test_timeout_ends_a_call_whose_keys_keep_answering_429_though_max_wait_is_long() -> None:
    """Keys answering 429 with no delay: with max_wait=120 the call would go on for many
    tries; timeout=0.5 ends it with CallTimeoutError, the last 429 as its cause."""
    import time

    KeyManager([A, B])
    used: list[str] = []

    def ask(prompt: str, api_key: str) -> str:
        used.append(api_key)
        time.sleep(0.1)
        raise wire.rate_limited("0s", {"retry-after": "0"})

    with pytest.raises(CallTimeoutError, match=r"timeout of 0\.5s") as caught:
        stable(max_wait=120, attempts=100, timeout=0.5)(ask)("hi")
    assert isinstance(caught.value, TimeoutError)
    assert isinstance(caught.value.__cause__, openai.RateLimitError)
    assert caught.value.timeout == 0.5
    assert "RateLimitError" in str(caught.value)
    assert not any(key in str(caught.value) for key in KEYS)
    # Each try takes 0.1 s: no try starts past the deadline (7 would, were it ignored).
    assert 1 <= len(used) <= 6
    assert sum(r["in_flight"] for r in KeyManager().stats()) == 0


def test_timeout_does_not_throw_away_a_success_that_came_late() -> None:
    """A sync function's own request runs to its end: an answer after the deadline is the
    call's answer, not an error."""
    import time

    KeyManager([A])

    @stable(timeout=0.05)
    def ask(prompt: str, api_key: str) -> str:
        time.sleep(0.2)
        return prompt

    assert ask("late") == "late"


def test_timeout_is_not_raised_in_place_of_an_error_that_is_not_retried() -> None:
    KeyManager([A])
    ask, _ = failing_on({A: lambda: wire.status_error(400, {"message": "bad"})})
    with pytest.raises(openai.BadRequestError):
        stable(timeout=5)(ask)("hi")


def test_timeout_cancels_an_async_call_and_frees_its_key() -> None:
    KeyManager([A])
    cancelled: list[bool] = []

    @stable(timeout=0.2)
    async def ask(prompt: str, api_key: str) -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return prompt

    async def main() -> None:
        with pytest.raises(CallTimeoutError) as caught:
            await ask("hi")
        assert caught.value.__cause__ is None  # no try failed: the first was cut
        # The task itself is not left cancelled: it goes on awaiting.
        await asyncio.sleep(0.01)

    asyncio.run(main())
    assert cancelled == [True]
    assert row(A)["state"] == "ready" and row(A)["in_flight"] == 0


def test_timeout_after_a_failed_async_try_names_that_failure() -> None:
    KeyManager([A, B])
    tries: list[str] = []

    @stable(timeout=0.3, backoff=0.01)
    async def ask(prompt: str, api_key: str) -> str:
        tries.append(api_key)
        if len(tries) == 1:
            raise wire.server_error(500)
        await asyncio.sleep(30)
        return prompt

    async def main() -> None:
        with pytest.raises(CallTimeoutError) as caught:
            await ask("hi")
        assert isinstance(caught.value.__cause__, openai.InternalServerError)

    asyncio.run(main())
    assert len(tries) == 2
    assert sum(r["in_flight"] for r in KeyManager().stats()) == 0


def test_timeout_bounds_an_async_stream_until_its_first_item() -> None:
    KeyManager([A])
    closed: list[bool] = []

    @stable(timeout=0.2)
    async def chunks(api_key: str) -> AsyncIterator[str]:
        try:
            await asyncio.sleep(30)
            yield "never"
        finally:
            closed.append(True)

    @stable(timeout=0.2)
    async def slow_after_first(api_key: str) -> AsyncIterator[str]:
        yield "first"
        await asyncio.sleep(0.4)  # past the timeout: a started stream is not cut
        yield "second"

    async def main() -> None:
        with pytest.raises(CallTimeoutError):
            async for _ in chunks():
                pass
        assert [part async for part in slow_after_first()] == ["first", "second"]

    asyncio.run(main())
    assert closed == [True]
    assert row(A)["in_flight"] == 0


# -- per-(pool, model) holds ----------------------------------------------------------------
def _two_models(failures: dict[tuple[str, str], Callable[[], BaseException]]) -> tuple[
    Callable[..., str], list[tuple[str, str]]
]:
    """A function taking ``model`` (as the original README's) that raises the scripted error
    for some (key, model) pairs once each, and echoes otherwise."""
    used: list[tuple[str, str]] = []

    def ask(model: str, prompt: str, api_key: str) -> str:
        used.append((api_key, model))
        error = failures.pop((api_key, model), None)
        if error is not None:
            raise error()
        return f"{model}: {prompt}"

    return ask, used


def test_a_429_of_one_model_holds_that_model_not_the_keys() -> None:
    """A key whose pool serves two models: a 429 of gpt-4o there holds gpt-4o's calls for the
    429's delay, while gpt-4o-mini's go on on the same key at once (before, the 429 cooled the
    key for both); a gpt-4o call waits out the hold, then goes."""
    import time

    KeyManager([A])
    ask, used = _two_models({(A, "gpt-4o"): lambda: wire.rate_limited(
        "300ms", organization="org-one", model="gpt-4o", numbers="Limit 2, Used 2, Requested 1")})
    call = stable(max_wait=5)(ask)
    assert call("gpt-4o-mini", "a") == "gpt-4o-mini: a"
    assert call("gpt-4o", "b") == "gpt-4o: b"  # 429, then on the same key once it is let go
    assert used[1:] == [(A, "gpt-4o"), (A, "gpt-4o")]
    assert row(A)["state"] == "ready" and row(A)["rate_limits"] == 1
    ask2, used2 = _two_models({(A, "gpt-4o"): lambda: wire.rate_limited(
        "2s", organization="org-one", model="gpt-4o", numbers="Limit 2, Used 2, Requested 1")})
    call2 = stable(max_wait=5)(ask2)
    began = time.monotonic()
    try:
        call2("gpt-4o", "c")  # the 429 holds gpt-4o for 2 s, and this call waits for it
    finally:
        waited = time.monotonic() - began
    assert call2("gpt-4o-mini", "d") == "gpt-4o-mini: d"
    assert used2 == [(A, "gpt-4o"), (A, "gpt-4o"), (A, "gpt-4o-mini")]
    assert waited >= 1.9  # (behaviour: it did not go before the hold was over)


def test_a_call_for_a_held_model_takes_another_pools_key() -> None:
    KeyManager([A, B])
    ask, used = _two_models({(A, "gpt-4o"): lambda: wire.rate_limited(
        "60s", organization="org-a", model="gpt-4o", numbers="Limit 2, Used 2, Requested 1")})
    call = stable(ask)
    for model in ("gpt-4o-mini", "gpt-4o"):  # both keys' pools serve both models
        for _ in range(2):
            call(model, "warm")
    used.clear()
    ask_failing, used_failing = _two_models({(A, "gpt-4o"): lambda: wire.rate_limited(
        "60s", organization="org-a", model="gpt-4o", numbers="Limit 2, Used 2, Requested 1")})
    call = stable(ask_failing)
    results = [call("gpt-4o", str(i)) for i in range(4)] + [call("gpt-4o-mini", "m")]
    assert results[-1] == "gpt-4o-mini: m"
    # After A's 429, gpt-4o goes to B only — no second request to A — while A serves mini.
    gpt4o = [key for key, model in used_failing if model == "gpt-4o"]
    assert gpt4o.count(A) <= 1 and gpt4o[-1] == B
    assert row(A)["state"] == "ready"


def _gpt_4o_spent_on_both_keys(delay: str, per: str = "min (RPM)") -> tuple[
    Callable[..., str], list[tuple[str, str]]
]:
    """Keys A and B, whose pools have served both models; then each answers gpt-4o's first
    call with a 429 of a limit ``per``, to try again in ``delay``.  The call (``max_wait``
    30 s) and the (key, model) pairs it sent."""
    KeyManager([A, B])
    warm, _ = _two_models({})
    for model in ("gpt-4o-mini", "gpt-4o"):
        for _ in range(2):
            stable(warm)(model, "warm")
    spent = {(key, "gpt-4o"): (lambda: wire.rate_limited(
        delay, model="gpt-4o", numbers="Limit 40, Used 40, Requested 1", per=per))
        for key in (A, B)}
    ask, used = _two_models(dict(spent))
    return stable(max_wait=30)(ask), used


def test_a_model_held_for_a_per_day_limit_fails_its_calls_at_once_however_short_the_wait(
) -> None:
    """A daily 429 of gpt-4o on every key, to try again in 20 s (a day's budget refilling
    one request at a time): gpt-4o's calls raise AllKeysCoolingError at once with the
    server's wait, though it is within ``max_wait`` — waiting gives one request a refill —
    and without a request; gpt-4o-mini's succeed.  (A per-minute hold within ``max_wait``
    is waited for: ``test_a_429_of_one_model_holds_that_model_not_the_keys``.)"""
    import time

    call, used = _gpt_4o_spent_on_both_keys("20s", per="day (RPD)")
    began = time.monotonic()
    with pytest.raises(AllKeysCoolingError) as caught:
        call("gpt-4o", "x")
    assert 15 < caught.value.retry_after <= 20
    assert "per day" in str(caught.value)
    sent = len(used)
    with pytest.raises(AllKeysCoolingError):
        call("gpt-4o", "y")
    assert time.monotonic() - began < 10  # (behaviour: neither call waited for the hold)
    assert len(used) == sent == 2  # one 429 on each key, then no request
    assert call("gpt-4o-mini", "z") == "gpt-4o-mini: z"


def test_a_model_held_for_hours_fails_its_calls_at_once_and_no_others() -> None:
    """A limit spent for hours (a 429 to try again in 3 h, beyond ``max_wait``) of gpt-4o
    on every key: gpt-4o's calls raise AllKeysCoolingError at once, saying how long,
    without a request; gpt-4o-mini's succeed."""
    call, used = _gpt_4o_spent_on_both_keys("3h")
    with pytest.raises(AllKeysCoolingError) as caught:
        call("gpt-4o", "x")
    assert caught.value.retry_after > 3000
    assert "gpt-4o" in str(caught.value)
    sent = len(used)
    with pytest.raises(AllKeysCoolingError):
        call("gpt-4o", "y")
    assert len(used) == sent  # no request: the holds said it
    assert call("gpt-4o-mini", "z") == "gpt-4o-mini: z"
    assert {r["state"] for r in KeyManager().stats()} == {"ready"}
