"""Tests of the simulator's limits: meters, pools, rejected requests, profiles, config and CLI.

Arithmetic is checked on a fake clock (``SimState(config, clock=...)`` and the pure meters of
``_limiter``), so every number is exact. Behaviour on the wire is checked with the real ``openai``
client over real HTTP; there, timing assertions only go in the safe direction (a request sent
well before its advertised wait is rejected, one sent after it is admitted) with wide margins.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from stable_openai.simulator import (
    Faults,
    ModelLimits,
    ProjectLimits,
    SimKey,
    Simulator,
    SimulatorConfig,
    _limiter,
)
from stable_openai.simulator._cli import ConfigError, build_parser, config_from_args, main
from stable_openai.simulator._config import DAY_WINDOWS
from stable_openai.simulator._state import SimState, Verdict

KEY = "sk-test-alpha-0000001111"
KEY_B = "sk-test-bravo-0000003333"
ORG = "org-alpha"
MODEL = "gpt-4o-mini"
FAMILY = ("gpt-4o", "gpt-4o-2024-08-06")
EMBEDDING_MODEL = "text-embedding-3-small"
HELLO_COST = 2 + 16  # ceil(len("hello") / 4) + the default completion budget
RATE_LIMITS_TAIL = " Visit https://platform.openai.com/account/rate-limits to learn more."
BILLING_TAIL = (
    " You can increase your rate limit by adding a payment method to your account at "
    "https://platform.openai.com/account/billing."
)
GO_DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
RATE_LIMIT_MESSAGE = re.compile(
    r"^Rate limit reached for (?P<model>\S+) in organization (?P<org>\S+) on "
    r"(?P<name>[a-z ]+ \((?:RPM|TPM|RPD|TPD)\)): Limit (?P<limit>\d+), Used (?P<used>\d+), "
    r"Requested (?P<requested>\d+)\. Please try again in (?P<wait>[0-9hms.]+)\. "
    r"Visit https://platform\.openai\.com/account/rate-limits to learn more\.(?P<tail>.*)$"
)
AZURE_MESSAGE = re.compile(
    r"^Requests to the (?P<operation>\w+) Operation under Azure OpenAI API version "
    r"2024-02-15-preview have exceeded (?P<what>call|token) rate limit of your current OpenAI "
    r"S0 pricing tier\. Please retry after (?P<seconds>\d+) seconds\. Please go here: "
    r"https://aka\.ms/oai/quotaincrease if you would like to further increase the default "
    r"rate limit\.$"
)
BUDGET_HEADERS = tuple(
    f"x-ratelimit-{what}-{counts}"
    for counts in ("requests", "tokens")
    for what in ("limit", "remaining", "reset")
)


# --------------------------------------------------------------------------- helpers


def go_seconds(text: str) -> float:
    """Seconds of a Go duration as the simulator writes it (``12ms``, ``1m30.5s``, ...)."""
    assert GO_DURATION.match(text), text
    if text.endswith("ms"):
        return int(text[:-2]) / 1000
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(\d+(?:\.\d+)?)s", text)
    assert match, text
    hours, minutes, seconds = match.groups()
    return int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds)


def sim_config(limits: ProjectLimits | None = None, **overrides: Any) -> SimulatorConfig:
    """Key ``KEY`` in proj-a (with ``limits``) and ``KEY_B`` in the unlimited proj-b."""
    values: dict[str, Any] = {
        "keys": (
            SimKey(KEY, project="proj-a", organization=ORG),
            SimKey(KEY_B, project="proj-b", organization="org-bravo"),
        ),
        "projects": {} if limits is None else {"proj-a": limits},
        "window": 60.0,
    }
    values.update(overrides)
    return SimulatorConfig(**values)


class Driver:
    """A ``SimState`` on a fake clock (starting at 0.0), driven one request at a time."""

    def __init__(self, limits: ProjectLimits, **overrides: Any) -> None:
        self.now = 0.0
        self.state = SimState(sim_config(limits, **overrides), clock=lambda: self.now)

    def send(
        self,
        model: str = MODEL,
        cost: int = 1,
        *,
        at: float | None = None,
        operation: str = "ChatCompletions_Create",
    ) -> Verdict:
        if at is not None:
            self.now = at
        ticket = self.state.begin(KEY)
        assert self.state.check_key(ticket, KEY) is None
        verdict = self.state.admit(ticket, model, cost, operation=operation)
        if verdict.status == 200:
            self.state.record_ok(ticket)
        self.state.end(ticket)
        return verdict


def headers_of(verdict: Verdict) -> dict[str, str]:
    return dict(verdict.headers)


def message_of(verdict: Verdict) -> str:
    assert verdict.status == 429, verdict
    message = verdict.body["error"]["message"]
    assert isinstance(message, str)
    return message


def parsed(message: str) -> dict[str, Any]:
    """The numbers of an OpenAI rate-limit message."""
    match = RATE_LIMIT_MESSAGE.match(message)
    assert match, message
    found: dict[str, Any] = match.groupdict()
    for name in ("limit", "used", "requested"):
        found[name] = int(found[name])
    found["wait_s"] = go_seconds(found["wait"])
    return found


@contextmanager
def serving(cfg: SimulatorConfig) -> Iterator[tuple[Simulator, openai.OpenAI]]:
    with Simulator(cfg) as sim, openai.OpenAI(
        api_key=KEY, base_url=sim.base_url, max_retries=0
    ) as c:
        yield sim, c


def chat(c: openai.OpenAI, model: str = MODEL, text: str = "hello", **kwargs: Any) -> Any:
    return c.chat.completions.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs
    )


def chat_raw(c: openai.OpenAI, model: str = MODEL, text: str = "hello", **kwargs: Any) -> Any:
    return c.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": text}], **kwargs
    )


def rejected(c: openai.OpenAI, model: str = MODEL, **kwargs: Any) -> openai.RateLimitError:
    with pytest.raises(openai.RateLimitError) as info:
        chat(c, model, **kwargs)
    assert info.value.status_code == 429
    return info.value


def try_chat(c: openai.OpenAI, model: str = MODEL) -> openai.RateLimitError | None:
    """``None`` if the request was admitted, else its 429."""
    try:
        chat(c, model)
    except openai.RateLimitError as exc:
        return exc
    return None


def budget_names(headers: Any) -> set[str]:
    return {name.lower() for name in headers if name.lower().startswith("x-ratelimit-")}


# --------------------------------------------------------------------------- meters


def test_bucket_meter_drains_continuously_and_resets_when_empty() -> None:
    meter = _limiter.BucketMeter(10, 60.0)  # drains one unit every 6 s
    assert (meter.used(0.0), meter.remaining(0.0), meter.reset_in(0.0)) == (0.0, 10, 0.0)
    meter.charge(10, 0.0)
    assert meter.used(0.0) == 10.0
    assert meter.remaining(0.0) == 0
    assert meter.reset_in(0.0) == 60.0  # level·period/limit: the time until it is empty
    assert meter.used(30.0) == 5.0
    assert meter.remaining(30.0) == 5
    assert meter.reset_in(30.0) == 30.0
    assert meter.remaining(33.0) == 5  # floor(10 - 4.5)
    assert meter.used(60.0) == 0.0
    assert meter.used(600.0) == 0.0  # never below empty
    meter.charge(3, 600.0)
    assert meter.reset_in(600.0) == 18.0


def test_bucket_meter_wait_is_excess_times_period_over_limit() -> None:
    meter = _limiter.BucketMeter(10, 60.0)
    meter.charge(10, 0.0)
    assert meter.wait(1, 0.0) == 6.0  # (10 + 1 - 10)·60/10
    assert meter.wait(4, 0.0) == 24.0
    assert meter.wait(10, 0.0) == 60.0
    assert meter.wait(11, 0.0) == math.inf  # more than the whole bucket: never fits
    assert meter.wait(5, 30.0) == 0.0  # level 5: 5 more fit
    assert meter.wait(6, 30.0) == 6.0  # (5 + 6 - 10)·6
    assert meter.wait(1, 6.0) == 0.0  # exactly one unit drained: fits at once


@pytest.mark.parametrize("kind", _limiter.LIMITERS)
def test_charge_rejected_uses_what_is_left_up_to_its_cost(kind: str) -> None:
    meter = _limiter.make_meter(kind, 10, 60.0, origin=0.0)
    meter.charge(5, 1.0)
    meter.charge_rejected(3, 1.0)  # 5 left, cost 3: charges 3
    assert meter.used(1.0) == 8.0
    meter.charge_rejected(5, 1.0)  # 2 left, cost 5: charges only 2
    assert meter.used(1.0) == 10.0
    meter.charge_rejected(4, 1.0)  # nothing left: charges nothing, never beyond the limit
    assert meter.used(1.0) == 10.0
    assert meter.remaining(1.0) == 0


def test_bucket_charge_rejected_keeps_a_draining_bucket_full() -> None:
    meter = _limiter.BucketMeter(2, 1.0)
    meter.charge(2, 0.0)
    meter.charge_rejected(1, 0.25)  # drained 0.5 by now: the rejection takes it back
    assert meter.used(0.25) == 2.0
    assert meter.wait(1, 0.25) == 0.5  # R·W/L after a rejection at a full bucket


def test_fixed_meter_waits_until_the_window_ends() -> None:
    meter = _limiter.FixedMeter(3, 10.0, origin=100.0)  # windows [100, 110), [110, 120), ...
    assert meter.reset_in(101.0) == 0.0  # nothing counted: nothing to reset
    meter.charge(2, 101.0)
    assert meter.wait(1, 102.0) == 0.0
    assert meter.wait(2, 102.0) == 8.0  # time to the end of the window
    assert meter.reset_in(102.0) == 8.0
    meter.charge(1, 104.0)
    assert meter.remaining(104.0) == 0
    assert meter.wait(1, 109.5) == 0.5
    assert meter.used(110.0) == 0.0  # a new window: usage back to 0
    assert meter.wait(3, 110.0) == 0.0
    assert meter.wait(4, 110.0) == math.inf


def test_sliding_meter_waits_until_enough_admissions_age_out() -> None:
    meter = _limiter.SlidingMeter(3, 10.0)
    for at in (0.0, 2.0, 4.0):
        meter.charge(1, at)
    assert meter.wait(1, 5.0) == 5.0  # the admission of 0.0 leaves at 10.0
    assert meter.wait(2, 5.0) == 7.0  # ... and that of 2.0 at 12.0
    assert meter.wait(3, 5.0) == 9.0
    assert meter.reset_in(5.0) == 9.0  # the newest leaves at 14.0
    assert meter.used(9.999) == 3.0
    assert meter.used(10.0) == 2.0
    assert meter.wait(1, 10.0) == 0.0
    tokens = _limiter.SlidingMeter(100, 10.0)
    tokens.charge(30, 0.0)
    tokens.charge(50, 1.0)
    tokens.charge(20, 2.0)
    assert tokens.wait(40, 3.0) == 8.0  # 30 of 0.0 is not enough: wait for 50 of 1.0 too
    assert tokens.wait(101, 3.0) == math.inf


def test_meter_validation() -> None:
    with pytest.raises(ValueError, match="limiter: must be one of bucket, fixed, sliding"):
        _limiter.make_meter("leaky", 1, 1.0, 0.0)
    for limit, period in ((0, 1.0), (1, 0.0), (1, -1.0)):
        with pytest.raises(ValueError, match="limit >= 1 and period > 0"):
            _limiter.BucketMeter(limit, period)


# --------------------------------------------------------------------------- state, fake clock


def test_bucket_headers_and_429_numbers() -> None:
    driver = Driver(ProjectLimits(rpm=4), window=2.0)  # one request per 0.5 s
    first = headers_of(driver.send())
    assert first["x-ratelimit-limit-requests"] == "4"
    assert first["x-ratelimit-remaining-requests"] == "3"
    assert first["x-ratelimit-reset-requests"] == "500ms"
    second = headers_of(driver.send())
    assert second["x-ratelimit-remaining-requests"] == "2"
    assert second["x-ratelimit-reset-requests"] == "1s"
    driver.send()
    driver.send()
    verdict = driver.send(at=0.25)  # level 3.5: no room for 1 more
    assert verdict.status == 429
    numbers = parsed(message_of(verdict))
    assert numbers["name"] == "requests per min (RPM)"
    assert (numbers["limit"], numbers["used"], numbers["requested"]) == (4, 4, 1)
    assert numbers["wait"] == "500ms"  # R·W/L: the rejection filled the bucket back up
    assert numbers["tail"] == ""
    assert verdict.body["error"]["type"] == "requests"
    assert verdict.body["error"]["code"] == "rate_limit_exceeded"
    headers = headers_of(verdict)
    assert headers["retry-after"] == "1"
    assert "retry-after-ms" not in headers
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert headers["x-ratelimit-reset-requests"] == "2s"
    assert driver.send(at=0.74).status == 429
    assert driver.send(at=0.74 + 0.5).status == 200  # just the advertised 500 ms later


def test_429_without_count_rejected_reports_the_true_level() -> None:
    driver = Driver(ProjectLimits(rpm=4), window=2.0, count_rejected=False, retry_after_ms=True)
    for _ in range(4):
        driver.send()
    verdict = driver.send(at=0.25)
    numbers = parsed(message_of(verdict))
    assert (numbers["used"], numbers["wait"]) == (4, "250ms")  # ceil(3.5); (3.5 + 1 - 4)·0.5
    assert headers_of(verdict)["retry-after-ms"] == "250"
    assert headers_of(verdict)["x-ratelimit-remaining-requests"] == "0"
    assert headers_of(verdict)["x-ratelimit-reset-requests"] == "1.75s"  # 3.5·2/4: unchanged
    assert driver.send(at=0.5).status == 200


@pytest.mark.parametrize("count_rejected", [True, False])
def test_retrying_every_few_ms_into_a_full_bucket(count_rejected: bool) -> None:
    driver = Driver(ProjectLimits(rpm=2), window=1.0, count_rejected=count_rejected)
    assert [driver.send().status, driver.send().status] == [200, 200]
    step = 1 / 64  # exact in binary: the refill time 0.5 s is exactly step 32
    admitted_at = None
    for k in range(1, 641):  # ten seconds of retries, 64 a second
        if driver.send(at=k * step).status == 200:
            admitted_at = k * step
            break
    if count_rejected:
        # Each retry takes back what drained since the last one: the bucket never has room.
        assert admitted_at is None
    else:
        assert admitted_at == 0.5  # the refill time of one request, not a moment later


def test_rejected_tokens_fill_the_bucket_up_to_the_limit_only() -> None:
    driver = Driver(ProjectLimits(tpm=100), window=1.0)
    assert driver.send(cost=70).status == 200
    verdict = driver.send(cost=50)
    numbers = parsed(message_of(verdict))
    assert numbers["name"] == "tokens per min (TPM)"
    assert (numbers["limit"], numbers["used"], numbers["requested"]) == (100, 100, 50)
    assert numbers["wait"] == "500ms"  # R·W/L = 50·1/100
    assert verdict.body["error"]["type"] == "tokens"
    headers = headers_of(verdict)
    assert headers["x-ratelimit-remaining-tokens"] == "0"
    assert headers["x-ratelimit-reset-tokens"] == "1s"  # full (100, not 120): 100·1/100
    assert driver.send(cost=50, at=0.5).status == 200


def test_fixed_limiter_429_waits_for_the_next_window() -> None:
    driver = Driver(ProjectLimits(rpm=2), window=10.0, limiter="fixed", retry_after_ms=True)
    driver.send(at=1.0)
    driver.send(at=2.0)
    verdict = driver.send(at=5.5)
    assert parsed(message_of(verdict))["wait"] == "4.5s"
    headers = headers_of(verdict)
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("5", "4500")
    assert headers["x-ratelimit-reset-requests"] == "4.5s"
    assert driver.send(at=9.999).status == 429
    assert driver.send(at=10.0).status == 200
    assert headers_of(driver.send(at=10.0))["x-ratelimit-remaining-requests"] == "0"


def test_sliding_limiter_429_waits_for_old_admissions_to_expire() -> None:
    driver = Driver(ProjectLimits(rpm=3), window=10.0, limiter="sliding")
    for at in (0.0, 2.0, 4.0):
        assert driver.send(at=at).status == 200
    verdict = driver.send(at=5.0)
    assert parsed(message_of(verdict))["wait"] == "5s"  # until the admission of 0.0 expires
    assert headers_of(verdict)["x-ratelimit-reset-requests"] == "9s"  # the newest one: 14.0
    assert driver.send(at=9.5).status == 429
    assert driver.send(at=10.0).status == 200
    assert parsed(message_of(driver.send(at=10.0)))["wait"] == "2s"  # now 2.0 must expire


def test_a_models_429s_leave_other_models_alone_and_a_family_shares_one_budget() -> None:
    limits = ProjectLimits(rpm=10, per_model=(ModelLimits(FAMILY, rpm=2),))
    driver = Driver(limits, window=60.0)
    assert driver.send("gpt-4o").status == 200
    assert headers_of(driver.send("gpt-4o-2024-08-06"))["x-ratelimit-limit-requests"] == "2"
    for model in (*FAMILY, *FAMILY):  # the family's budget is spent, for both names
        verdict = driver.send(model)
        numbers = parsed(message_of(verdict))
        assert (numbers["model"], numbers["limit"], numbers["used"]) == (model, 2, 2)
        assert numbers["org"] == ORG
    other = headers_of(driver.send(MODEL))  # the project-level pool: untouched by those 429s
    assert other["x-ratelimit-limit-requests"] == "10"
    assert other["x-ratelimit-remaining-requests"] == "9"
    for _ in range(9):
        assert driver.send("gpt-4.1-mini").status == 200  # unlisted models share the project's
    assert parsed(message_of(driver.send(MODEL)))["limit"] == 10
    assert driver.send("gpt-4o", at=30.0).status == 200  # 30 s: one of two family units back


def test_a_request_must_fit_rpm_and_rpd_and_the_429_names_the_one_it_broke() -> None:
    driver = Driver(ProjectLimits(rpm=100, rpd=50), window=1.0)  # a day is 1440 s
    assert DAY_WINDOWS == 1440
    for _ in range(50):
        assert driver.send().status == 200
    verdict = driver.send()
    message = message_of(verdict)
    numbers = parsed(message)
    assert numbers["name"] == "requests per day (RPD)"
    assert (numbers["limit"], numbers["used"], numbers["requested"]) == (50, 50, 1)
    assert numbers["wait"] == "28.8s"  # 1440 s / 50: one request per 28.8 s
    assert numbers["tail"] == BILLING_TAIL
    headers = headers_of(verdict)
    assert headers["retry-after"] == "29"
    assert headers["x-ratelimit-limit-requests"] == "50"  # the daily meter, not the RPM one
    assert headers["x-ratelimit-reset-requests"] == "24m0s"
    assert driver.send(at=28.7).status == 429
    assert driver.send(at=28.8).status == 200
    # Now the other way round: RPD has room, RPM does not.
    driver = Driver(ProjectLimits(rpm=2, rpd=50), window=1.0)
    driver.send()
    driver.send()
    numbers = parsed(message_of(driver.send()))
    assert numbers["name"] == "requests per min (RPM)"
    assert (numbers["limit"], numbers["wait"]) == (2, "500ms")


def test_rpd_429_while_rpm_is_also_full_names_the_longer_wait() -> None:
    driver = Driver(ProjectLimits(rpm=2, rpd=2), window=1.0)
    driver.send()
    driver.send()
    numbers = parsed(message_of(driver.send()))  # RPM: 500 ms; RPD: 720 s
    assert numbers["name"] == "requests per day (RPD)"
    assert numbers["wait"] == "12m0s"


def test_daily_limits_are_not_charged_by_rejected_requests() -> None:
    driver = Driver(ProjectLimits(rpm=1000, rpd=50), window=1.0)
    for _ in range(50):
        driver.send()
    for k in range(200):  # 200 rejections within the day's first 28 s
        assert driver.send(at=k * 0.14).status == 429
    verdict = driver.send(at=28.8)  # as if none of them had happened
    assert verdict.status == 200
    assert headers_of(verdict)["x-ratelimit-remaining-requests"] == "0"
    assert headers_of(verdict)["x-ratelimit-reset-requests"] == "24m0s"
    # Same for tokens: a rejected request does not fill TPD.
    driver = Driver(ProjectLimits(tpd=100), window=1.0)
    assert driver.send(cost=60).status == 200
    for _ in range(5):
        verdict = driver.send(cost=60)
        numbers = parsed(message_of(verdict))
        assert (numbers["used"], numbers["wait"]) == (60, "4m48s")  # (60+60-100)·14.4 s
        assert headers_of(verdict)["x-ratelimit-remaining-tokens"] == "40"


def test_tpd_message_and_daily_token_headers() -> None:
    driver = Driver(ProjectLimits(tpm=1000, tpd=100), window=1.0)
    headers = headers_of(driver.send(cost=60))
    assert headers["x-ratelimit-limit-tokens"] == "100"  # the daily meter
    assert headers["x-ratelimit-remaining-tokens"] == "40"
    assert headers["x-ratelimit-reset-tokens"] == "14m24s"  # 60·1440/100 s
    verdict = driver.send(cost=60)
    numbers = parsed(message_of(verdict))
    assert numbers["name"] == "tokens per day (TPD)"
    assert (numbers["limit"], numbers["used"], numbers["requested"]) == (100, 60, 60)
    assert numbers["wait"] == "4m48s"
    assert numbers["tail"] == ""  # the billing sentence is for RPD only
    assert verdict.body["error"]["type"] == "tokens"


@pytest.mark.parametrize(
    ("limits", "name", "limit"),
    [
        (ProjectLimits(tpm=100), "tokens per min (TPM)", 100),
        (ProjectLimits(tpm=1000, tpd=100), "tokens per day (TPD)", 100),
    ],
)
def test_too_large_requests_are_never_admitted(
    limits: ProjectLimits, name: str, limit: int
) -> None:
    driver = Driver(limits, window=1.0)
    for at in (0.0, 1.0, 60.0, 10_000.0):  # however long it waits
        verdict = driver.send(cost=101, at=at)
        assert verdict.status == 429
        assert message_of(verdict) == (
            f"Request too large for {MODEL} in organization {ORG} on {name}: Limit {limit}, "
            "Requested 101. The input or output tokens must be reduced in order to run "
            "successfully." + RATE_LIMITS_TAIL
        )
        assert "retry-after" not in headers_of(verdict)
    assert headers_of(driver.send(cost=100))["x-ratelimit-remaining-tokens"] == "0"  # free
    models = driver.state.stats()["models"]
    assert models[MODEL]["too_large"] == 4
    assert models[MODEL]["tokens"] == 100


def test_reset_limits_forgets_usage_and_restarts_fixed_windows() -> None:
    driver = Driver(ProjectLimits(rpm=2, rpd=3), window=10.0, limiter="fixed")
    driver.send(at=1.0)
    driver.send(at=2.0)
    assert driver.send(at=3.0).status == 429
    driver.state.reset_limits()  # at 3.0: windows now run [3, 13), [13, 23), ...
    assert [driver.send().status, driver.send().status] == [200, 200]
    verdict = driver.send(at=12.0)
    assert parsed(message_of(verdict))["wait"] == "1s"  # to 13.0, not to 10.0
    assert driver.state.stats()["models"][MODEL]["ok"] == 4  # counters are kept


def test_the_named_limit_and_the_reported_wait_agree() -> None:
    driver = Driver(ProjectLimits(rpm=2, tpm=1000), window=1.0)
    assert driver.send(cost=990).status == 200  # RPM level 1 of 2, TPM 990 of 1000
    verdict = driver.send(cost=20)  # RPM has room; TPM does not (wait 10 ms)
    numbers = parsed(message_of(verdict))
    # After the rejection both buckets are full: RPM would admit it in 1·1/2 = 500 ms, TPM in
    # 20·1/1000 = 20 ms; the request gets in after 500 ms, so the 429 names RPM, with RPM's
    # numbers, and T == R·W/L for the limit it names.
    assert numbers["used"] == numbers["limit"]
    assert numbers["wait_s"] == pytest.approx(numbers["requested"] * 1.0 / numbers["limit"])


# --------------------------------------------------------------------------- profiles, HTTP


def test_openai_profile_headers_on_success_and_429() -> None:
    with serving(sim_config(ProjectLimits(rpm=1, tpm=1000))) as (_, c):
        raw = chat_raw(c)
        headers = raw.headers
        assert budget_names(headers) == set(BUDGET_HEADERS)
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        assert headers["x-ratelimit-remaining-tokens"] == str(1000 - HELLO_COST)
        assert 59.0 < go_seconds(headers["x-ratelimit-reset-requests"]) <= 60.0
        assert 1.0 < go_seconds(headers["x-ratelimit-reset-tokens"]) <= 1.08  # 18·60/1000
        assert "retry-after" not in headers

        err = rejected(c)
        assert err.code == "rate_limit_exceeded"
        assert err.type == "requests"
        assert err.body == {
            "message": f"Rate limit reached for {MODEL} in organization {ORG} on requests per "
            "min (RPM): Limit 1, Used 1, Requested 1. Please try again in 1m0s." + RATE_LIMITS_TAIL,
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        headers = err.response.headers
        assert budget_names(headers) == set(BUDGET_HEADERS)
        assert headers["retry-after"] == "60"  # R·W/L after the rejection's own charge
        assert "retry-after-ms" not in headers
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-reset-requests"] == "1m0s"  # full again
        # The rejected request drew its tokens from TPM as well (less what drained meanwhile:
        # 1000/60 tokens a second, so the bound holds unless a whole second went by).
        remaining_tokens = int(headers["x-ratelimit-remaining-tokens"])
        assert 1000 - 2 * HELLO_COST <= remaining_tokens < 1000 - HELLO_COST
        for name in ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"):
            assert GO_DURATION.match(headers[name])


def test_openai_profile_retry_after_ms_and_no_retry_after() -> None:
    limits = ProjectLimits(rpm=1)
    with serving(sim_config(limits, retry_after_ms=True)) as (_, c):
        chat(c)
        headers = rejected(c).response.headers
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("60", "60000")
    with serving(sim_config(limits, retry_after=False, retry_after_ms=True)) as (_, c):
        chat(c)
        headers = rejected(c).response.headers
        assert "retry-after" not in headers
        assert "retry-after-ms" not in headers
        assert headers["x-ratelimit-reset-requests"] == "1m0s"


def test_azure_profile_headers_and_bodies() -> None:
    cfg = sim_config(ProjectLimits(rpm=1, tpm=1000), profile="azure", retry_after=False)
    with serving(cfg) as (_, c):
        headers = chat_raw(c).headers
        assert budget_names(headers) == {
            "x-ratelimit-remaining-requests",
            "x-ratelimit-remaining-tokens",
        }
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["x-ratelimit-remaining-tokens"] == str(1000 - HELLO_COST)
        err = rejected(c)
        assert err.code == "429"
        assert err.type is None
        assert isinstance(err.body, dict)
        assert set(err.body) == {"code", "message"}
        assert err.body["code"] == "429"
        match = AZURE_MESSAGE.match(err.body["message"])
        assert match, err.body["message"]
        assert match["operation"] == "ChatCompletions_Create"
        assert match["what"] == "call"
        assert match["seconds"] == "60"
        headers = err.response.headers
        # Azure always sends both, whatever retry_after says.
        assert (headers["retry-after"], headers["retry-after-ms"]) == ("60", "60000")
        assert not budget_names(headers) & {
            "x-ratelimit-limit-requests",
            "x-ratelimit-limit-tokens",
            "x-ratelimit-reset-requests",
            "x-ratelimit-reset-tokens",
        }


def test_azure_profile_token_and_embeddings_limits() -> None:
    with serving(sim_config(ProjectLimits(tpm=20), profile="azure")) as (_, c):
        chat(c)
        err = rejected(c)  # 18 + 18 > 20; after its charge: 18·60/20 = 54 s
        assert isinstance(err.body, dict)
        match = AZURE_MESSAGE.match(err.body["message"])
        assert match, err.body["message"]
        assert (match["operation"], match["what"], match["seconds"]) == (
            "ChatCompletions_Create",
            "token",
            "54",
        )
        assert err.response.headers["retry-after"] == "54"
        assert err.response.headers["retry-after-ms"] == "54000"
    with serving(sim_config(ProjectLimits(tpm=3), profile="azure")) as (_, c):
        c.embeddings.create(model=EMBEDDING_MODEL, input="abcdefgh")  # 2 tokens
        with pytest.raises(openai.RateLimitError) as info:
            c.embeddings.create(model=EMBEDDING_MODEL, input="abcdefgh")
        assert isinstance(info.value.body, dict)
        match = AZURE_MESSAGE.match(info.value.body["message"])
        assert match, info.value.body["message"]
        assert (match["operation"], match["what"], match["seconds"]) == (
            "Embeddings_Create",
            "token",
            "40",  # 2·60/3
        )


@pytest.mark.parametrize("retry_after", [True, False])
def test_bare_profile_has_no_budget_headers(retry_after: bool) -> None:
    cfg = sim_config(ProjectLimits(rpm=1, tpm=1000), profile="bare", retry_after=retry_after)
    with serving(cfg) as (_, c):
        assert not budget_names(chat_raw(c).headers)
        err = rejected(c)
        assert not budget_names(err.response.headers)
        assert err.code == "rate_limit_exceeded"
        assert err.type == "requests"
        assert isinstance(err.body, dict)
        assert parsed(err.body["message"])["wait"] == "1m0s"
        if retry_after:
            assert err.response.headers["retry-after"] == "60"
        else:
            assert "retry-after" not in err.response.headers
        assert "retry-after-ms" not in err.response.headers


def test_openrouter_profile_body() -> None:
    cfg = sim_config(ProjectLimits(rpm=1, tpm=1000), profile="openrouter")
    with serving(cfg) as (_, c):
        assert not budget_names(chat_raw(c).headers)
        err = rejected(c)
        assert err.body == {
            "code": 429,
            "message": "Rate limit exceeded",
            "metadata": {"error_type": "rate_limit_exceeded"},
        }
        assert err.response.json() == {"error": err.body}
        # The client turns the integer into a string (openai 2+; 1.x keeps the integer).
        assert str(err.code) == "429"
        assert err.type is None
        assert not budget_names(err.response.headers)
        assert err.response.headers["retry-after"] == "60"


def test_gemini_profile_body_is_an_array() -> None:
    cfg = sim_config(ProjectLimits(rpm=1, tpm=1000), profile="gemini")
    with serving(cfg) as (_, c):
        assert not budget_names(chat_raw(c).headers)
        err = rejected(c)
        expected = [
            {
                "error": {
                    "code": 429,
                    "message": "Resource has been exhausted (e.g. check quota).",
                    "status": "RESOURCE_EXHAUSTED",
                }
            }
        ]
        # The client unwraps {"error": ...} objects only: it hands over the array as it came.
        assert err.body == expected
        assert err.response.json() == expected
        assert err.code is None
        assert err.type is None
        # The message says nothing of the array (openai 2+; 1.x shows the body).
        assert str(err).startswith("Error code: 429")
        assert not budget_names(err.response.headers)
        assert err.response.headers["retry-after"] == "60"


def test_azure_spurious_429_on_embeddings_names_embeddings_create() -> None:
    cfg = sim_config(profile="azure", faults=Faults(rate_limit=1.0))
    with serving(cfg) as (sim, c):
        with pytest.raises(openai.RateLimitError) as info:
            c.embeddings.create(model=EMBEDDING_MODEL, input="abcd")
        assert sim.stats()["models"][EMBEDDING_MODEL]["faults"] == 1
        assert info.value.response.headers["retry-after-ms"] == "1000"
        assert isinstance(info.value.body, dict)
        match = AZURE_MESSAGE.match(info.value.body["message"])
        assert match, info.value.body["message"]
        assert match["operation"] == "Embeddings_Create"


# --------------------------------------------------------------------------- timing over HTTP


@pytest.mark.parametrize(
    ("limiter", "profile"),
    [("bucket", "openai"), ("fixed", "openai"), ("sliding", "openai"), ("bucket", "azure")],
)
def test_retry_after_ms_is_when_the_next_request_gets_in(limiter: str, profile: str) -> None:
    cfg = sim_config(
        ProjectLimits(rpm=1), window=1.0, limiter=limiter, profile=profile, retry_after_ms=True
    )
    with serving(cfg) as (_, c):
        chat(c)
        # A fixed window may end between the two requests: then the next one is refused.
        error = try_chat(c)
        if error is None and limiter == "fixed":
            error = try_chat(c)
        assert error is not None
        err = error
        wait_ms = int(err.response.headers["retry-after-ms"])
        assert err.response.headers["retry-after"] == str(max(1, math.ceil(wait_ms / 1000)))
        if profile == "azure":
            assert isinstance(err.body, dict)
            match = AZURE_MESSAGE.match(err.body["message"])
            assert match and match["seconds"] == err.response.headers["retry-after"]
        else:
            assert isinstance(err.body, dict)
            assert go_seconds(parsed(err.body["message"])["wait"]) == wait_ms / 1000
        assert wait_ms <= 1000
        if limiter == "bucket":
            assert wait_ms == 1000  # R·W/L after the rejection's own charge
        if wait_ms >= 400:
            time.sleep(wait_ms / 2000)  # half the advertised wait: still out
            err = rejected(c)
            wait_ms = int(err.response.headers["retry-after-ms"])
        time.sleep(wait_ms / 1000 + 0.05)
        assert chat(c).choices[0].message.content == "echo: hello"


@pytest.mark.parametrize("count_rejected", [True, False])
def test_rejected_requests_delay_the_next_admission_over_http(count_rejected: bool) -> None:
    cfg = sim_config(
        ProjectLimits(rpm=2), window=2.0, count_rejected=count_rejected, retry_after_ms=True
    )
    with serving(cfg) as (sim, c):
        started = time.monotonic()
        chat(c)
        chat(c)
        first_wait = int(rejected(c).response.headers["retry-after-ms"])
        deadline = time.monotonic() + 1.6
        assert first_wait == 1000 if count_rejected else first_wait <= 1000  # R·W/L: 1·2/2
        admitted = False
        retries = 0
        # Retry every ~20 ms for 1.6 s, longer than the 1 s one request takes to drain.
        while time.monotonic() < deadline:
            time.sleep(0.02)
            retries += 1
            error = try_chat(c)
            if error is None:
                admitted = True
                break
            if count_rejected:  # each retry fills the bucket again: the wait never shrinks
                assert error.response.headers["retry-after-ms"] == "1000"
        if count_rejected:
            assert not admitted
            assert sim.stats()["projects"]["proj-a"]["rate_limited"] == retries + 1
        else:
            assert admitted
            # Not before the bucket had drained one request's worth since the two admissions.
            assert time.monotonic() - started >= 0.95
        time.sleep(1.05)  # now wait as told, without retrying
        chat(c)


def test_per_model_limits_over_http() -> None:
    limits = ProjectLimits(rpm=10, per_model=(ModelLimits(FAMILY, rpm=1, tpm=1000),))
    with serving(sim_config(limits)) as (sim, c):
        headers = chat_raw(c, "gpt-4o").headers
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-limit-tokens"] == "1000"
        err = rejected(c, "gpt-4o-2024-08-06")  # the same family: the same budget
        assert isinstance(err.body, dict)
        numbers = parsed(err.body["message"])
        assert (numbers["model"], numbers["limit"], numbers["used"]) == (
            "gpt-4o-2024-08-06",
            1,
            1,
        )
        headers = chat_raw(c, MODEL).headers  # the project-level pool
        assert headers["x-ratelimit-limit-requests"] == "10"
        assert headers["x-ratelimit-remaining-requests"] == "9"
        assert "x-ratelimit-limit-tokens" not in headers  # no TPM at the project level
        for _ in range(3):
            rejected(c, "gpt-4o")
        headers = chat_raw(c, "gpt-4.1-mini").headers  # the family's 429s cost it nothing
        assert headers["x-ratelimit-remaining-requests"] == "8"
        models = sim.stats()["models"]
        assert models["gpt-4o"]["rate_limited"] == 3
        assert models["gpt-4o-2024-08-06"]["rate_limited"] == 1
        assert models[MODEL]["ok"] == models["gpt-4.1-mini"]["ok"] == 1


def test_daily_limit_over_http() -> None:
    cfg = sim_config(ProjectLimits(rpm=100, rpd=3), window=1.0)  # a day is 1440 s
    with serving(cfg) as (_, c):
        for remaining in ("2", "1", "0"):
            headers = chat_raw(c).headers
            assert headers["x-ratelimit-limit-requests"] == "3"  # the daily meter
            assert headers["x-ratelimit-remaining-requests"] == remaining
        assert 1430 < go_seconds(headers["x-ratelimit-reset-requests"]) <= 1440  # ~24m0s
        err = rejected(c)
        assert err.type == "requests"
        assert isinstance(err.body, dict)
        numbers = parsed(err.body["message"])
        assert numbers["name"] == "requests per day (RPD)"
        assert (numbers["limit"], numbers["used"], numbers["requested"]) == (3, 3, 1)
        assert 470 < numbers["wait_s"] <= 480  # 1440 s / 3 per request, less what drained
        assert numbers["tail"] == BILLING_TAIL
        retry_after = int(err.response.headers["retry-after"])
        assert retry_after == math.ceil(numbers["wait_s"])
        with openai.OpenAI(api_key=KEY_B, base_url=c.base_url, max_retries=0) as other:
            chat(other)  # another project is not held back


def test_stats_models_section() -> None:
    limits = ProjectLimits(tpm=100, per_model=(ModelLimits(("gpt-4o",), rpm=2),))
    cfg = sim_config(limits)
    with serving(cfg) as (sim, c):
        chat(c, "gpt-4o")
        chat(c, "gpt-4o")
        rejected(c, "gpt-4o")
        rejected(c, MODEL, max_tokens=200)  # 2 + 200 tokens > TPM 100: too large
        chat(c, MODEL)
        c.embeddings.create(model=EMBEDDING_MODEL, input="abcdefgh")
        list(c.models.list())  # not budgeted: no model entry
        sim.configure(dataclasses.replace(cfg, faults=Faults(error_500=1.0)))
        with pytest.raises(openai.InternalServerError):
            chat(c, MODEL)
        stats = sim.stats()
        zero = dict.fromkeys(("requests", "ok", "rate_limited", "too_large", "faults", "tokens"), 0)
        assert stats["models"] == {
            "gpt-4o": {**zero, "requests": 3, "ok": 2, "rate_limited": 1, "tokens": 36},
            MODEL: {**zero, "requests": 3, "ok": 1, "too_large": 1, "faults": 1, "tokens": 36},
            EMBEDDING_MODEL: {**zero, "requests": 1, "ok": 1, "tokens": 2},
        }
        assert stats["projects"]["proj-a"]["tokens"] == 36 + 36 + 2
        assert KEY not in json.dumps(stats)
        sim.reset_stats()
        assert sim.stats()["models"] == {}


# --------------------------------------------------------------------------- config, CLI


def test_config_round_trip_of_the_new_fields() -> None:
    cfg = sim_config(
        ProjectLimits(
            rpm=10,
            tpm=1000,
            rpd=500,
            tpd=50_000,
            per_model=(
                ModelLimits(FAMILY, rpm=2, rpd=50),
                ModelLimits(("gpt-4.1-mini",), tpm=300, tpd=9000),
            ),
        ),
        limiter="sliding",
        count_rejected=False,
        profile="openrouter",
        retry_after=False,
        retry_after_ms=True,
        window=0.5,
    )
    data = cfg.to_dict()
    assert data["projects"]["proj-a"]["per_model"] == [
        {"models": list(FAMILY), "rpm": 2, "tpm": None, "rpd": 50, "tpd": None},
        {"models": ["gpt-4.1-mini"], "rpm": None, "tpm": 300, "rpd": None, "tpd": 9000},
    ]
    assert (data["limiter"], data["count_rejected"], data["profile"]) == (
        "sliding",
        False,
        "openrouter",
    )
    assert (data["retry_after"], data["retry_after_ms"]) == (False, True)
    assert SimulatorConfig.from_dict(json.loads(json.dumps(data))) == cfg
    defaults = SimulatorConfig.from_dict({"keys": [KEY]})
    assert (defaults.limiter, defaults.count_rejected, defaults.profile) == (
        "bucket",
        True,
        "openai",
    )
    assert (defaults.retry_after, defaults.retry_after_ms) == (True, False)
    short = SimulatorConfig.from_dict(
        {"projects": {"p": {"per_model": [{"models": "gpt-4o", "rpd": 5}]}}}
    )
    assert short.limits("p").per_model == (ModelLimits(("gpt-4o",), rpd=5),)
    assert short.limits("p").pool("gpt-4o") == (("gpt-4o",), {"rpd": 5})
    assert short.limits("p").pool(MODEL) == ((), {})


@pytest.mark.parametrize(
    ("data", "error", "match"),
    [
        ({"limiter": "leaky"}, ValueError, r"limiter: must be one of 'bucket', 'fixed', 'slid"),
        ({"profile": "anthropic"}, ValueError, r"profile: must be one of 'openai', 'azure'"),
        ({"count_rejected": "yes"}, TypeError, r"count_rejected: must be a boolean"),
        ({"retry_after": 0}, TypeError, r"retry_after: must be a boolean"),
        (
            {
                "projects": {
                    "p": {
                        "per_model": [
                            {"models": ["gpt-4o", "gpt-4o-2024-08-06"], "rpm": 2},
                            {"models": ["gpt-4o"], "rpd": 5},
                        ]
                    }
                }
            },
            ValueError,
            r"projects\['p'\]\.per_model\[1\]: model 'gpt-4o' already has limits",
        ),
        (
            {"projects": {"p": {"per_model": [{"models": ["gpt-4o"], "rpx": 2}]}}},
            ValueError,
            r"projects\['p'\]\.per_model\[0\]: unknown field 'rpx'",
        ),
        (
            {"projects": {"p": {"per_model": [{"rpm": 2}]}}},
            ValueError,
            r"projects\['p'\]\.per_model\[0\]\.models: is required",
        ),
        (
            {"projects": {"p": {"per_model": [{"models": [], "rpm": 2}]}}},
            TypeError,
            r"projects\['p'\]\.per_model\[0\]\.models: must be a non-empty list",
        ),
        (
            {"projects": {"p": {"per_model": [{"models": ["a", "a"]}]}}},
            ValueError,
            r"projects\['p'\]\.per_model\[0\]\.models: a model is named twice",
        ),
        (
            {"projects": {"p": {"per_model": [{"models": ["gpt-4o"], "rpd": 0}]}}},
            ValueError,
            r"projects\['p'\]\.per_model\[0\]\.rpd: must be a positive integer",
        ),
        (
            {"projects": {"p": {"per_model": {"models": ["gpt-4o"]}}}},
            TypeError,
            r"projects\['p'\]\.per_model: must be a list",
        ),
        ({"projects": {"p": {"tpd": -1}}}, ValueError, r"projects\['p'\]\.tpd"),
    ],
)
def test_config_validation_of_the_new_fields(
    data: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        SimulatorConfig.from_dict(data)


def test_cli_new_flags() -> None:
    args = build_parser().parse_args(
        [
            "--key",
            f"{KEY}:proj-a",
            "--rpd",
            "500",
            "--tpd",
            "90000",
            "--model-limit",
            "gpt-4o,gpt-4o-2024-08-06=rpm:2,rpd:50",
            "--model-limit",
            "gpt-4.1-mini=tpm:300",
            "--limiter",
            "fixed",
            "--no-count-rejected",
            "--profile",
            "gemini",
            "--no-retry-after",
            "--window",
            "0.5",
        ]
    )
    cfg = config_from_args(args)
    assert cfg.limits("proj-a") == ProjectLimits(
        rpd=500,
        tpd=90_000,
        per_model=(ModelLimits(FAMILY, rpm=2, rpd=50), ModelLimits(("gpt-4.1-mini",), tpm=300)),
    )
    assert (cfg.limiter, cfg.count_rejected, cfg.profile, cfg.retry_after) == (
        "fixed",
        False,
        "gemini",
        False,
    )
    assert cfg.window == 0.5
    defaults = config_from_args(build_parser().parse_args(["--key", KEY, "--count-rejected"]))
    assert (defaults.limiter, defaults.count_rejected, defaults.profile) == (
        "bucket",
        True,
        "openai",
    )
    assert defaults.retry_after is True
    assert defaults.projects == {}  # no limit flags: no limits


def test_cli_model_limit_alongside_a_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sim.json"
    path.write_text(
        json.dumps(
            {
                "keys": [{"key": KEY, "project": "proj-a"}],
                "projects": {"proj-a": {"rpm": 5, "per_model": [{"models": ["gpt-4o"]}]}},
                "profile": "azure",
            }
        )
    )
    args = build_parser().parse_args(
        ["--config", str(path), "--key", f"{KEY_B}:proj-b", "--model-limit", "gpt-4o=rpm:1"]
    )
    cfg = config_from_args(args)
    assert cfg.limits("proj-a") == ProjectLimits(rpm=5, per_model=(ModelLimits(("gpt-4o",)),))
    assert cfg.limits("proj-b") == ProjectLimits(per_model=(ModelLimits(("gpt-4o",), rpm=1),))
    assert cfg.profile == "azure"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("gpt-4o", r"expected MODEL\[,MODEL\.\.\.\]=KIND:N"),
        ("gpt-4o=", r"expected MODEL\[,MODEL\.\.\.\]=KIND:N"),
        ("gpt-4o=rpx:2", r"'rpx:2' is not KIND:N with KIND one of rpm, tpm, rpd, tpd"),
        ("gpt-4o=rpm2", r"'rpm2' is not KIND:N"),
        ("gpt-4o=rpm:two", r"invalid literal for int"),
        ("gpt-4o=rpm:0", r"rpm: must be a positive integer"),
        ("gpt-4o=rpm:1,rpm:2", r"rpm is given twice"),
        ("=rpm:2", r"models\[0\]: must not be empty"),
        ("gpt-4o,gpt-4o=rpm:2", r"a model is named twice"),
    ],
)
def test_cli_bad_model_limit_is_a_clear_config_error(spec: str, match: str) -> None:
    args = build_parser().parse_args(["--key", KEY, "--model-limit", spec])
    with pytest.raises(ConfigError, match=match) as info:
        config_from_args(args)
    assert str(info.value).startswith(f"--model-limit {spec!r}: ")


def test_cli_model_named_in_two_model_limits(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--key", KEY, "--model-limit", "gpt-4o=rpm:1", "--model-limit", "gpt-4o=rpd:5"]
    with pytest.raises(ConfigError, match=r"model 'gpt-4o' already has limits"):
        config_from_args(build_parser().parse_args(args))
    assert main(args) == 2
    assert main(["--key", KEY, "--model-limit", "gpt-4o=rpm"]) == 2
    err = capsys.readouterr().err
    assert "already has limits" in err
    assert "--model-limit 'gpt-4o=rpm': " in err
    assert "Traceback" not in err
    assert KEY not in err


def test_cli_model_named_twice_blames_model_limit() -> None:
    args = ["--key", KEY, "--model-limit", "gpt-4o=rpm:1", "--model-limit", "gpt-4o=rpd:5"]
    with pytest.raises(ConfigError) as info:
        config_from_args(build_parser().parse_args(args))
    assert str(info.value).startswith("--model-limit")


@pytest.mark.parametrize(
    "argv",
    [["--limiter", "leaky"], ["--profile", "anthropic"]],
)
def test_cli_rejects_unknown_limiter_and_profile(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--key", KEY, *argv])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
