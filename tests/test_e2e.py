"""End to end: ``@stable`` around the real ``openai`` client, over real HTTP, against the simulator.

Every row of the failure table, the original README's complete example run as a program,
streaming (sync and async), counters that reconcile between client and server, and asyncio at
scale.  Only loopback, only made-up keys.  No assertion is about wall-clock time: waits are
bounded, windows are 1 s, latencies small.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from clients import AsyncClients
from wire import made_up_keys

from stable_openai import (
    AllKeysCoolingError,
    AllKeysDisabledError,
    KeyManager,
    KeyStats,
    StableOpenAIError,
    stable,
)
from stable_openai.simulator import (
    Faults,
    ProjectLimits,
    SimKey,
    Simulator,
    SimulatorConfig,
    echo_answer,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt-4o-mini"
StartSimulator = Callable[[SimulatorConfig], Simulator]


# --------------------------------------------------------------------------- helpers


class Clients:
    """One ``openai.OpenAI`` per (base URL, key), shared by threads, closed at teardown."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str], openai.OpenAI] = {}
        self._lock = threading.Lock()

    def get(self, base_url: str, api_key: str) -> openai.OpenAI:
        with self._lock:
            client = self._clients.get((base_url, api_key))
            if client is None:
                client = openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=0)
                self._clients[(base_url, api_key)] = client
            return client

    def close(self) -> None:
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()


@pytest.fixture
def clients() -> Iterator[Clients]:
    pool = Clients()
    yield pool
    pool.close()


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def asker(clients: Clients, base_url: str, **options: Any) -> Callable[..., str]:
    """The README's shape: a @stable function that builds its client from ``api_key``."""

    @stable(**options)
    def ask(prompt: str, api_key: str) -> str:
        client = clients.get(base_url, api_key)
        response = client.chat.completions.create(model=MODEL, messages=messages(prompt))
        return response.choices[0].message.content or ""

    return ask


def masked(key: str) -> str:
    """How the library shows a key: ``sk-…WXYZ`` (made-up keys never collide on this)."""
    return f"{key[:3]}…{key[-4:]}"


def row(key: str) -> KeyStats:
    """The KeyManager's stats row of ``key`` (keys are only ever shown masked)."""
    return next(r for r in KeyManager().stats() if r["key"] == masked(key))


def seconds(duration: str) -> float:
    """A Go-style duration below one minute (``0s``, ``644ms``, ``1.5s``) in seconds."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s)", duration.strip())
    assert match, duration
    return float(match.group(1)) / (1000.0 if match.group(2) == "ms" else 1.0)


def exhaust(sim: Simulator, clients: Clients, key: str, margin: float = 0.5) -> None:
    """Use up the RPM budget of ``key``'s project in the current window, leaving at least
    ``margin`` seconds of that window, so that the next request of that project gets 429."""
    client = clients.get(sim.base_url, key)
    for _ in range(1000):
        try:
            client.chat.completions.create(model=MODEL, messages=messages("filler"))
        except openai.RateLimitError as exc:
            left = seconds(exc.response.headers["x-ratelimit-reset-requests"])
            if left >= margin:
                return
            time.sleep(left + 0.02)  # too close to the window's end: start a fresh one
    raise AssertionError("the project never got rate limited")


def totals(sim: Simulator) -> dict[str, int]:
    result: dict[str, int] = sim.stats()["totals"]
    return result


def keys_named(*names: str, tag: str = "e2e") -> dict[str, str]:
    return dict(zip(names, made_up_keys(len(names), tag)))


# --------------------------------------------------------------------------- the failure table


def test_429_rate_limit_cools_the_key_and_the_call_succeeds_on_another_project(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("a1", "a2", "b")
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["a1"], project="a", organization="org-a"),
                SimKey(k["a2"], project="a", organization="org-a"),
                SimKey(k["b"], project="b", organization="org-b"),
            ),
            projects={"a": ProjectLimits(rpm=2), "b": ProjectLimits(rpm=100)},
            window=1.0,
        )
    )
    KeyManager([k["a1"], k["b"]])
    ask = asker(clients, sim.base_url)
    # Project a's budget is spent through a2, a key the manager does not even hold: limits
    # belong to the project, so a1 is limited too.
    exhaust(sim, clients, k["a2"])

    assert ask("hello") == echo_answer("hello")

    assert sim.key_stats(k["a1"])["rate_limited"] == 1
    assert sim.key_stats(k["b"])["ok"] == 1
    a1, b = row(k["a1"]), row(k["b"])
    assert a1["state"] == "cooling"
    assert a1["rate_limits"] == 1
    assert a1["reason"] == "rate limited (429)"
    assert 0 < a1["seconds_left"] <= 1.0  # the server said retry-after: 1
    assert b["state"] == "ready"
    assert b["successes"] == 1
    assert sum(r["in_flight"] for r in KeyManager().stats()) == 0


def test_429_request_too_large_for_every_project_is_raised_and_cools_no_key(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("a", "b")
    sim = start_simulator(
        SimulatorConfig(
            keys=(SimKey(k["a"], project="a"), SimKey(k["b"], project="b")),
            projects={"a": ProjectLimits(tpm=100), "b": ProjectLimits(tpm=100)},
            window=1.0,
        )
    )
    KeyManager([k["a"], k["b"]])
    ask = asker(clients, sim.base_url)

    with pytest.raises(openai.RateLimitError, match="Request too large") as info:
        ask("x" * 2000)

    assert info.value.status_code == 429
    assert totals(sim)["requests"] == 2  # once on each project: one may have had a larger limit
    assert totals(sim)["too_large"] == 2
    for stats in KeyManager().stats():
        assert stats["state"] == "ready"
        assert stats["rate_limits"] == 0
        assert stats["in_flight"] == 0
    # and the keys still work for a request of a normal size
    assert ask("small") == echo_answer("small")


@pytest.mark.parametrize("quota_cooldown", [None, 900.0])
def test_429_insufficient_quota_benches_the_key_for_quota_cooldown(
    start_simulator: StartSimulator, clients: Clients, quota_cooldown: float | None
) -> None:
    k = keys_named("quota", "b")
    sim = start_simulator(
        SimulatorConfig(
            keys=(SimKey(k["quota"], project="q", status="no_quota"), SimKey(k["b"], project="b")),
            window=1.0,
        )
    )
    KeyManager([k["quota"], k["b"]])
    options = {} if quota_cooldown is None else {"quota_cooldown": quota_cooldown}
    ask = asker(clients, sim.base_url, **options)
    bench = 3600.0 if quota_cooldown is None else quota_cooldown

    for index in range(5):
        assert ask(f"q{index}") == echo_answer(f"q{index}")

    assert sim.key_stats(k["quota"])["requests"] == 1
    assert sim.key_stats(k["quota"])["quota"] == 1
    assert sim.key_stats(k["b"])["ok"] == 5
    stats = row(k["quota"])
    assert stats["state"] == "cooling"
    assert "no quota" in stats["reason"]
    assert bench - 60 < stats["seconds_left"] <= bench
    assert stats["rate_limits"] == 0  # not a rate limit: waiting seconds does not help


def test_401_revoked_key_is_disabled_and_never_used_again(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("revoked", "b")
    sim = start_simulator(
        SimulatorConfig(
            keys=(SimKey(k["revoked"], project="r", status="revoked"), SimKey(k["b"], project="b")),
            window=1.0,
        )
    )
    KeyManager([k["revoked"], k["b"]])
    ask = asker(clients, sim.base_url)

    for index in range(10):
        assert ask(f"r{index}") == echo_answer(f"r{index}")

    assert sim.key_stats(k["revoked"])["requests"] == 1
    assert sim.key_stats(k["revoked"])["unauthorized"] == 1
    assert sim.key_stats(k["b"])["ok"] == 10
    stats = row(k["revoked"])
    assert stats["state"] == "disabled"
    assert "revoked" in stats["reason"]
    assert stats["seconds_left"] == float("inf")


def test_403_forbidden_key_is_benched_about_600_seconds(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("forbidden", "b")
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["forbidden"], project="f", status="forbidden"),
                SimKey(k["b"], project="b"),
            ),
            window=1.0,
        )
    )
    KeyManager([k["forbidden"], k["b"]])
    ask = asker(clients, sim.base_url)

    for index in range(3):
        assert ask(f"f{index}") == echo_answer(f"f{index}")

    assert sim.key_stats(k["forbidden"])["requests"] == 1
    assert sim.key_stats(k["forbidden"])["forbidden"] == 1
    stats = row(k["forbidden"])
    assert stats["state"] == "cooling"
    assert "forbidden" in stats["reason"]
    assert 540 < stats["seconds_left"] <= 600


def test_403_on_every_key_raises_permission_denied(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("f1", "f2")
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["f1"], project="f1", status="forbidden"),
                SimKey(k["f2"], project="f2", status="forbidden"),
            ),
            window=1.0,
        )
    )
    KeyManager([k["f1"], k["f2"]])
    ask = asker(clients, sim.base_url)

    with pytest.raises(openai.PermissionDeniedError) as info:
        ask("hello")

    assert info.value.status_code == 403
    assert info.value.code == "unsupported_country_region_territory"
    assert totals(sim)["requests"] == 2
    assert totals(sim)["forbidden"] == 2
    assert all(r["state"] == "cooling" for r in KeyManager().stats())


@pytest.mark.parametrize(
    ("fault", "error", "status"),
    [
        ("500 from the config", openai.InternalServerError, 500),
        ("503 set at runtime", openai.InternalServerError, 503),
        ("dropped connection", openai.APIConnectionError, None),
    ],
)
def test_server_errors_are_retried_with_backoff_then_the_last_one_is_raised(
    start_simulator: StartSimulator,
    clients: Clients,
    fault: str,
    error: type[Exception],
    status: int | None,
) -> None:
    k = keys_named("a", "b")
    faults = {
        "500 from the config": Faults(error_500=1.0),
        "503 set at runtime": Faults(),
        "dropped connection": Faults(drop=1.0),
    }[fault]
    sim = start_simulator(
        SimulatorConfig(
            keys=(SimKey(k["a"], project="a"), SimKey(k["b"], project="b")),
            window=1.0,
            faults=faults,
        )
    )
    KeyManager([k["a"], k["b"]])
    ask = asker(clients, sim.base_url, backoff=0.001, attempts=3)
    if fault == "503 set at runtime":
        assert ask("before") == echo_answer("before")
        sim.configure(dataclasses.replace(sim.config, faults=Faults(error_503=1.0)))
        sim.reset_stats()

    with pytest.raises(error) as info:
        ask("hello")

    assert type(info.value) is error  # the real exception, unchanged (not wrapped, not None)
    if status is not None:
        assert isinstance(info.value, openai.APIStatusError)
        assert info.value.status_code == status
    assert totals(sim)["requests"] == 3
    assert totals(sim)["faults"] == 3
    # After a transient error the call prefers the other key.
    assert sim.key_stats(k["a"])["requests"] >= 1
    assert sim.key_stats(k["b"])["requests"] >= 1
    stats = KeyManager().stats()
    assert all(r["state"] == "ready" for r in stats)  # server errors are not the key's fault
    assert sum(r["failures"] for r in stats) == 3
    assert sum(r["in_flight"] for r in stats) == 0


def test_with_30_percent_transient_faults_every_call_succeeds(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("a", "b", "c")
    sim = start_simulator(
        SimulatorConfig(
            keys=tuple(SimKey(key, project=name) for name, key in k.items()),
            window=1.0,
            faults=Faults(error_500=0.1, error_503=0.1, drop=0.1),
            seed=7,
        )
    )
    KeyManager(list(k.values()))
    ask = asker(clients, sim.base_url, backoff=0.001, attempts=10)

    answers = [ask(f"p{index}") for index in range(40)]

    assert answers == [echo_answer(f"p{index}") for index in range(40)]
    assert totals(sim)["ok"] == 40
    assert totals(sim)["faults"] > 0
    assert totals(sim)["requests"] == 40 + totals(sim)["faults"]


def test_404_unknown_path_is_raised_at_once_unchanged(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("a", "b")
    sim = start_simulator(
        SimulatorConfig(keys=(SimKey(k["a"], project="a"), SimKey(k["b"], project="b")))
    )
    KeyManager([k["a"], k["b"]])
    tried: list[str] = []

    @stable(backoff=0.001)
    def ask(prompt: str, api_key: str) -> str:
        tried.append(api_key)
        client = clients.get(sim.url + "/v2", api_key)  # a path the server does not serve
        response = client.chat.completions.create(model=MODEL, messages=messages(prompt))
        return response.choices[0].message.content or ""

    with pytest.raises(openai.NotFoundError, match="Invalid URL") as info:
        ask("hello")

    assert info.value.status_code == 404
    assert len(tried) == 1
    assert all(r["state"] == "ready" for r in KeyManager().stats())


def test_400_malformed_request_is_raised_at_once_unchanged(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("a", "b")
    sim = start_simulator(
        SimulatorConfig(keys=(SimKey(k["a"], project="a"), SimKey(k["b"], project="b")))
    )
    KeyManager([k["a"], k["b"]])

    @stable(backoff=0.001)
    def ask(api_key: str) -> Any:
        client = clients.get(sim.base_url, api_key)
        return client.chat.completions.create(model=MODEL, messages="not a list")  # type: ignore[arg-type]

    with pytest.raises(openai.BadRequestError) as info:
        ask()

    assert info.value.status_code == 400
    assert info.value.param == "messages"
    assert totals(sim)["requests"] == 1
    assert totals(sim)["invalid"] == 1
    assert all(r["state"] == "ready" for r in KeyManager().stats())


def test_every_key_disabled_raises_all_keys_disabled_error(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("r1", "r2")
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["r1"], project="a", status="revoked"),
                SimKey(k["r2"], project="b", status="revoked"),
            )
        )
    )
    KeyManager([k["r1"], k["r2"]])
    ask = asker(clients, sim.base_url)

    with pytest.raises(AllKeysDisabledError) as info:
        ask("hello")

    error = info.value
    assert isinstance(error, openai.OpenAIError)
    assert isinstance(error, StableOpenAIError)
    assert isinstance(error.__cause__, openai.AuthenticationError)
    assert error.reasons == {"revoked (401 invalid_api_key)": 2}
    assert totals(sim)["requests"] == 2
    for key in k.values():
        assert key not in str(error)
    # Asking again fails at once, without a request.
    with pytest.raises(AllKeysDisabledError):
        ask("again")
    assert totals(sim)["requests"] == 2


def test_every_key_rate_limited_past_max_wait_raises_all_keys_cooling_error(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("a", "b")
    sim = start_simulator(
        SimulatorConfig(
            keys=(SimKey(k["a"], project="a"), SimKey(k["b"], project="b")),
            window=1.0,
            faults=Faults(rate_limit=1.0),  # every admitted request gets a 429 "retry after 1s"
        )
    )
    KeyManager([k["a"], k["b"]])
    ask = asker(clients, sim.base_url, max_wait=0.5)

    with pytest.raises(AllKeysCoolingError) as info:
        ask("hello")

    error = info.value
    assert isinstance(error, openai.OpenAIError)
    assert isinstance(error.__cause__, openai.RateLimitError)
    assert 0 < error.retry_after <= 1.0
    assert totals(sim)["requests"] == 2  # each key once, then no waiting past the budget
    stats = KeyManager().stats()
    assert [r["state"] for r in stats] == ["cooling", "cooling"]
    assert sum(r["rate_limits"] for r in stats) == 2


# --------------------------------------------------------------------------- the README example

# Ten threads print at once, and print() writes the text and its newline separately: two
# reports may share a line.  Each report ends where the next begins, or at a newline.
REPORT = re.compile(
    r"Thread (\d+), Request (\d+)/5: (Success|Failed), (?:Response|Error): "
    r"(.*?)(?=Thread \d+, Request \d+/5: |\n|\Z)"
)


def test_the_original_readme_complete_example_gets_50_right_answers_and_exits(
    start_simulator: StartSimulator,
) -> None:
    k = keys_named("good1", "good2", "good3", "revoked", "noquota", tag="readme")
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["good1"], project="p1", organization="org-1"),
                SimKey(k["good2"], project="p2", organization="org-2"),
                SimKey(k["good3"], project="p3", organization="org-3"),
                SimKey(k["revoked"], project="p4", status="revoked"),
                SimKey(k["noquota"], project="p5", status="no_quota"),
            ),
            projects={name: ProjectLimits(rpm=10) for name in ("p1", "p2", "p3", "p4", "p5")},
            window=1.0,
            latency=0.005,
        )
    )
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("OPENAI_")
    }
    env.update(
        OPENAI_BASE_URL=sim.base_url,
        OPENAI_API_KEYS=",".join(k.values()),
        PYTHONPATH=str(ROOT),
    )

    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "complete_example.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False,
    )

    assert done.returncode == 0, done.stderr[-3000:]
    reports = list(REPORT.finditer(done.stdout))
    outcomes = [match.group(3) for match in reports]
    assert outcomes.count("Success") == 50, done.stdout[-3000:]
    assert outcomes.count("Failed") == 0, done.stdout[-3000:]
    assert REPORT.sub("", done.stdout).strip() == ""  # nothing else was printed
    seen = set()
    for match in reports:
        thread, request, response = int(match.group(1)), int(match.group(2)), match.group(4)
        assert response == echo_answer(f"Thread {thread}, Test {request}: Hello, world!")
        seen.add((thread, request))
    assert seen == {(t, r) for t in range(1, 11) for r in range(1, 6)}
    assert sim.key_stats(k["revoked"])["requests"] <= 10
    assert totals(sim)["ok"] == 50
    for key in k.values():
        assert key not in done.stdout + done.stderr


# --------------------------------------------------------------------------- streaming


def stream_config(k: dict[str, str]) -> SimulatorConfig:
    return SimulatorConfig(
        keys=(
            SimKey(k["a1"], project="a"),
            SimKey(k["a2"], project="a"),
            SimKey(k["revoked"], project="r", status="revoked"),
            SimKey(k["b"], project="b"),
        ),
        projects={"a": ProjectLimits(rpm=2), "b": ProjectLimits(rpm=100)},
        window=1.0,
    )


def prepare_stream(
    start_simulator: StartSimulator, clients: Clients, first: str
) -> tuple[Simulator, dict[str, str]]:
    """A simulator and a KeyManager whose first key fails before its first chunk."""
    k = keys_named("a1", "a2", "revoked", "b", tag="stream")
    sim = start_simulator(stream_config(k))
    if first == "rate-limited":
        KeyManager([k["a1"], k["b"]])
        exhaust(sim, clients, k["a2"])
        k["first"] = k["a1"]
    else:
        KeyManager([k["revoked"], k["b"]])
        k["first"] = k["revoked"]
    return sim, k


def check_stream_outcome(sim: Simulator, k: dict[str, str], first: str) -> None:
    first_stats = sim.key_stats(k["first"])
    assert first_stats["requests"] == 1
    assert first_stats["rate_limited" if first == "rate-limited" else "unauthorized"] == 1
    assert sim.key_stats(k["b"])["ok"] == 1
    assert row(k["first"])["state"] == ("cooling" if first == "rate-limited" else "disabled")
    assert row(k["b"])["successes"] == 1
    assert sum(r["in_flight"] for r in KeyManager().stats()) == 0


@pytest.mark.parametrize("first", ["rate-limited", "revoked"])
def test_sync_stream_that_fails_before_its_first_chunk_completes_on_another_key(
    start_simulator: StartSimulator, clients: Clients, first: str
) -> None:
    sim, k = prepare_stream(start_simulator, clients, first)

    @stable
    def stream(prompt: str, api_key: str) -> Iterator[str]:
        client = clients.get(sim.base_url, api_key)
        with client.chat.completions.create(
            model=MODEL, messages=messages(prompt), stream=True
        ) as chunks:
            for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    prompt = "stream me, please"
    pieces = list(stream(prompt))

    assert len(pieces) >= 2
    assert "".join(pieces) == echo_answer(prompt)
    check_stream_outcome(sim, k, first)


@pytest.mark.parametrize("first", ["rate-limited", "revoked"])
def test_async_stream_that_fails_before_its_first_chunk_completes_on_another_key(
    start_simulator: StartSimulator, clients: Clients, first: str
) -> None:
    sim, k = prepare_stream(start_simulator, clients, first)
    pool = AsyncClients(sim.base_url)

    @stable
    async def stream(prompt: str, api_key: str) -> AsyncIterator[str]:
        client = pool.get(api_key)
        chunks = await client.chat.completions.create(
            model=MODEL, messages=messages(prompt), stream=True
        )
        async with chunks:
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content

    prompt = "stream me asynchronously"

    async def main() -> list[str]:
        try:
            return [piece async for piece in stream(prompt)]
        finally:
            await pool.aclose()

    pieces = asyncio.run(main())

    assert len(pieces) >= 2
    assert "".join(pieces) == echo_answer(prompt)
    check_stream_outcome(sim, k, first)


# --------------------------------------------------------------------------- concurrency


def test_counters_reconcile_after_a_concurrent_run(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    k = keys_named("a1", "a2", "b1", "b2", tag="count")
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["a1"], project="a", organization="org-a"),
                SimKey(k["a2"], project="a", organization="org-a"),
                SimKey(k["b1"], project="b", organization="org-b"),
                SimKey(k["b2"], project="b", organization="org-b"),
            ),
            projects={"a": ProjectLimits(rpm=10), "b": ProjectLimits(rpm=10)},
            window=1.0,
            latency=0.002,
        )
    )
    KeyManager(list(k.values()))
    ask = asker(clients, sim.base_url)
    threads_n, calls_n = 8, 25
    results: dict[tuple[int, int], str | BaseException] = {}
    lock = threading.Lock()

    def work(thread: int) -> None:
        for index in range(calls_n):
            prompt = f"t{thread} c{index}"
            try:
                answer: str | BaseException = ask(prompt)
            except Exception as exc:
                answer = exc
            with lock:
                results[(thread, index)] = answer

    threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(thread.is_alive() for thread in threads)

    right = sum(
        answer == echo_answer(f"t{t} c{i}") for (t, i), answer in results.items()
    )
    assert right == threads_n * calls_n, [a for a in results.values() if not isinstance(a, str)]
    sim_totals = totals(sim)
    stats = KeyManager().stats()
    assert sim_totals["ok"] == right == sum(r["successes"] for r in stats)
    assert sim_totals["rate_limited"] == sum(r["rate_limits"] for r in stats)
    assert sim_totals["requests"] == sum(r["calls"] for r in stats)
    assert sum(r["failures"] for r in stats) == 0
    assert sim_totals["in_flight"] == 0
    assert sum(r["in_flight"] for r in stats) == 0
    for key in k.values():
        assert sim.key_stats(key)["requests"] == row(key)["calls"]


def test_200_coroutines_through_async_stable_all_get_their_own_answer(
    start_simulator: StartSimulator,
) -> None:
    k = keys_named("a", "b", "c", "d", "revoked", tag="async")
    sim = start_simulator(
        SimulatorConfig(
            keys=(
                SimKey(k["a"], project="a"),
                SimKey(k["b"], project="b"),
                SimKey(k["c"], project="c"),
                SimKey(k["d"], project="d"),
                SimKey(k["revoked"], project="e", status="revoked"),
            ),
            projects={name: ProjectLimits(rpm=15) for name in "abcde"},
            window=1.0,
            latency=0.005,
        )
    )
    KeyManager(list(k.values()))
    pool = AsyncClients(sim.base_url)

    @stable
    async def ask(prompt: str, api_key: str) -> str:
        response = await pool.get(api_key).chat.completions.create(
            model=MODEL, messages=messages(prompt)
        )
        return response.choices[0].message.content or ""

    prompts = [f"coroutine {index}" for index in range(200)]

    async def main() -> list[str]:
        try:
            return await asyncio.wait_for(
                asyncio.gather(*(ask(prompt) for prompt in prompts)), timeout=90
            )
        finally:
            await pool.aclose()

    answers = asyncio.run(main())

    assert answers == [echo_answer(prompt) for prompt in prompts]
    sim_totals = totals(sim)
    assert sim_totals["ok"] == 200
    assert sim_totals["in_flight"] == 0
    stats = KeyManager().stats()
    assert sum(r["in_flight"] for r in stats) == 0
    assert sum(r["successes"] for r in stats) == 200
    assert row(k["revoked"])["state"] == "disabled"


def test_keys_revoked_by_a_passing_401_incident_come_back_after_revoked_cooldown(
    start_simulator: StartSimulator, clients: Clients
) -> None:
    """Every key answers 401 for a while (the provider's trouble, not the keys'): calls raise
    AllKeysDisabledError, which says when the keys are tried again; once the provider has
    recovered and that time has passed, one call tries a key again and succeeds — before,
    the keys stayed disabled for good.  A key still revoked then is disabled again."""
    k = keys_named("a", "b")
    sim = start_simulator(
        SimulatorConfig(keys=tuple(SimKey(key, project=name) for name, key in k.items()))
    )
    KeyManager(list(k.values()))
    ask = asker(clients, sim.base_url, revoked_cooldown=0.5)
    for key in k.values():
        sim.set_key_status(key, "revoked")
    with pytest.raises(AllKeysDisabledError) as caught:
        ask("during")
    assert caught.value.recheck_in is not None and 0 < caught.value.recheck_in <= 0.5
    assert "tried again in" in str(caught.value)
    sim.set_key_status(k["a"], "ok")  # the provider recovered, for one of them
    time.sleep(0.6)
    assert ask("after") == echo_answer("after")
    assert ask("again") == echo_answer("again")
    assert row(k["a"])["state"] == "ready"
    assert row(k["b"])["state"] == "disabled"  # tried once more, still revoked
    assert sim.key_stats(k["b"])["unauthorized"] == 2
