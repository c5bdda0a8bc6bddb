"""Tests of the OpenAI simulator, driven by the real ``openai`` client over real HTTP."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from stable_openai.simulator import (
    Faults,
    ProjectLimits,
    SimKey,
    Simulator,
    SimulatorConfig,
    _server,
    echo_answer,
)
from stable_openai.simulator._state import SimState
from stable_openai.simulator._wire import go_duration, key_label, mask_key_401

ROOT = Path(__file__).resolve().parents[1]
MODEL = "gpt-4o-mini"
KEY_A1 = "sk-test-alpha-0000001111"
KEY_A2 = "sk-test-alpha-0000002222"
KEY_B = "sk-test-bravo-0000003333"
KEY_REVOKED = "sk-test-revoked-0000004444"
KEY_NO_QUOTA = "sk-test-noquota-0000005555"
KEY_FORBIDDEN = "sk-test-forbid-0000006666"
KEY_UNKNOWN = "sk-test-unknown-0000007777"
ALL_KEYS = (KEY_A1, KEY_A2, KEY_B, KEY_REVOKED, KEY_NO_QUOTA, KEY_FORBIDDEN, KEY_UNKNOWN)
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")

STANDARD_KEYS = (
    SimKey(KEY_A1, project="proj-a", organization="org-alpha"),
    SimKey(KEY_A2, project="proj-a", organization="org-alpha"),
    SimKey(KEY_B, project="proj-b", organization="org-bravo"),
    SimKey(KEY_REVOKED, project="proj-c", status="revoked"),
    SimKey(KEY_NO_QUOTA, project="proj-c", status="no_quota"),
    SimKey(KEY_FORBIDDEN, project="proj-c", status="forbidden"),
)


def config(**overrides: Any) -> SimulatorConfig:
    """The standard keys with the given overrides (window 60 s: no boundary inside a test)."""
    values: dict[str, Any] = {"keys": STANDARD_KEYS, "window": 60.0}
    values.update(overrides)
    return SimulatorConfig(**values)


@contextmanager
def running(cfg: SimulatorConfig | None = None) -> Iterator[Simulator]:
    with Simulator(cfg if cfg is not None else config()) as sim:
        yield sim


def client(sim: Simulator, key: str = KEY_A1, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(api_key=key, base_url=sim.base_url, max_retries=0, **kwargs)


def chat(c: openai.OpenAI, text: str = "hello", **kwargs: Any) -> Any:
    return c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": text}], **kwargs
    )


def raw_request(
    sim: Simulator, method: str, path: str, body: bytes | None = None, key: str | None = KEY_A1
) -> tuple[int, dict[str, str], Any]:
    """A plain HTTP request (for what the openai client will not send)."""
    request = urllib.request.Request(sim.url + path, data=body, method=method)
    if key is not None:
        request.add_header("Authorization", f"Bearer {key}")
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def assert_no_whole_key(text: str) -> None:
    for key in ALL_KEYS:
        assert key not in text


@pytest.fixture()
def sim() -> Iterator[Simulator]:
    with running() as simulator:
        yield simulator


# --------------------------------------------------------------------------- answers


def test_chat_echoes_last_user_message(sim: Simulator) -> None:
    with client(sim) as c:
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "first"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "hello there"}]},
            ],
        )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.model == MODEL
    assert completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == echo_answer("hello there") == "echo: hello there"
    assert choice.finish_reason == "stop"
    chars = len("be brief") + len("first") + len("ok") + len("hello there")
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == -(-chars // 4)
    assert completion.usage.completion_tokens == -(-len("echo: hello there") // 4)
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert raw.headers["x-request-id"].startswith("req_")
    assert raw.headers["openai-organization"] == "org-alpha"
    assert int(raw.headers["openai-processing-ms"]) >= 0


def test_stream_sync_with_usage(sim: Simulator) -> None:
    with client(sim) as c:
        stream = chat(c, "stream me please", stream=True, stream_options={"include_usage": True})
        chunks = list(stream)
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    pieces = [d.content for d in deltas if d.content]
    assert len(pieces) >= 2
    assert "".join(pieces) == echo_answer("stream me please")
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == -(-len(echo_answer("stream me please")) // 4)
    assert sim.key_stats(KEY_A1)["ok"] == 1


def test_stream_without_usage_and_keep_alive(sim: Simulator) -> None:
    with client(sim) as c:
        for _ in range(3):  # several streams over one kept-alive connection
            chunks = list(chat(c, "x", stream=True))
            assert all(ch.usage is None for ch in chunks)
            assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "echo: x"


def test_async_client_plain_stream_and_concurrency(sim: Simulator) -> None:
    async def scenario() -> tuple[str, str, list[str]]:
        async with openai.AsyncOpenAI(api_key=KEY_B, base_url=sim.base_url, max_retries=0) as c:
            plain = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "async"}]
            )
            stream = await c.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "async stream"}], stream=True
            )
            streamed = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            many = await asyncio.gather(
                *(
                    c.chat.completions.create(
                        model=MODEL, messages=[{"role": "user", "content": f"n{i}"}]
                    )
                    for i in range(40)
                )
            )
            return (
                plain.choices[0].message.content or "",
                streamed,
                [m.choices[0].message.content or "" for m in many],
            )

    plain, streamed, many = asyncio.run(scenario())
    assert plain == "echo: async"
    assert streamed == "echo: async stream"
    assert many == [f"echo: n{i}" for i in range(40)]


def test_embeddings_deterministic(sim: Simulator) -> None:
    with client(sim) as c:
        one = c.embeddings.create(model="text-embedding-3-small", input="apple")
        two = c.embeddings.create(model="text-embedding-3-small", input=["apple", "pear"])
        b64 = c.embeddings.create(
            model="text-embedding-3-small", input="apple", encoding_format="base64"
        )
    assert len(one.data[0].embedding) == 8
    assert one.data[0].embedding == two.data[0].embedding
    assert two.data[0].embedding != two.data[1].embedding
    assert [d.index for d in two.data] == [0, 1]
    assert sum(v * v for v in one.data[0].embedding) == pytest.approx(1.0, abs=1e-4)
    assert one.usage.prompt_tokens == 2
    assert isinstance(b64.data[0].embedding, str)


def test_models(sim: Simulator) -> None:
    with client(sim) as c:
        ids = [m.id for m in c.models.list()]
    assert MODEL in ids and len(ids) >= 3


def test_unknown_path_and_malformed_json(sim: Simulator) -> None:
    status, headers, body = raw_request(sim, "POST", "/v1/nope", b"{}")
    assert status == 404
    assert body["error"]["message"] == "Invalid URL (POST /v1/nope)"
    assert headers["x-request-id"].startswith("req_")
    status, headers, body = raw_request(sim, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400
    assert body["error"]["type"] == "invalid_request_error"
    assert headers["openai-organization"] == "org-alpha"
    status, _, body = raw_request(sim, "POST", "/v1/chat/completions", b'{"model": "m"}')
    assert status == 400
    assert body["error"]["param"] == "messages"
    assert sim.key_stats(KEY_A1)["invalid"] == 2
    with client(sim) as c, pytest.raises(openai.BadRequestError):
        chat(c, max_tokens=0)


# --------------------------------------------------------------------------- key statuses


def test_unknown_and_revoked_keys_get_401(sim: Simulator) -> None:
    for key in (KEY_UNKNOWN, KEY_REVOKED):
        with client(sim, key) as c, pytest.raises(openai.AuthenticationError) as info:
            chat(c)
        err = info.value
        assert err.status_code == 401
        assert err.code == "invalid_api_key"
        assert err.type == "invalid_request_error"
        assert isinstance(err.body, dict)
        message = err.body["message"]
        assert message.startswith(f"Incorrect API key provided: {key[:6]}*")
        assert key[-4:] + "." in message
        assert_no_whole_key(message)
        assert err.request_id is not None and err.request_id.startswith("req_")
        if key == KEY_UNKNOWN:
            assert "openai-organization" not in err.response.headers
    assert mask_key_401("sk-abcdefghijkwxyz") == "sk-abc********wxyz"
    assert mask_key_401("short") == "*****"
    assert sim.stats()["totals"]["unauthorized"] == 2


def test_missing_authorization_is_401(sim: Simulator) -> None:
    status, _, body = raw_request(sim, "GET", "/v1/models", key=None)
    assert status == 401
    assert "didn't provide an API key" in body["error"]["message"]


def test_forbidden_key_gets_403(sim: Simulator) -> None:
    with client(sim, KEY_FORBIDDEN) as c, pytest.raises(openai.PermissionDeniedError) as info:
        chat(c)
    assert info.value.code == "unsupported_country_region_territory"
    assert info.value.type == "request_forbidden"
    assert info.value.body == {
        "code": "unsupported_country_region_territory",
        "message": "Country, region, or territory not supported",
        "param": None,
        "type": "request_forbidden",
    }


def test_no_quota_key_gets_429_insufficient_quota(sim: Simulator) -> None:
    with client(sim, KEY_NO_QUOTA) as c, pytest.raises(openai.RateLimitError) as info:
        chat(c)
    err = info.value
    assert err.code == "insufficient_quota"
    assert err.type == "insufficient_quota"
    assert isinstance(err.body, dict)
    assert err.body["message"].startswith("You exceeded your current quota")
    assert "retry-after" not in err.response.headers
    assert sim.key_stats(KEY_NO_QUOTA)["quota"] == 1


def test_set_key_status_revokes_mid_run(sim: Simulator) -> None:
    with client(sim, KEY_B) as c:
        chat(c)
        sim.set_key_status(KEY_B, "revoked")
        with pytest.raises(openai.AuthenticationError):
            chat(c)
        sim.set_key_status(KEY_B, "ok")
        chat(c)
    with pytest.raises(ValueError):
        sim.set_key_status(KEY_B, "bogus")
    with pytest.raises(KeyError) as info:
        sim.set_key_status(KEY_UNKNOWN, "ok")
    assert_no_whole_key(str(info.value))


# --------------------------------------------------------------------------- limits


def test_rpm_limit_with_a_short_window() -> None:
    cfg = config(projects={"proj-a": ProjectLimits(rpm=3)}, window=0.5, retry_after_ms=True)
    with running(cfg) as sim, client(sim) as c:
        error: openai.RateLimitError | None = None
        for _ in range(20):  # a window boundary may pass once; a 429 comes soon after
            try:
                chat(c)
            except openai.RateLimitError as exc:
                error = exc
                break
        assert error is not None
        assert error.code == "rate_limit_exceeded"
        assert error.type == "requests"
        assert isinstance(error.body, dict)
        message = error.body["message"]
        assert re.match(
            rf"Rate limit reached for {MODEL} in organization org-alpha on requests per min "
            r"\(RPM\): Limit 3, Used 3, Requested 1\. Please try again in \d+ms\. "
            r"Visit https://platform\.openai\.com/account/rate-limits to learn more\.$",
            message,
        ), message
        headers = error.response.headers
        assert headers["retry-after"] == "1"
        wait_ms = int(headers["retry-after-ms"])
        assert 1 <= wait_ms <= 500
        assert headers["x-ratelimit-remaining-requests"] == "0"
        time.sleep(wait_ms / 1000 + 0.02)
        assert chat(c).choices[0].message.content == "echo: hello"


def test_keys_of_one_project_share_the_budget() -> None:
    cfg = config(projects={"proj-a": ProjectLimits(rpm=2), "proj-b": ProjectLimits(rpm=2)})
    with running(cfg) as sim:
        with client(sim, KEY_A1) as a1, client(sim, KEY_A2) as a2, client(sim, KEY_B) as b:
            chat(a1)
            chat(a2)
            for c in (a1, a2):
                with pytest.raises(openai.RateLimitError) as info:
                    chat(c)
                assert "in organization org-alpha on requests per min (RPM)" in str(info.value)
            chat(b)  # another project: its own budget
        stats = sim.stats()
        assert stats["projects"]["proj-a"]["ok"] == 2
        assert stats["projects"]["proj-a"]["rate_limited"] == 2
        assert stats["projects"]["proj-b"]["ok"] == 1
        assert sim.key_stats(KEY_A2)["rate_limited"] == 1


def test_tpm_limit_and_request_too_large() -> None:
    # Fixed windows, rejected requests free: each request's cost shows in the counts exactly.
    cfg = config(projects={"proj-a": ProjectLimits(tpm=100)}, limiter="fixed", count_rejected=False)
    with running(cfg) as sim, client(sim) as c:
        with pytest.raises(openai.RateLimitError) as info:
            chat(c, "abcd", max_tokens=200)  # 1 + 200 tokens > the whole TPM
        err = info.value
        assert err.code == "rate_limit_exceeded"
        assert err.type == "tokens"
        assert str(err.body["message"]).startswith(  # type: ignore[index]
            f"Request too large for {MODEL} in organization org-alpha on tokens per min (TPM): "
            "Limit 100, Requested 201."
        )
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "abcd"}], max_completion_tokens=59
        )
        assert raw.headers["x-ratelimit-remaining-tokens"] == "40"  # the too-large one is free
        with pytest.raises(openai.RateLimitError) as info:
            chat(c, "abcd", max_tokens=59)
        assert info.value.type == "tokens"
        assert "tokens per min (TPM): Limit 100, Used 60, Requested 60." in str(info.value)
        assert "retry-after" in info.value.response.headers
        chat(c, "abcd", max_tokens=39)  # exactly fills the budget
        totals = sim.stats()["totals"]
        assert (totals["too_large"], totals["rate_limited"], totals["ok"]) == (1, 1, 2)
        assert sim.stats()["projects"]["proj-a"]["tokens"] == 100


def test_ratelimit_headers_on_success() -> None:
    cfg = config(projects={"proj-a": ProjectLimits(rpm=10, tpm=1000)})
    with running(cfg) as sim, client(sim) as c:
        remaining = []
        for _ in range(2):
            raw = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "12345678"}]
            )
            headers = raw.headers
            assert headers["x-ratelimit-limit-requests"] == "10"
            assert headers["x-ratelimit-limit-tokens"] == "1000"
            assert GO_DURATION.match(headers["x-ratelimit-reset-requests"])
            assert GO_DURATION.match(headers["x-ratelimit-reset-tokens"])
            remaining.append(
                (
                    int(headers["x-ratelimit-remaining-requests"]),
                    int(headers["x-ratelimit-remaining-tokens"]),
                )
            )
        assert remaining == [(9, 1000 - 18), (8, 1000 - 36)]
        with client(sim, KEY_B) as b:  # a project without limits: no x-ratelimit headers
            headers = b.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            ).headers
            assert not any(name.startswith("x-ratelimit") for name in headers)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.012, "12ms"),
        (0.644, "644ms"),
        (0.0001, "1ms"),
        (1, "1s"),
        (9.816, "9.816s"),
        (18.642, "18.642s"),
        (20, "20s"),
        (90.5, "1m30.5s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.25, "1h2m3.25s"),
        (-3, "0s"),
    ],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_fixed_windows_with_a_fake_clock() -> None:
    now = [100.0]
    cfg = SimulatorConfig(
        keys=(SimKey(KEY_A1, project="p"),),
        projects={"p": ProjectLimits(rpm=2)},
        window=10.0,
        limiter="fixed",
        count_rejected=False,
    )
    state = SimState(cfg, clock=lambda: now[0])

    def attempt() -> int:
        ticket = state.begin(KEY_A1)
        assert state.check_key(ticket, KEY_A1) is None
        verdict = state.admit(ticket, MODEL, 1)
        if verdict.status == 200:
            state.record_ok(ticket)
        state.end(ticket)
        return verdict.status

    assert [attempt(), attempt(), attempt()] == [200, 200, 429]
    now[0] = 109.9
    assert attempt() == 429
    now[0] = 110.0  # next window
    assert [attempt(), attempt(), attempt()] == [200, 200, 429]
    ticket = state.begin(KEY_A1)
    state.check_key(ticket, KEY_A1)
    now[0] = 115.5
    verdict = state.admit(ticket, MODEL, 1)
    assert verdict.body is not None
    assert "Please try again in 4.5s." in verdict.body["error"]["message"]
    assert ("retry-after", "5") in verdict.headers
    assert ("x-ratelimit-reset-requests", "4.5s") in verdict.headers


# --------------------------------------------------------------------------- faults, latency


def test_faults_500_and_503() -> None:
    with running(config(faults=Faults(error_500=1.0))) as sim, client(sim) as c:
        with pytest.raises(openai.InternalServerError) as info:
            chat(c)
        assert info.value.status_code == 500
        assert info.value.type == "server_error"
        assert str(info.value.body["message"]).startswith(  # type: ignore[index]
            "The server had an error processing your request. Sorry about that!"
        )
        sim.configure(config(faults=Faults(error_503=1.0)))
        with pytest.raises(openai.InternalServerError) as info:
            chat(c)
        assert info.value.status_code == 503
        assert "That model is currently overloaded with other requests" in str(info.value)
        assert sim.stats()["totals"]["faults"] == 2


def test_fault_drop_and_spurious_rate_limit() -> None:
    with running(config(faults=Faults(drop=1.0))) as sim:
        with client(sim) as c, pytest.raises(openai.APIConnectionError):
            chat(c)
        sim.configure(config(faults=Faults(rate_limit=1.0)))
        with client(sim) as c, pytest.raises(openai.RateLimitError) as info:
            chat(c)
        assert info.value.code == "rate_limit_exceeded"
        assert info.value.response.headers["retry-after"] == "1"
        assert "Please try again in 1s." in str(info.value)
        sim.configure(config())
        with client(sim) as c:
            chat(c)
        assert sim.key_stats(KEY_A1)["faults"] == 2
        assert sim.key_stats(KEY_A1)["ok"] == 1


def test_latency_slow_fault_and_seeded_faults() -> None:
    cfg = config(latency=0.05, faults=Faults(slow=1.0, slow_seconds=0.1))
    with running(cfg) as sim, client(sim) as c:
        started = time.monotonic()
        chat(c)
        assert time.monotonic() - started >= 0.15

    def outcomes() -> list[str]:
        seen = []
        with running(config(faults=Faults(error_500=0.5), seed=7)) as sim, client(sim) as c:
            for _ in range(12):
                try:
                    chat(c)
                    seen.append("ok")
                except openai.InternalServerError:
                    seen.append("500")
        return seen

    first = outcomes()
    assert first == outcomes()
    assert "ok" in first and "500" in first


# --------------------------------------------------------------------------- counters


def test_counters_reconcile_with_what_the_client_saw() -> None:
    cfg = config(projects={"proj-a": ProjectLimits(rpm=3)})
    with running(cfg) as sim:
        seen: dict[str, int] = {"ok": 0, "rate_limited": 0, "unauthorized": 0, "quota": 0}
        for key in (KEY_A1, KEY_A2, KEY_A1, KEY_A2, KEY_B, KEY_REVOKED, KEY_UNKNOWN, KEY_NO_QUOTA):
            with client(sim, key) as c:
                try:
                    chat(c)
                    seen["ok"] += 1
                except openai.AuthenticationError:
                    seen["unauthorized"] += 1
                except openai.RateLimitError as exc:
                    seen["quota" if exc.code == "insufficient_quota" else "rate_limited"] += 1
        with client(sim, KEY_B) as c:
            list(chat(c, stream=True))
            seen["ok"] += 1
        assert seen == {"ok": 5, "rate_limited": 1, "unauthorized": 2, "quota": 1}
        stats = sim.stats()
        totals = stats["totals"]
        assert totals["requests"] == 9
        for name, count in seen.items():
            assert totals[name] == count
        assert totals["in_flight"] == 0
        outcomes = ["ok", "rate_limited", "quota", "unauthorized", "forbidden", "faults"]
        outcomes += ["too_large", "invalid"]
        assert sum(totals[name] for name in outcomes) == totals["requests"]
        # Keys are known by label only; the unknown key has no entry of its own.
        assert set(stats["keys"]) == {key_label(k.key) for k in STANDARD_KEYS}
        assert stats["keys"]["sk-…1111"] == sim.key_stats(KEY_A1)
        assert sum(k["requests"] for k in stats["keys"].values()) == 8
        assert stats["projects"]["proj-a"] == {
            "requests": 4,
            "ok": 3,
            "rate_limited": 1,
            "tokens": 3 * (2 + 16),
            "in_flight": 0,
            "max_in_flight": 1,
        }
        assert_no_whole_key(json.dumps(stats))

        status, _, served = raw_request(sim, "GET", "/_sim/stats", key=None)
        assert status == 200 and served == sim.stats()
        status, _, _ = raw_request(sim, "POST", "/_sim/reset", b"", key=None)
        assert status == 200
        assert sim.stats()["totals"]["requests"] == 0
        assert sim.key_stats(KEY_A1)["ok"] == 0


def test_many_concurrent_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many clients at once are all answered, and the server holds 100 of them in flight together.

    Concurrency is shown by a gate, not by timing: each request waits inside the server (where
    its latency would be slept) until ``together`` requests are there at once. A server that
    handled fewer at a time would break the gate and fail those requests; on a loaded machine
    the gate just takes longer to fill.
    """
    clients, together = 200, 100
    gate = threading.Barrier(together, timeout=120)
    admitted = _server._Handler._admitted

    def gathered(handler: _server._Handler, verdict: Any) -> bool:
        gate.wait()
        return admitted(handler, verdict)

    monkeypatch.setattr(_server._Handler, "_admitted", gathered)
    with running(config()) as sim:
        outcomes: list[int | str] = []
        lock = threading.Lock()
        start = threading.Barrier(clients, timeout=120)
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "c"}]})
        headers = {"Authorization": f"Bearer {KEY_B}", "Content-Type": "application/json"}

        def one() -> None:
            connection = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=120)
            outcome: int | str
            try:
                start.wait()
                connection.request("POST", "/v1/chat/completions", body, headers)
                response = connection.getresponse()
                response.read()
                outcome = response.status
            except Exception as exc:  # reported by the assertion below, not lost in a thread
                outcome = repr(exc)
            finally:
                connection.close()
            with lock:
                outcomes.append(outcome)

        threads = [threading.Thread(target=one) for _ in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert outcomes == [200] * clients
        totals = sim.stats()["totals"]
        assert totals["ok"] == clients
        assert totals["max_in_flight"] >= together


# --------------------------------------------------------------------------- config


def test_from_dict_round_trip_and_shorthand() -> None:
    cfg = config(
        projects={"proj-a": ProjectLimits(rpm=5, tpm=None)},
        faults=Faults(error_500=0.1, slow_seconds=2),
        retry_after_ms=True,
        seed=3,
    )
    assert SimulatorConfig.from_dict(cfg.to_dict()) == cfg
    short = SimulatorConfig.from_dict({"keys": [KEY_A1], "window": 1})
    assert short.keys == (SimKey(KEY_A1),)
    assert short.window == 1


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"keys": [{"key": KEY_A1, "status": "gone"}]}, ValueError, r"keys\[0\]\.status"),
        ({"keys": [{"project": "p"}]}, ValueError, r"keys\[0\]\.key: is required"),
        ({"keys": [{"key": 5}]}, TypeError, r"keys\[0\]\.key: must be a string"),
        ({"keys": [KEY_A1, KEY_A1]}, ValueError, r"keys\[1\]\.key: duplicate"),
        ({"keys": KEY_A1}, TypeError, r"keys: must be a list"),
        ({"projects": {"p": {"rpm": 0}}}, ValueError, r"projects\['p'\]\.rpm"),
        ({"projects": {"p": {"rpm": "5"}}}, TypeError, r"projects\['p'\]\.rpm"),
        ({"projects": {"p": {"rpn": 5}}}, ValueError, r"projects\['p'\]: unknown field 'rpn'"),
        ({"faults": {"error_500": 1.5}}, ValueError, r"faults\.error_500"),
        ({"window": 0}, ValueError, r"window"),
        ({"window": "60"}, TypeError, r"window"),
        ({"latency": -1}, ValueError, r"latency"),
        ({"retry_after_ms": 1}, TypeError, r"retry_after_ms"),
        ({"seed": 1.5}, TypeError, r"seed"),
        ({"windows": 1}, ValueError, r"unknown field 'windows'"),
    ],
)
def test_from_dict_validation(data: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match) as info:
        SimulatorConfig.from_dict(data)
    assert_no_whole_key(str(info.value))


def test_colliding_key_labels_stay_distinct() -> None:
    keys = (SimKey("sk-one-xxxxxx-9999"), SimKey("sk-two-xxxxxx-9999"))
    with running(SimulatorConfig(keys=keys)) as sim:
        with client(sim, keys[1].key) as c:
            chat(c)
        labels = sim.stats()["keys"]
    assert len(labels) == 2
    assert all(label.startswith("sk-…9999") for label in labels)
    assert sim.key_stats(keys[1].key)["ok"] == 1
    assert sim.key_stats(keys[0].key)["ok"] == 0


def test_public_names() -> None:
    import stable_openai.simulator as package

    assert package.__all__ == sorted(package.__all__)
    assert set(package.__all__) == {
        "Faults",
        "ModelLimits",
        "ProjectLimits",
        "SimKey",
        "Simulator",
        "SimulatorConfig",
        "echo_answer",
    }
    assert hash(config()) == hash(config())


def test_simkey_repr_masks_the_key() -> None:
    text = repr(SimKey(KEY_A1)) + repr(config())
    assert_no_whole_key(text)
    assert key_label(KEY_A1) in text


def test_host_must_be_loopback() -> None:
    for host in ("0.0.0.0", "192.168.1.10", "example.com", "", "::"):
        with pytest.raises(ValueError, match="loopback"):
            Simulator(host=host)
    Simulator(host="::1")
    with Simulator(config(), host="localhost") as sim:
        assert sim.url.startswith("http://127.0.0.1:")
    with Simulator(config(), host="127.0.0.2") as sim:
        assert sim.base_url == f"http://127.0.0.2:{sim.port}/v1"
        with client(sim) as c:
            chat(c)


def test_stop_is_idempotent_and_closes_kept_alive_connections() -> None:
    sim = Simulator(config()).start()
    with client(sim) as c:
        chat(c)
        sim.stop()
        sim.stop()
        with pytest.raises(openai.APIConnectionError):
            chat(c)


def test_serve_forever_in_the_foreground() -> None:
    sim = Simulator(config(), port=0)
    thread = threading.Thread(target=sim.serve_forever)
    thread.start()
    deadline = time.monotonic() + 5
    while True:
        try:
            with client(sim) as c:
                chat(c)
            break
        except (RuntimeError, openai.APIConnectionError):
            assert time.monotonic() < deadline
            time.sleep(0.01)
    sim.stop()
    thread.join(timeout=5)
    assert not thread.is_alive()


# --------------------------------------------------------------------------- CLI


def test_cli_serves_and_exits_on_sigint() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "stable_openai.simulator._cli",
            "--key",
            f"{KEY_A1}:proj-a",
            "--key",
            f"{KEY_REVOKED}:proj-a:revoked",
            "--rpm",
            "100",
            "--port",
            "0",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.fullmatch(
            r"stable-openai simulator listening on (http://127\.0\.0\.1:\d+/v1)\n", line
        )
        assert match, line
        with openai.OpenAI(api_key=KEY_A1, base_url=match.group(1), max_retries=0) as c:
            assert chat(c).choices[0].message.content == "echo: hello"
            raw = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}]
            )
            assert raw.headers["x-ratelimit-limit-requests"] == "100"
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0
    assert "Traceback" not in stderr
    assert_no_whole_key(line + stdout + stderr)


def test_cli_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stable_openai.simulator._cli import main

    assert main(["--key", f"{KEY_A1}:proj:bogus"]) == 2
    assert main([]) == 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"keys": [{"key": KEY_A1, "status": "nope"}]}))
    assert main(["--config", str(bad)]) == 2
    bad.write_text("{oops")
    assert main(["--config", str(bad)]) == 2
    assert main(["--key", KEY_A1, "--host", "0.0.0.0"]) == 2
    assert main(["--key", KEY_A1, "--rpm", "0"]) == 2
    err = capsys.readouterr().err
    assert "keys[0].status" in err
    assert "loopback" in err
    assert "Traceback" not in err
    assert_no_whole_key(err)
